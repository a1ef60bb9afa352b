"""The Codec protocol: both codecs implement every member, so callers never branch on ``codec.name``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from media import PHOTOS, pan_frames
from PIL import Image
from typing_extensions import get_protocol_members

from jpeglm.codecs import AvcCodec, Codec, Decoded, DecodedImage, DecodedVideo, JpegCodec, codec_from_spec

MEMBERS = {
    "name",
    "file_suffix",
    "spec",
    "from_spec",
    "encode",
    "decode",
    "stream_end",
    "prompt",
    "prompt_share",
    "grammar",
    "to_file",
    "preview",
    "reference",
}
GAP = 4  # white pixels between the frames of a video preview


def small_avc() -> AvcCodec:
    """6-frame clips of 64x48 (12 slices a frame): quick to encode."""
    return AvcCodec(width=64, height=48, fps=2, seconds=3)


@pytest.fixture(scope="module")
def avc() -> AvcCodec:
    return small_avc()


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """(6, 64, 96, 3): wider than the codec's 4:3, so the codec pads it."""
    return np.stack(pan_frames(PHOTOS[0], 6, (96, 64)))


@pytest.fixture(scope="module")
def avc_stream(avc: AvcCodec, clip: np.ndarray) -> bytes:
    return avc.encode(clip)


@pytest.fixture(scope="module")
def avc_decoded(avc: AvcCodec, avc_stream: bytes) -> DecodedVideo:
    return avc.decode(avc_stream)


