"""JpegCodec() against the reference code's preprocessing (xhan77/jpeg-lm ``run.py``), rewritten from its description.

The reference opens the file with PIL, converts it to RGB, applies torchvision's
``RandomResizedCrop((256, 256), scale=(1.0, 1.0), ratio=(1.0, 1.0), antialias=True)`` (for a non-square image
its fallback: a centre crop of the short side at offset ``(big - small) // 2``; then PIL's antialiased bilinear
resize) and saves with quality 25, 4:2:0, ``streamtype=2``, ``restart_marker_blocks=1``. Pillow's JPEG writer
copies a comment found in the image's ``info`` into the stream; jpeglm drops all metadata, so a source with a
comment is the one known difference for an RGB photo.
"""

import io

import pytest
from PIL import Image

from jpeglm.codecs import JpegCodec


def reference_bytes(source) -> bytes:
    """The reference's steps, written out with PIL alone (no EXIF rotation, no ICC conversion)."""
    im = Image.open(source).convert("RGB")
    w, h = im.size
    small = min(w, h)
    left, top = (w - small) // 2, (h - small) // 2
    im = im.crop((left, top, left + small, top + small)).resize((256, 256), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=25, subsampling="4:2:0", streamtype=2, restart_marker_blocks=1)
    return buf.getvalue()


def without_comment(stream: bytes) -> bytes:
    """``stream`` less its COM segment (FF FE, length), if it has one before the scan."""
    at = stream.find(b"\xff\xfe", 0, stream.find(b"\xff\xda"))
    if at < 0:
        return stream
    return stream[:at] + stream[at + 2 + int.from_bytes(stream[at + 2 : at + 4], "big") :]


def test_default_codec_writes_the_reference_bytes_for_every_fixture_photo(photos):
    codec = JpegCodec()
    assert codec.resample == "bilinear"
    with_comment = [p.name for p in photos if "comment" in Image.open(p).info]
    assert not with_comment, f"fixtures with a JPEG comment (the reference copies it): {with_comment}"
    same = [p.name for p in photos if codec.encode(p) == reference_bytes(p)]
    assert same == [p.name for p in photos], f"{len(same)} of {len(photos)} identical"


def test_torchvision_random_resized_crop_gives_the_same_pixels(photos):
    transforms = pytest.importorskip("torchvision.transforms")
    crop = transforms.RandomResizedCrop((256, 256), scale=(1.0, 1.0), ratio=(1.0, 1.0), antialias=True)
    codec = JpegCodec()
    for path in photos:
        expected = crop(Image.open(path).convert("RGB"))
        assert codec.prepare(path).tobytes() == expected.tobytes(), path.name


def test_square_and_portrait_sources_crop_at_the_reference_offsets(photos):
    codec = JpegCodec()
    with Image.open(photos[0]) as im:
        landscape = im.convert("RGB")  # 500 x 281: offset (500 - 281) // 2 = 109
    for source in (landscape, landscape.transpose(Image.Transpose.ROTATE_90), landscape.crop((0, 0, 281, 281))):
        buf = io.BytesIO()
        source.save(buf, format="PNG")
        assert codec.encode(source) == reference_bytes(io.BytesIO(buf.getvalue()))


def test_a_source_comment_is_the_only_difference(photos):
    with Image.open(photos[0]) as im:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95, comment=b"shot on a phone")
    ours, theirs = JpegCodec().encode(buf.getvalue()), reference_bytes(io.BytesIO(buf.getvalue()))
    assert b"shot on a phone" in theirs
    assert b"shot on a phone" not in ours
    assert without_comment(theirs) == ours


def test_specs_from_before_the_bilinear_default_keep_bicubic(photos):
    old = JpegCodec(resample="bicubic").spec
    assert JpegCodec.from_spec(old).resample == "bicubic"
    nameless = {key: value for key, value in old.items() if key != "resample"}
    assert JpegCodec.from_spec(nameless).resample == "bicubic"
    assert JpegCodec.from_spec(JpegCodec().spec).resample == "bilinear"
    assert JpegCodec.from_spec(old).encode(photos[0]) != JpegCodec().encode(photos[0])
