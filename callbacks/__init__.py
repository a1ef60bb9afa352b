"""Training-time callbacks: sample galleries, FID (installed as ``jpeglm.callbacks``)."""
