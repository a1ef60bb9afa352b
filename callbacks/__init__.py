"""Training-time callbacks (installed as ``jpeglm.callbacks``)."""

from jpeglm.callbacks.training import LogLines, SlurmRequeue, TokenThroughput

__all__ = ["LogLines", "SlurmRequeue", "TokenThroughput"]
