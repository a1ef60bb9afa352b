"""What every codec shares: the :class:`Codec` protocol, the error type, decode results and spec checking.

A codec turns media into a canonical byte stream and back. Encoding refuses bad input with a
:class:`CodecError` that names the source; decoding never raises on any byte string (model output
is often broken) and reports how much of the stream it could use instead. :class:`Codec` is what
every codec offers, so code outside ``jpeglm.codecs`` never needs to ask which codec it holds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image

# typing_extensions (a dependency of torch and lightning): its runtime_checkable isinstance() looks members
# up statically on every Python, as typing does from 3.12 on; typing's on 3.10/3.11 would evaluate
# ``AvcCodec.spec``, which runs x264.
from typing_extensions import Protocol, Self, runtime_checkable


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


@runtime_checkable
class Decoded(Protocol):
    """What every codec's decode result tells (:class:`DecodedImage`, :class:`DecodedVideo`).

    Attributes:
        complete: True only for a full, valid stream that the codec decodes without any repair.
        fraction: share of the media (MCUs of an image, slices of a clip) that the stream holds well-formed,
            0.0 to 1.0.
    """

    # Read-only properties rather than plain attributes, so the frozen dataclasses match for type checkers too.
    @property
    def complete(self) -> bool: ...

    @property
    def fraction(self) -> float: ...


DecodedT = TypeVar("DecodedT", bound=Decoded)


@runtime_checkable
class Codec(Protocol[DecodedT]):
    """What every codec offers: :class:`~jpeglm.codecs.JpegCodec` (images), :class:`~jpeglm.codecs.AvcCodec` (video).

    Code outside ``jpeglm.codecs`` uses only these members and never branches on :attr:`name`. The type
    parameter is the codec's decode result (``JpegCodec`` is a ``Codec[DecodedImage]``, ``AvcCodec`` a
    ``Codec[DecodedVideo]``); a plain ``Codec`` is any codec. ``isinstance(obj, Codec)`` checks that the
    members exist.

    Errors a caller can cause (bad arguments, unreadable media, a spec this installation cannot honour)
    are :class:`ValueError` (most often its subclass :class:`CodecError`); :meth:`decode` never raises.
    """

    name: str
    """The codec's name, stored in its spec: ``"jpeg"`` or ``"avc"``."""

    file_suffix: str
    """Suffix of the files :meth:`to_file` writes: ``".jpg"`` or ``".mp4"``."""

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description of the codec (settings, library versions, checksums); see :meth:`from_spec`.

        Returns:
            A dict whose ``"codec"`` entry is :attr:`name`.
        """
        ...

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Self:
        """Rebuild the codec a spec describes.

        Args:
            spec: a dict from :attr:`spec`, e.g. stored with a checkpoint or a prepared data set.

        Returns:
            The codec, which encodes exactly as the one that wrote the spec.

        Raises:
            CodecError: ``spec`` is not this codec's, or this installation would encode differently.
        """
        ...

    def encode(self, media: Any) -> bytes:
        """Turn media (an image, a video or a clip of frames: a path, file bytes, PIL images or arrays) into a stream.

        Args:
            media: what the codec reads; see the codec's own ``encode``.

        Returns:
            The canonical byte stream a model learns to write.

        Raises:
            CodecError: the input is unreadable, corrupt, of the wrong kind or too large; the message names it.
        """
        ...

    def decode(self, stream: bytes) -> DecodedT:
        """Best-effort decode of any byte string; never raises.

        Args:
            stream: a stream from :meth:`encode` or what a model wrote (possibly truncated or garbled).

        Returns:
            The media at the codec's size (grey where the stream does not reach), with ``complete`` and ``fraction``.
        """
        ...

    def stream_end(self, stream: bytes) -> int | None:
        """Length of the first whole image or clip at the start of a growing stream.

        Args:
            stream: the bytes written so far.

        Returns:
            The offset where the first whole image or clip ends, or None while it may still grow.
        """
        ...

    def prompt(self, stream: bytes, ratio: float) -> bytes:
        """The paper's partial-media prompt: an exact prefix of ``stream`` holding a share of it.

        Args:
            stream: a full stream, e.g. from :meth:`encode`.
            ratio: share kept, inside (0, 1): of an image's restart intervals, of a clip's frames.

        Returns:
            The prefix, cut where the codec's tokenizer keeps it an exact prefix of the full stream's tokens.

        Raises:
            ValueError: ``ratio`` is outside (0, 1) or keeps nothing (JPEG), or the stream is too short to cut there.
        """
        ...

    def prompt_share(self, ratio: float) -> float:
        """The share of an item that :meth:`prompt` at ``ratio`` actually keeps (cuts fall on whole units).

        Args:
            ratio: as for :meth:`prompt`.

        Returns:
            The share kept, in (0, 1): two ratios with the same share give the same prompts.

        Raises:
            ValueError: as :meth:`prompt` does, for a ratio outside (0, 1) or one that keeps nothing.
        """
        ...

    def grammar(self, tokenizer: Any, offset: int = 0, num_ids: int | None = None) -> Any | None:
        """The codec's stream grammar over a tokenizer's ids, for constrained sampling; None if it has none.

        Args:
            tokenizer: the :class:`~jpeglm.tokenizer.CodecTokenizer` of this codec's streams.
            offset: where its BPE ids sit in a mixed vocabulary (``CodecTokenizer.shift``).
            num_ids: length of the masks (the model's vocabulary size).

        Returns:
            An object with ``start``, ``step(state, id)``, ``allowed(state, budget=None)`` (a bool mask over the
            ids), ``finish_cost(state)`` and ``check_prefix(stream)`` (e.g.
            :class:`~jpeglm.codecs.grammar.TokenGrammar`), or None when the codec offers no grammar.
        """
        ...

    def to_file(self, stream: bytes, decoded: DecodedT | None = None) -> bytes:
        """A standalone file (:attr:`file_suffix`) that any viewer opens, for any stream; never fails on model output.

        When ``stream`` decodes complete this is the stream itself made standalone (``JpegCodec.to_jpeg``,
        ``AvcCodec.to_mp4``); otherwise it is the best-effort decode, encoded again as an ordinary file.

        Args:
            stream: a stream from :meth:`encode` or what a model wrote.
            decoded: ``self.decode(stream)`` when the caller already has it, so it is not decoded twice.

        Returns:
            The file's bytes.
        """
        ...

    def preview(self, decoded: DecodedT, max_frames: int = 8) -> np.ndarray:
        """A picture of a decode result for contact sheets and logs.

        Args:
            decoded: a result of :meth:`decode`.
            max_frames: most frames a video's strip shows (evenly stepped); images ignore it.

        Returns:
            ``(H, W, 3)`` uint8: the image, or a video's frames side by side with 4-pixel white gaps.
        """
        ...

    def reference(self, media: Any) -> np.ndarray:
        """The media as the codec crops, resizes and resamples it before compression (what a stream is compared to).

        Args:
            media: what :meth:`encode` takes.

        Returns:
            ``(H, W, 3)`` uint8 for an image, ``(T, H, W, 3)`` uint8 for a video.

        Raises:
            CodecError: as :meth:`encode`.
        """
        ...


PREVIEW_GAP = 4
"""White pixels between the frames of a video preview."""


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
