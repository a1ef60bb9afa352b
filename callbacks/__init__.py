"""Training-time callbacks (installed as ``jpeglm.callbacks``)."""

from jpeglm.callbacks.fid import FIDCallback, SmallFeatures
from jpeglm.callbacks.samples import SampleGallery
from jpeglm.callbacks.training import InitialValidation, LogLines, SlurmRequeue, TokenThroughput

__all__ = [
    "FIDCallback",
    "InitialValidation",
    "LogLines",
    "SampleGallery",
    "SlurmRequeue",
    "SmallFeatures",
    "TokenThroughput",
]
