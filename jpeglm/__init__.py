"""jpeglm: pretrain LLMs that generate images and videos by writing JPEG and H.264 bytes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("jpeglm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
