"""Shared fixtures: real photographs (tests/fixtures/photos, see ATTRIBUTION.md), codecs and tokenizers.

Helpers that make test videos live in tests/media.py; test modules import it as `media` (pytest puts
this folder on sys.path because it holds the rootdir conftest).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageOps
from s3_server import s3_server  # noqa: F401  (fixture: a live S3-compatible server, tests/s3_server.py)

from jpeglm.codecs import JpegCodec
from jpeglm.tokenizer import CodecTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
PHOTOS = sorted((FIXTURES / "photos").glob("*.jpg"))


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    assert len(PHOTOS) >= 4, "tests/fixtures/photos is missing"
    return PHOTOS


@pytest.fixture(scope="session")
def jpeg_codec() -> JpegCodec:
    return JpegCodec()


@pytest.fixture(scope="session")
def jpeg_streams(jpeg_codec, photos) -> list[bytes]:
    """The paper's streams of every photo and of its mirror image and 90-degree turn (18 in all)."""
    streams = []
    for path in photos:
        with Image.open(path) as im:
            streams += [
                jpeg_codec.encode(path),
                jpeg_codec.encode(ImageOps.mirror(im)),
                jpeg_codec.encode(im.rotate(90)),
            ]
    return streams


@pytest.fixture(scope="session")
def jpeg_tokenizer(jpeg_codec, jpeg_streams) -> CodecTokenizer:
    return CodecTokenizer.train(jpeg_streams, "jpeg", 320, codec_spec=jpeg_codec.spec)
