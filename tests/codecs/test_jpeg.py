import io
import json
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from jpeglm.codecs import CodecError, JpegCodec, codec_from_spec

RST = re.compile(rb"\xff[\xd0-\xd7]")


def pillow_reference(image: Image.Image, **settings) -> bytes:
    """The paper's save call, written out independently of the codec."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=25, subsampling="4:2:0", streamtype=2, restart_marker_blocks=1, **settings)
    return buf.getvalue()


def reference_pipeline(path) -> bytes:
    """Open, orient, RGB, center square crop, bilinear resize to 256 (the reference's default), save."""
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return pillow_reference(im.crop((left, top, left + side, top + side)).resize((256, 256), Image.BILINEAR))


def photo_256(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((256, 256)))


# ---------------------------------------------------------------------- encode


def test_256_rgb_input_gives_exactly_pillows_bytes(jpeg_codec, photos):
    for path in photos[:3]:
        array = photo_256(path)
        expected = pillow_reference(Image.fromarray(array))
        assert jpeg_codec.encode(array) == expected
        assert jpeg_codec.encode(Image.fromarray(array)) == expected


def test_photo_matches_the_reference_preprocessing(jpeg_codec, photos):
    for path in photos:
        assert jpeg_codec.encode(path) == reference_pipeline(path)


def test_every_input_kind_gives_the_same_stream(jpeg_codec, photos):
    path = photos[0]
    expected = jpeg_codec.encode(path)
    assert jpeg_codec.encode(str(path)) == expected
    assert jpeg_codec.encode(path.read_bytes()) == expected
    assert jpeg_codec.encode(bytearray(path.read_bytes())) == expected
    assert jpeg_codec.encode(Image.open(path)) == expected
    assert jpeg_codec.encode(np.asarray(Image.open(path))) == expected


def test_stream_is_abbreviated_with_a_marker_after_every_mcu(jpeg_codec, jpeg_streams):
    for stream in jpeg_streams:
        assert stream.startswith(jpeg_codec.header)
        assert stream.endswith(b"\xff\xd9")
        assert b"\xff\xdb" not in stream[: len(jpeg_codec.header)]  # no quantisation tables
        assert b"\xff\xc4" not in stream[: len(jpeg_codec.header)]  # no Huffman tables
        markers = RST.findall(stream)
        assert len(markers) == 255
        assert markers[:9] == [bytes([0xFF, 0xD0 + i % 8]) for i in range(9)]
    assert jpeg_codec.num_mcus == 256


def test_tokens_per_image_statistics_are_photo_like(jpeg_streams):
    sizes = [len(s) for s in jpeg_streams]
    # Real photos at quality 25 give a few KB (the paper: ~5K tokens per image after a 10% BPE saving).
    assert 2_000 < np.mean(sizes) < 12_000


def test_encode_is_deterministic_across_instances(photos):
    assert JpegCodec().encode(photos[1]) == JpegCodec().encode(photos[1])


def test_settings_are_validated():
    with pytest.raises(ValueError, match="multiple of 16"):
        JpegCodec(size=250)
    with pytest.raises(ValueError, match="quality"):
        JpegCodec(quality=0)
    with pytest.raises(ValueError, match="subsampling"):
        JpegCodec(subsampling="4:1:1")
    with pytest.raises(ValueError, match="restart_interval"):
        JpegCodec(restart_interval=0)


def test_other_settings_change_the_stream(photos):
    small, base = JpegCodec(size=128, quality=50, subsampling="4:4:4"), JpegCodec()
    stream = small.encode(photos[0])
    assert len(RST.findall(stream)) == small.num_mcus - 1 == 255  # 4:4:4 MCUs are 8x8
    assert small.decode(stream).complete
    assert small.decode(stream).image.size == (128, 128)
    assert stream != base.encode(photos[0])


# ---------------------------------------------------------------------- image modes, orientation


def _rgba_half_transparent() -> Image.Image:
    im = Image.new("RGBA", (300, 200), (255, 0, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, 150, 200))
    return im


@pytest.mark.parametrize(
    "make",
    [
        lambda: _rgba_half_transparent(),
        lambda: _rgba_half_transparent().convert("LA"),
        lambda: Image.new("L", (100, 80), 200),
        lambda: Image.new("1", (100, 80), 1),
        lambda: Image.new("CMYK", (100, 80), (0, 255, 255, 0)),
        lambda: Image.new("I;16", (100, 80), 65535),
        lambda: Image.new("I", (100, 80), 65535),
        lambda: Image.new("F", (100, 80), 255.0),
        lambda: Image.new("RGB", (120, 90), (10, 200, 30)).convert("P", palette=Image.ADAPTIVE),
        lambda: Image.new("YCbCr", (100, 80), (128, 128, 128)),
    ],
    ids=["RGBA", "LA", "L", "1", "CMYK", "I;16", "I", "F", "P", "YCbCr"],
)
def test_every_image_mode_becomes_rgb(jpeg_codec, make):
    image = make()
    as_file = _as_png(image) if image.mode not in ("CMYK", "F", "YCbCr", "I") else _as_tiff(image)
    for source in (image, as_file):
        stream = jpeg_codec.encode(source)
        decoded = jpeg_codec.decode(stream)
        assert decoded.complete
        assert decoded.image.mode == "RGB"
        assert decoded.image.size == (256, 256)


def test_transparency_is_composited_over_white(jpeg_codec):
    prepared = np.asarray(jpeg_codec.prepare(_rgba_half_transparent()))
    assert (prepared[:, :40] >= 250).all()  # transparent left part -> white
    assert prepared[:, -40:, 0].min() > 240
    assert prepared[:, -40:, 1:].max() < 15


def test_palette_with_transparency_and_16_bit_grey(jpeg_codec):
    p = Image.new("P", (64, 64), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert (np.asarray(jpeg_codec.prepare(p)) == 255).all()
    grey16 = np.asarray(jpeg_codec.prepare(Image.new("I;16", (64, 64), 32896)))
    assert (grey16 == 128).all()


def _as_tiff(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    return buf.getvalue()


def _as_png(image: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **params)
    return buf.getvalue()


# The transpose that EXIF orientation n asks a viewer to apply (Pillow's ImageOps.exif_transpose table).
ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE = {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(jpeg_codec, photos, orientation):
    upright = Image.open(photos[0]).convert("RGB")
    stored = upright
    if orientation in ORIENTATION_FIX:
        fix = ORIENTATION_FIX[orientation]
        stored = upright.transpose(INVERSE.get(fix, fix))
    exif = Image.Exif()
    exif[0x0112] = orientation
    assert jpeg_codec.encode(_as_png(stored, exif=exif.tobytes())) == jpeg_codec.encode(upright)


# ---------------------------------------------------------------------- bad input


def test_corrupt_and_non_image_files_name_the_file(jpeg_codec, photos, tmp_path):
    cases = {
        "random.jpg": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty.jpg": b"",
        "notes.txt": b"not an image at all\n",
        "truncated.jpg": photos[0].read_bytes()[:3000],
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CodecError, match=re.escape(str(path))) as error:
            jpeg_codec.encode(path)
        assert error.value.reason == ("truncated" if name == "truncated.jpg" else "corrupt")
    with pytest.raises(CodecError, match="missing.jpg"):
        jpeg_codec.encode(tmp_path / "missing.jpg")
    with pytest.raises(CodecError, match="array"):
        jpeg_codec.encode(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(CodecError, match="bytes"):
        jpeg_codec.encode(b"\x00" * 10)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size and holds no pixels: opening reads the size, decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_decompression_bombs_are_refused_before_decoding(tmp_path, photos):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(10_000, 10_000))  # 100M pixels: over our cap, under Pillow's error
    with pytest.raises(CodecError, match=r"bomb\.png.*max_pixels") as error:
        JpegCodec().encode(bomb)
    assert error.value.reason == "too_large"
    bomb.write_bytes(_png_header_only(40_000, 40_000))  # over Pillow's own limit as well
    with pytest.raises(CodecError, match="bomb.png"):
        JpegCodec().encode(bomb)
    with pytest.raises(CodecError, match="max_pixels=1000"):
        JpegCodec(max_pixels=1000).encode(photos[0])


# ---------------------------------------------------------------------- tables, to_jpeg


def test_tables_round_trip_to_pillows_full_file(jpeg_codec, photos):
    prepared = jpeg_codec.prepare(photos[2])
    full = io.BytesIO()
    prepared.save(full, format="JPEG", quality=25, subsampling="4:2:0", restart_marker_blocks=1)
    stream = jpeg_codec.encode(photos[2])
    assert jpeg_codec.to_jpeg(stream) == full.getvalue()
    tables = jpeg_codec.tables
    assert tables.startswith(b"\xff\xd8\xff\xdb")
    assert tables.endswith(b"\xff\xd9")
    assert tables.count(b"\xff\xdb") == 2
    assert tables.count(b"\xff\xc4") == 4


def test_to_jpeg_opens_in_pillow(jpeg_codec, jpeg_streams):
    for stream in jpeg_streams[:4]:
        with Image.open(io.BytesIO(jpeg_codec.to_jpeg(stream))) as im:
            im.load()
            assert im.format == "JPEG"
            assert im.size == (256, 256)
            assert im.mode == "RGB"
            assert np.array_equal(np.asarray(im), np.asarray(jpeg_codec.decode(stream).image))


def test_to_jpeg_rejects_what_is_not_a_stream(jpeg_codec):
    with pytest.raises(ValueError, match="SOF0"):
        jpeg_codec.to_jpeg(b"hello")


# ---------------------------------------------------------------------- decode


def test_full_stream_decodes_complete(jpeg_codec, jpeg_streams):
    for stream in jpeg_streams:
        decoded = jpeg_codec.decode(stream)
        assert decoded.complete
        assert decoded.fraction == 1.0


def test_every_truncation_point_of_a_small_image(photos):
    codec = JpegCodec(size=64)  # 16 MCUs: every byte position is cheap to try
    stream = codec.encode(photos[0])
    previous = 0.0
    for cut in range(len(stream) + 1):
        decoded = codec.decode(stream[:cut])
        assert decoded.image.size == (64, 64)
        assert decoded.fraction >= previous, cut
        assert decoded.complete == (cut == len(stream))
        previous = decoded.fraction
    assert previous == 1.0


def test_truncation_points_of_a_full_size_image(jpeg_codec, jpeg_streams):
    stream = min(jpeg_streams, key=len)
    previous = 0.0
    for cut in range(len(stream)):
        decoded = jpeg_codec.decode(stream[:cut])
        assert decoded.fraction >= previous
        assert not decoded.complete
        previous = decoded.fraction
    # Right after the n-th marker exactly n MCUs are whole.
    for n, match in enumerate(RST.finditer(stream), start=1):
        if n % 17 == 0:
            assert jpeg_codec.decode(stream[: match.end()]).fraction == n / 256


def test_truncated_stream_is_grey_where_data_ends(jpeg_codec, jpeg_streams):
    stream = jpeg_streams[3]
    half = [m.end() for m in RST.finditer(stream)][127]  # 128 MCUs = the top 8 MCU rows
    decoded = jpeg_codec.decode(stream[:half])
    pixels = np.asarray(decoded.image)
    assert decoded.fraction == 0.5
    assert (pixels[128:] == 128).all()
    assert pixels[:128].std() > 10  # the top half holds the photo
    full = np.asarray(jpeg_codec.decode(stream).image)
    # Equal to the full decode but for the last rows, where libjpeg's chroma upsampling blends in the row below.
    assert np.array_equal(pixels[:126], full[:126])


def test_garbage_never_raises(jpeg_codec, jpeg_streams):
    rng = np.random.default_rng(1)
    stream = jpeg_streams[0]
    garbage = [b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff\xda", b"\xff\xda\xff\xff", jpeg_codec.header]
    garbage += [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 7, 100, 5000, 20000)]
    garbage += [jpeg_codec.header + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()]
    # A header claiming a 65535x65535 frame must not make anything big.
    huge = stream.replace(b"\xff\xc0\x00\x11\x08\x01\x00\x01\x00", b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff", 1)
    garbage += [huge, stream[:2000] + b"\xff\xc4\x00\x05" + stream[2000:], stream + stream]
    for _ in range(30):  # random byte flips
        mutated = bytearray(stream)
        for i in rng.integers(0, len(stream), 5):
            mutated[i] = int(rng.integers(0, 256))
        garbage.append(bytes(mutated))
    for data in garbage:
        decoded = jpeg_codec.decode(data)
        assert decoded.image.size == (256, 256)
        assert decoded.image.mode == "RGB"
        assert 0.0 <= decoded.fraction <= 1.0
    assert not jpeg_codec.decode(huge).complete
    assert not jpeg_codec.decode(stream + stream).complete


def test_complete_needs_order_end_and_nothing_after(jpeg_codec, jpeg_streams):
    stream = jpeg_streams[0]
    assert not jpeg_codec.decode(stream[:-2]).complete  # no EOI
    assert jpeg_codec.decode(stream[:-2]).fraction == 1.0
    assert not jpeg_codec.decode(stream + b"\x00").complete
    swapped = stream.replace(b"\xff\xd0", b"\xff\xd9", 1)
    assert not jpeg_codec.decode(swapped).complete
    first, second = [m.start() for m in RST.finditer(stream)][:2]
    out_of_order = bytearray(stream)
    out_of_order[first + 1], out_of_order[second + 1] = out_of_order[second + 1], out_of_order[first + 1]
    assert not jpeg_codec.decode(bytes(out_of_order)).complete


# ---------------------------------------------------------------------- prompt


@pytest.mark.parametrize("ratio", [0.25, 0.375, 0.4375, 0.5, 0.75, 0.99])
def test_prompt_cuts_right_after_the_kth_ffd7(jpeg_codec, jpeg_streams, ratio):
    stream = jpeg_streams[1]
    k = int(32 * ratio)
    prompt = jpeg_codec.prompt(stream, ratio)
    assert stream.startswith(prompt)
    assert prompt.endswith(b"\xff\xd7")
    assert prompt.count(b"\xff\xd7") == k
    assert jpeg_codec.decode(prompt).fraction == k / 32


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5, 0.01])
def test_prompt_refuses_ratios_outside_the_protocol(jpeg_codec, jpeg_streams, ratio):
    with pytest.raises(ValueError, match="ratio"):
        jpeg_codec.prompt(jpeg_streams[0], ratio)


def test_prompt_of_a_short_stream_is_a_clear_error(jpeg_codec, jpeg_streams):
    with pytest.raises(ValueError, match="fewer than 24"):
        jpeg_codec.prompt(jpeg_streams[0][:1000], 0.75)


# ---------------------------------------------------------------------- spec


def test_spec_round_trips_through_json(jpeg_codec, jpeg_streams):
    spec = json.loads(json.dumps(jpeg_codec.spec))
    assert spec["codec"] == "jpeg"
    assert spec["quality"] == 25
    assert spec["libjpeg"]
    rebuilt = codec_from_spec(spec)
    assert isinstance(rebuilt, JpegCodec)
    assert rebuilt.spec == jpeg_codec.spec
    assert rebuilt.decode(jpeg_streams[0]).complete
    other = JpegCodec.from_spec(JpegCodec(size=128, quality=40).spec)
    assert (other.size, other.quality) == (128, 40)


def test_spec_with_other_tables_is_refused(jpeg_codec):
    spec = dict(jpeg_codec.spec, tables_sha256="0" * 64, pillow="9.0.0", libjpeg="9")
    with pytest.raises(CodecError, match=r"tables differ.*Pillow 9\.0\.0"):
        JpegCodec.from_spec(spec)
    with pytest.raises(CodecError, match="expected a 'jpeg' codec spec"):
        JpegCodec.from_spec({"codec": "avc"})
    with pytest.raises(CodecError, match="lacks"):
        JpegCodec.from_spec({"codec": "jpeg", "size": 256})
    with pytest.raises(CodecError, match="unknown codec"):
        codec_from_spec({"codec": "webp"})
