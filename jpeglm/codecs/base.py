"""What every codec shares: the error type, decode results and spec checking.

A codec turns media into a canonical byte stream and back. Encoding refuses bad input with a
:class:`CodecError` that names the source; decoding never raises on any byte string (model output
is often broken) and reports how much of the stream it could use instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


class CodecError(ValueError):
    """Input that a codec cannot encode (corrupt, unsupported, too large), or a spec it cannot honour.

    Args:
        message: what is wrong, naming the input.
        reason: a short machine-readable cause for reports: "corrupt", "truncated", "too_large",
            "no_video", "invalid" (wrong kind of argument) or "spec" (a spec this installation cannot honour).
    """

    def __init__(self, message: str, reason: str = "corrupt") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """Best-effort decode of a JPEG stream.

    Attributes:
        image: RGB image of the codec's size; parts the stream does not cover are neutral grey.
        complete: True only for a full, valid stream (every MCU present and well-formed, proper end).
        fraction: share of the image's MCUs that the stream holds in well-formed entropy-coded data.
    """

    image: Image.Image
    complete: bool
    fraction: float


@dataclass(frozen=True)
class DecodedVideo:
    """Best-effort decode of an H.264 stream.

    Attributes:
        frames: ``(T, H, W, 3)`` uint8 RGB frames, always the codec's full clip length; frames the
            stream does not reach are neutral grey.
        complete: True only for a full, valid stream (every frame and slice present, no decode error).
        fraction: share of the clip's macroblock slices that the stream holds complete.
    """

    frames: np.ndarray
    complete: bool
    fraction: float


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe(source: Any) -> str:
    """A short name for an input in error messages: the path, or the kind of object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {tuple(source.shape)} {source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return str(source)


def check_spec(spec: dict[str, Any], name: str, fields: tuple[str, ...]) -> dict[str, Any]:
    """Return the constructor arguments stored in ``spec``, or raise if it is not a ``name`` spec."""
    if not isinstance(spec, dict) or spec.get("codec") != name:
        got = spec.get("codec") if isinstance(spec, dict) else type(spec).__name__
        raise CodecError(f"expected a {name!r} codec spec, got {got!r}", reason="spec")
    missing = [f for f in fields if f not in spec]
    if missing:
        raise CodecError(f"{name} codec spec lacks {missing}; was it written by jpeglm?", reason="spec")
    return {f: spec[f] for f in fields}
