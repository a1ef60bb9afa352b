"""Training-time callbacks (installed as ``jpeglm.callbacks``)."""

from jpeglm.callbacks.fid import FIDCallback
from jpeglm.callbacks.gallery import SampleGallery
from jpeglm.callbacks.training import InitialValidation, LogLines, SlurmRequeue, TokenThroughput
from jpeglm.fid import SmallFeatures

__all__ = [
    "FIDCallback",
    "InitialValidation",
    "LogLines",
    "SampleGallery",
    "SlurmRequeue",
    "SmallFeatures",
    "TokenThroughput",
]
