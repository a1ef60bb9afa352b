"""Codecs: media to canonical byte streams and back (JPEG for images, H.264 for videos).

Both codecs implement :class:`Codec`; code outside this package uses that protocol and never branches on
``codec.name``.
"""

from typing import Any

from jpeglm.codecs.avc import AvcCodec
from jpeglm.codecs.base import Codec, CodecError, Decoded, DecodedImage, DecodedVideo
from jpeglm.codecs.grammar import JpegGrammar, TokenGrammar
from jpeglm.codecs.jpeg import JpegCodec

__all__ = [
    "AvcCodec",
    "CODECS",
    "Codec",
    "CodecError",
    "Decoded",
    "DecodedImage",
    "DecodedVideo",
    "JpegCodec",
    "JpegGrammar",
    "TokenGrammar",
    "codec_from_spec",
]

CODECS: dict[str, type[Codec[Any]]] = {codec.name: codec for codec in (JpegCodec, AvcCodec)}
"""Codec classes by the name their spec carries."""


def codec_from_spec(spec: dict[str, Any]) -> Codec[Any]:
    """Rebuild the codec a spec describes (see each codec's ``from_spec``).

    Raises:
        CodecError: ``spec`` names no known codec, or the codec refuses it.
    """
    name = spec.get("codec") if isinstance(spec, dict) else None
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r} in spec; known: {sorted(CODECS)}")
    return CODECS[name].from_spec(spec)