def mp4_frames(data: bytes) -> np.ndarray:
    """(T, H, W, 3) uint8: every frame PyAV decodes from an MP4 file."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def jpeg_q95(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# ---------------------------------------------------------------------- the protocol


def test_protocol_members():
    assert get_protocol_members(Codec) == MEMBERS
    for name in MEMBERS - {"name", "file_suffix"}:
        member = Codec.__dict__[name]
        doc = (member.fget if isinstance(member, property) else getattr(member, "__func__", member)).__doc__
        assert "Returns:" in (doc or ""), name  # Google style


def test_both_codecs_are_codecs(avc: AvcCodec, jpeg_codec: JpegCodec):
    for codec, name, suffix in [(jpeg_codec, "jpeg", ".jpg"), (avc, "avc", ".mp4")]:
        assert isinstance(codec, Codec)
        assert (codec.name, codec.file_suffix) == (name, suffix)
        assert codec.spec["codec"] == name
        assert isinstance(codec_from_spec(codec.spec), type(codec))
        decoded = codec.decode(b"garbage")
        assert isinstance(decoded, Decoded)
        assert (decoded.complete, decoded.fraction) == (False, 0.0)
    assert not isinstance(object(), Codec)


def test_isinstance_checks_every_member():
    for missing in MEMBERS:
        partial = type("Partial", (), {name: getattr(JpegCodec, name) for name in MEMBERS - {missing}})
        assert not isinstance(partial(), Codec), missing
    whole = type("Whole", (), {name: getattr(JpegCodec, name) for name in MEMBERS})
    assert isinstance(whole(), Codec)


def test_decode_results_are_decoded():
    assert isinstance(DecodedImage(Image.new("RGB", (16, 16)), complete=True, fraction=1.0), Decoded)
    assert isinstance(DecodedVideo(np.zeros((1, 16, 16, 3), np.uint8), complete=False, fraction=0.5), Decoded)
    assert not isinstance(object(), Decoded)


def write_sample(codec: Codec, media: Any, stem: Path) -> tuple[Path, np.ndarray]:
    """What a caller does with any codec, with no branch on its name: a file and a preview of a half stream."""
    stream = codec.encode(media)
    decoded = codec.decode(stream[: len(stream) // 2])
    path = stem.with_suffix(codec.file_suffix)
    path.write_bytes(codec.to_file(stream[: len(stream) // 2], decoded))
    return path, codec.preview(decoded)


def test_one_caller_for_both_codecs(avc: AvcCodec, jpeg_codec: JpegCodec, clip: np.ndarray, tmp_path: Path):
    path, preview = write_sample(jpeg_codec, PHOTOS[1], tmp_path / "image")
    assert path.name == "image.jpg"
    with Image.open(path) as im:
        assert (im.format, im.size) == ("JPEG", (256, 256))
    assert preview.shape == (256, 256, 3)
    path, preview = write_sample(avc, clip, tmp_path / "video")
    assert path.name == "video.mp4"
    assert mp4_frames(path.read_bytes()).shape == (6, 48, 64, 3)
    assert preview.shape == (48, 6 * 64 + 5 * GAP, 3)


# ---------------------------------------------------------------------- to_file


def test_jpeg_to_file_of_a_complete_stream_is_to_jpeg(jpeg_codec: JpegCodec, jpeg_streams: list[bytes]):
    stream = jpeg_streams[0]
    decoded = jpeg_codec.decode(stream)
    assert decoded.complete
    assert jpeg_codec.to_file(stream) == jpeg_codec.to_jpeg(stream)
    assert jpeg_codec.to_file(stream, decoded) == jpeg_codec.to_jpeg(stream)


def test_jpeg_to_file_of_a_truncated_stream_opens(jpeg_codec: JpegCodec, jpeg_streams: list[bytes]):
    cut = jpeg_streams[0][: len(jpeg_streams[0]) // 2]
    decoded = jpeg_codec.decode(cut)
    assert not decoded.complete
    data = jpeg_codec.to_file(cut)
    assert data == jpeg_q95(decoded.image)  # the best-effort decode at quality 95, not the broken stream
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.size) == ("JPEG", (256, 256))
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(pixels - np.asarray(decoded.image)).mean() < 3
    assert np.abs(pixels[-16:] - 128).max() < 8  # the part the stream never reached is grey


def test_jpeg_to_file_uses_the_callers_decode(jpeg_streams: list[bytes], monkeypatch: pytest.MonkeyPatch):
    codec = JpegCodec()
    cut = jpeg_streams[1][:3000]
    decoded = codec.decode(cut)
    monkeypatch.setattr(codec, "decode", lambda stream: pytest.fail("decoded again"))
    assert codec.to_file(cut, decoded) == jpeg_q95(decoded.image)


def test_avc_to_file_of_a_complete_stream_is_to_mp4(avc: AvcCodec, avc_stream: bytes, avc_decoded: DecodedVideo):
    assert avc_decoded.complete
    assert avc.to_file(avc_stream) == avc.to_mp4(avc_stream)
    assert avc.to_file(avc_stream, avc_decoded) == avc.to_mp4(avc_stream)


def test_avc_to_file_of_a_truncated_stream_plays(avc: AvcCodec, avc_stream: bytes, monkeypatch: pytest.MonkeyPatch):
    cut = avc_stream[: len(avc_stream) * 2 // 3]
    decoded = avc.decode(cut)
    assert not decoded.complete
    data = avc.to_file(cut)
    assert data == avc.to_mp4(avc.encode(list(decoded.frames)))
    with av.open(io.BytesIO(avc.to_mp4(cut))) as muxed:  # the cut stream itself lacks frames...
        assert sum(packet.size > 0 for packet in muxed.demux(video=0)) < avc.frames_per_clip
    frames = mp4_frames(data)  # ...the file has them all, grey where the stream broke off
    assert frames.shape == (avc.frames_per_clip, 48, 64, 3)
    assert np.abs(frames.astype(int) - decoded.frames).mean() < 12
    assert np.abs(frames[-1].astype(int) - 128).max() < 8
    codec = small_avc()
    monkeypatch.setattr(codec, "decode", lambda stream: pytest.fail("decoded again"))
    assert codec.to_file(cut, decoded) == data


# ---------------------------------------------------------------------- preview


def test_jpeg_preview_is_the_image(jpeg_codec: JpegCodec, jpeg_streams: list[bytes]):
    decoded = jpeg_codec.decode(jpeg_streams[2][:4000])
    preview = jpeg_codec.preview(decoded)
    assert preview.shape == (256, 256, 3)
    assert preview.dtype == np.uint8
    np.testing.assert_array_equal(preview, np.asarray(decoded.image))
    np.testing.assert_array_equal(jpeg_codec.preview(decoded, max_frames=1), preview)


@pytest.mark.parametrize(("max_frames", "shown"), [(8, [0, 2, 4, 6, 8, 10, 12, 14]), (5, [0, 3, 6, 9, 12]), (1, [0])])
def test_video_preview_is_a_strip_of_evenly_stepped_frames(max_frames: int, shown: list[int]):
    codec = AvcCodec()  # 15 frames of 256x144; preview needs no encoding
    frames = np.broadcast_to(np.arange(15, dtype=np.uint8)[:, None, None, None] * 10, (15, 144, 256, 3))
    preview = codec.preview(DecodedVideo(frames.copy(), complete=False, fraction=0.0), max_frames=max_frames)
    n = len(shown)
    assert preview.shape == (144, n * 256 + (n - 1) * GAP, 3)
    assert preview.dtype == np.uint8
    for panel, index in enumerate(shown):
        left = panel * (256 + GAP)
        np.testing.assert_array_equal(preview[:, left : left + 256], frames[index])
        if panel < n - 1:
            assert (preview[:, left + 256 : left + 256 + GAP] == 255).all()


def test_video_preview_of_a_decode(avc: AvcCodec, avc_decoded: DecodedVideo):
    preview = avc.preview(avc_decoded)
    assert preview.shape == (48, 6 * 64 + 5 * GAP, 3)  # 6 frames, fewer than max_frames: all of them
    np.testing.assert_array_equal(preview[:, -64:], avc_decoded.frames[-1])
    with pytest.raises(ValueError, match="max_frames"):
        avc.preview(avc_decoded, max_frames=0)


# ---------------------------------------------------------------------- AVC prompt by ratio


@pytest.mark.parametrize("ratio", [0.001, 0.1, 0.2, 0.34, 0.5, 0.66, 0.99])
def test_avc_prompt_ratio_keeps_whole_frames(avc: AvcCodec, avc_stream: bytes, avc_decoded: DecodedVideo, ratio):
    frames = max(1, int(ratio * avc.frames_per_clip))
    prompt = avc.prompt(avc_stream, ratio)
    assert prompt == avc.prompt(avc_stream, frames=frames)
    assert prompt == avc.prompt(avc_stream, ratio=ratio)
    kept = avc.decode(prompt).frames
    np.testing.assert_array_equal(kept[:frames], avc_decoded.frames[:frames])
    assert (kept[frames:] == 128).all()


def test_avc_prompt_ratio_rounds_down_to_at_least_one_frame(avc: AvcCodec, avc_stream: bytes):
    lengths = {ratio: len(avc.prompt(avc_stream, ratio)) for ratio in (1e-9, 0.1, 1 / 6 - 1e-9, 1 / 6 + 1e-9, 0.49)}
    one, two = len(avc.prompt(avc_stream, frames=1)), len(avc.prompt(avc_stream, frames=2))
    assert lengths == {1e-9: one, 0.1: one, 1 / 6 - 1e-9: one, 1 / 6 + 1e-9: one, 0.49: two}
    assert len(avc.prompt(avc_stream, 0.5)) == len(avc.prompt(avc_stream, frames=3))


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, 1.5, -0.2, 4])
def test_avc_prompt_ratio_outside_0_1(avc: AvcCodec, avc_stream: bytes, ratio):
    with pytest.raises(ValueError, match=r"inside \(0, 1\)"):
        avc.prompt(avc_stream, ratio)


def test_avc_prompt_takes_exactly_one_of_ratio_and_frames(avc: AvcCodec, avc_stream: bytes):
    with pytest.raises(ValueError, match="exactly one"):
        avc.prompt(avc_stream)
    with pytest.raises(ValueError, match="exactly one"):
        avc.prompt(avc_stream, 0.5, frames=3)
    with pytest.raises(ValueError, match="frames=4"):
        avc.prompt(avc_stream, 4)  # a frame count passed as the ratio: the message says how to pass it


# ---------------------------------------------------------------------- reference


def test_jpeg_reference_is_the_prepared_image(jpeg_codec: JpegCodec):
    reference = jpeg_codec.reference(PHOTOS[0])
    with Image.open(PHOTOS[0]) as im:
        assert im.size[0] != im.size[1]  # cropped and resized
    assert reference.shape == (256, 256, 3)
    assert reference.dtype == np.uint8
    np.testing.assert_array_equal(reference, np.asarray(jpeg_codec.prepare(PHOTOS[0])))
    assert jpeg_codec.encode(reference) == jpeg_codec.encode(PHOTOS[0])


def test_avc_reference_is_the_clip_before_x264(avc: AvcCodec, clip: np.ndarray, avc_decoded: DecodedVideo):
    reference = avc.reference(clip)
    assert reference.shape == (6, 48, 64, 3)
    assert reference.dtype == np.uint8
    # 96x64 fits 64x48 as 64x42, padded with black: 2 rows above, 4 below (FFmpeg's pad keeps the offset even).
    assert reference[:, :2].max() < 24
    assert reference[:, -4:].max() < 24
    assert reference[:, 4:-4].std() > 20
    error = np.abs(reference.astype(int) - avc_decoded.frames).mean()
    assert error < 10, error  # what x264 was given: the decode differs only by QP 37's loss
    assert avc.reference(np.concatenate([clip, clip])).shape == (6, 48, 64, 3)  # the first frames_per_clip
    assert avc.reference(list(clip[:4])).shape == (4, 48, 64, 3)  # a short clip is not padded


# ---------------------------------------------------------------------- prompt_share


def test_prompt_share_is_what_prompt_keeps(avc: AvcCodec, avc_stream: bytes):
    small = JpegCodec(size=64)  # 16 restart intervals: 2 FFD7 markers
    stream = small.encode(PHOTOS[0])
    assert [small.prompt_share(r) for r in (0.5, 0.75, 0.99)] == [0.5, 0.5, 0.5]
    assert small.prompt(stream, 0.75) == small.prompt(stream, 0.5)  # the same share: the same prompt
    big = JpegCodec(size=256)
    assert [big.prompt_share(r) for r in (0.25, 0.5, 0.75, 0.3)] == [0.25, 0.5, 0.75, 9 / 32]  # 32 FFD7 markers
    with pytest.raises(ValueError, match=r"16 restart intervals, so 2 FFD7 marker\(s\) and ratios in steps of 0.5"):
        small.prompt_share(0.25)
    with pytest.raises(ValueError, match="16 restart intervals"):
        small.prompt(stream, 0.25)
    for ratio in (0.1, 0.5, 0.7):
        frames = max(1, int(ratio * avc.frames_per_clip))
        assert avc.prompt_share(ratio) == frames / avc.frames_per_clip
        assert avc.prompt(avc_stream, ratio) == avc.prompt(avc_stream, frames=frames)
