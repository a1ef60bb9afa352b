"""Codecs: media to canonical byte streams and back (JPEG for images, H.264 for videos)."""

from typing import Any

from jpeglm.codecs.avc import AvcCodec
from jpeglm.codecs.base import CodecError, DecodedImage, DecodedVideo
from jpeglm.codecs.jpeg import JpegCodec

__all__ = ["AvcCodec", "CODECS", "CodecError", "DecodedImage", "DecodedVideo", "JpegCodec", "codec_from_spec"]

CODECS = {codec.name: codec for codec in (JpegCodec, AvcCodec)}
"""Codec classes by the name their spec carries."""


def codec_from_spec(spec: dict[str, Any]) -> Any:
    """Rebuild the codec a spec describes (see each codec's ``from_spec``)."""
    name = spec.get("codec") if isinstance(spec, dict) else None
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r} in spec; known: {sorted(CODECS)}")
    return CODECS[name].from_spec(spec)
