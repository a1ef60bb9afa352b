"""Tests of the H.264 (AVC-LM) codec on videos made here with PyAV from real photos."""

from __future__ import annotations

import io
import itertools
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
from media import FPS, PHOTOS, SECONDS, SIZE, pan_frames, write_video
from PIL import Image

from jpeglm.codecs.avc import AvcCodec, reference_clip
from jpeglm.codecs.base import CodecError

START_CODE = re.compile(rb"\x00\x00\x00?\x01")


@pytest.fixture(scope="module")
def codec() -> AvcCodec:
    return AvcCodec()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    frames = pan_frames(PHOTOS[0], FPS * SECONDS, SIZE)
    paths = {
        "pan": write_video(root / "pan.mp4", frames),
        "pan_audio": write_video(root / "pan_audio.mp4", frames, audio_seconds=SECONDS),
        "audio_only": write_video(root / "tone.m4a", None, audio_seconds=1.0),
    }
    paths["corrupt"] = root / "corrupt.mp4"
    paths["corrupt"].write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    data = paths["pan"].read_bytes()
    paths["truncated"] = root / "truncated.mp4"
    paths["truncated"].write_bytes(data[: len(data) // 3])  # moov is written last: nothing left to decode
    # With the index first, a cut file keeps the frames before the cut; this one keeps none.
    data = write_video(root / "pan_faststart.mp4", frames, faststart=True).read_bytes()
    paths["truncated_index_first"] = root / "truncated_index_first.mp4"
    paths["truncated_index_first"].write_bytes(data[: data.index(b"mdat") + 100])
    paths["half_index_first"] = root / "half_index_first.mp4"
    paths["half_index_first"].write_bytes(data[: len(data) // 2])
    return paths


@pytest.fixture(scope="module")
def stream(codec: AvcCodec, videos: dict[str, Path]) -> bytes:
    return codec.encode(videos["pan"])


@pytest.fixture(scope="module")
def decoded(codec: AvcCodec, stream: bytes):
    return codec.decode(stream)


def nal_types(data: bytes) -> list[int]:
    return [data[m.end()] & 0x1F for m in START_CODE.finditer(data) if m.end() < len(data)]


# ---------------------------------------------------------------------- encode


def test_encode_is_annex_b(codec: AvcCodec, stream: bytes):
    assert stream.startswith(b"\x00\x00\x00\x01") or stream.startswith(b"\x00\x00\x01")
    types = nal_types(stream)
    assert types[:3] == [7, 8, 6]  # SPS, PPS, x264's SEI
    assert types.count(5) == codec.slices_per_frame  # one IDR frame, one slice per macroblock
    assert types.count(1) + types.count(5) == codec.slices_per_frame * codec.frames_per_clip
    assert set(types) <= {1, 5, 6, 7, 8}
    assert b"ftyp" not in stream  # no container
    for setting in (b"slice_max_mbs=1", b"rc=cqp", b"qp=37", b"bframes=0", b"me=dia", b"trellis=0", b"psy=0"):
        assert setting in stream  # x264 writes its options into the SEI


def test_encode_is_deterministic(stream: bytes, videos: dict[str, Path]):
    other = AvcCodec()
    assert other.encode(videos["pan"]) == stream
    assert other.encode(str(videos["pan"])) == stream
    assert other.encode(videos["pan"].read_bytes()) == stream


def test_audio_track_is_ignored(codec: AvcCodec, stream: bytes, videos: dict[str, Path]):
    assert codec.encode(videos["pan_audio"]) == stream


def test_frame_sequences_agree(codec: AvcCodec):
    frames = pan_frames(PHOTOS[1], 20, (200, 150))
    from_arrays = codec.encode(frames)
    assert codec.encode(np.stack(frames)) == from_arrays
    assert codec.encode([Image.fromarray(frame) for frame in frames]) == from_arrays
    assert codec.encode(iter(frames)) == from_arrays  # any iterable; only the first frames_per_clip are read
    assert codec.encode(frames[: codec.frames_per_clip]) == from_arrays


def test_decode_reproduces_the_clip(codec: AvcCodec):
    frames = np.stack(pan_frames(PHOTOS[2], codec.frames_per_clip, (codec.width, codec.height)))
    result = codec.decode(codec.encode(frames))
    assert result.complete
    assert result.fraction == 1.0
    assert result.frames.shape == frames.shape
    assert result.frames.dtype == np.uint8
    error = np.abs(result.frames.astype(np.int16) - frames).mean()
    assert error < 12, error  # QP 37 is lossy, but the picture is the photo


def test_decode_of_video_file(codec: AvcCodec, decoded):
    assert decoded.complete
    assert decoded.fraction == 1.0
    assert decoded.frames.shape == (15, 144, 256, 3)
    # 320x240 (4:3) fits 256x144 as 192x144: black bars of 32 columns on each side.
    assert decoded.frames[:, :, :28].max() < 24
    assert decoded.frames[:, :, 36:220].std() > 20
    assert np.abs(np.diff(decoded.frames.astype(np.int16), axis=0)).mean() > 1  # the camera moves


def test_raw_h264_file_is_timed_from_its_headers(codec: AvcCodec):
    # An elementary stream has no timestamps: its frames are spaced at the rate its SPS states (3 fps here),
    # and a picture size change mid-stream goes through the filter graph.
    first = AvcCodec(width=128, height=96, seconds=4).encode(np.full((12, 96, 128, 3), 60, np.uint8))
    second = codec.encode(np.full((15, 144, 256, 3), 190, np.uint8))
    result = codec.decode(codec.encode(first + second))
    assert result.complete
    centre = result.frames[:, 72, 128].astype(int).mean(axis=-1)  # (T,)
    np.testing.assert_allclose(centre, [60] * 12 + [190] * 3, atol=8)


def test_truncated_file_keeps_the_frames_before_the_cut(codec: AvcCodec, videos: dict[str, Path], decoded):
    result = codec.decode(codec.encode(videos["half_index_first"]))  # half the bytes: part of the 5 s
    kept = int((result.frames != 128).any(axis=(1, 2, 3)).sum())
    assert 3 <= kept < 15
    assert not result.complete
    assert result.fraction == pytest.approx((kept * 144 - 1) / (15 * 144))
    assert (result.frames[kept:] == 128).all()
    assert np.abs(result.frames[:kept].astype(int) - decoded.frames[:kept]).mean() < 3  # same video


def test_short_clip_is_encoded_with_the_frames_it_has(codec: AvcCodec):
    frames = pan_frames(PHOTOS[3], 4, (codec.width, codec.height))
    result = codec.decode(codec.encode(frames))
    assert not result.complete
    assert 3 / codec.frames_per_clip < result.fraction < 4 / codec.frames_per_clip
    assert result.frames[:4].std() > 10
    assert (result.frames[4:] == 128).all()


# ---------------------------------------------------------------------- decode never raises


def test_truncation_never_raises_and_fraction_never_decreases(codec: AvcCodec, stream: bytes, decoded):
    cuts = sorted({*range(0, 80), *range(80, len(stream) - 80, 37), *range(len(stream) - 80, len(stream))})
    previous = 0.0
    for cut in cuts:
        result = codec.decode(stream[:cut])
        assert result.frames.shape == decoded.frames.shape
        assert not result.complete, cut
        assert previous <= result.fraction < 1.0, cut
        previous = result.fraction
    assert decoded.fraction >= previous


def test_garbage_never_raises(codec: AvcCodec, stream: bytes):
    rng = np.random.default_rng(1)
    starts = [match.start() for match in START_CODE.finditer(stream)] + [len(stream)]
    units = [stream[a:b] for a, b in itertools.pairwise(starts)]  # NAL units with their start codes
    cases = [b"", b"\x00", b"\x00\x00\x01", b"\x00\x00\x00\x01\x65", b"\x00\x00\x01\x67" + b"\xff" * 64, bytes(999)]
    for _ in range(20):
        cases.append(rng.integers(0, 256, int(rng.integers(1, 4000)), dtype=np.uint8).tobytes())
        noisy = bytearray(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
        for at in rng.integers(0, 2990, 40):
            noisy[at : at + 4] = b"\x00\x00\x00\x01"  # start codes make the decoder look at the noise
        cases.append(bytes(noisy))
        flipped = bytearray(stream)
        for at in rng.integers(100, len(flipped), 20):
            flipped[at] ^= 1 << int(rng.integers(0, 8))
        cases.append(bytes(flipped))
        order = rng.permutation(len(units))[: int(rng.integers(1, len(units)))]
        cases.append(b"".join(units[:3]) + b"".join(units[i] for i in order))  # headers, then shuffled slices
    for case in cases:
        result = codec.decode(case)
        assert result.frames.shape == (15, 144, 256, 3)
        assert result.frames.dtype == np.uint8
        assert 0.0 <= result.fraction <= 1.0
    assert codec.decode(b"").fraction == 0.0
    assert (codec.decode(b"").frames == 128).all()


def test_stream_of_another_size(codec: AvcCodec):
    small = AvcCodec(width=128, height=96)
    result = codec.decode(small.encode(np.full((15, 96, 128, 3), 200, np.uint8)))
    assert result.frames.shape == (15, 144, 256, 3)
    assert not result.complete
    assert np.abs(result.frames[:, :, 40:216].astype(int) - 200).max() < 8  # fitted to 192x144...
    assert result.frames[:, :, :28].max() < 24  # ...and padded black


def test_huge_stream_header_is_not_decoded(codec: AvcCodec):
    # The decoder refuses pictures much larger than the codec's, as it would a garbage SPS claiming them.
    huge = AvcCodec(width=1280, height=720).encode(np.zeros((2, 720, 1280, 3), np.uint8))
    result = codec.decode(huge)
    assert not result.complete
    assert (result.frames == 128).all()


# ---------------------------------------------------------------------- prompts and MP4


@pytest.mark.parametrize("frames", [1, 4, 14])
def test_prompt_holds_the_first_frames(codec: AvcCodec, stream: bytes, decoded, frames: int):
    prompt = codec.prompt(stream, frames=frames)
    assert stream.startswith(prompt)
    rest = stream[len(prompt) :]
    assert START_CODE.match(rest) is not None  # the cut is at a start code...
    assert not prompt.endswith(b"\x00")  # ...before its first zero
    assert nal_types(prompt)[:3] == [7, 8, 6]
    assert nal_types(prompt).count(1) + nal_types(prompt).count(5) == frames * codec.slices_per_frame
    result = codec.decode(prompt)
    np.testing.assert_array_equal(result.frames[:frames], decoded.frames[:frames])
    assert (result.frames[frames:] == 128).all()
    assert not result.complete
    assert result.fraction == pytest.approx((frames * codec.slices_per_frame - 1) / (15 * codec.slices_per_frame))


@pytest.mark.parametrize("frames", [0, -1, 15, 16])
def test_prompt_out_of_range(codec: AvcCodec, stream: bytes, frames: int):
    with pytest.raises(ValueError, match="frames"):
        codec.prompt(stream, frames=frames)


def test_prompt_of_a_prompt(codec: AvcCodec, stream: bytes):
    assert codec.prompt(codec.prompt(stream, frames=5), frames=2) == codec.prompt(stream, frames=2)
    with pytest.raises(ValueError, match="frames"):
        codec.prompt(b"garbage", frames=1)


def test_to_mp4_plays(codec: AvcCodec, stream: bytes, decoded):
    mp4 = codec.to_mp4(stream)
    assert mp4[4:8] == b"ftyp"
    with av.open(io.BytesIO(mp4)) as container:
        track = container.streams.video[0]
        assert track.average_rate == codec.fps
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(track)]
        assert float(track.duration * track.time_base) == pytest.approx(codec.seconds)
    assert len(frames) == codec.frames_per_clip
    np.testing.assert_array_equal(np.stack(frames), decoded.frames)


def test_to_mp4_refuses_garbage(codec: AvcCodec):
    with pytest.raises(CodecError, match="MP4"):
        codec.to_mp4(b"not a video")


# ---------------------------------------------------------------------- spec


def test_spec_round_trip(codec: AvcCodec, stream: bytes, videos: dict[str, Path]):
    spec = json.loads(json.dumps(codec.spec))
    assert spec["codec"] == "avc"
    assert spec["x264_options"]["x264-params"].startswith("bframes=0:slice-max-mbs=1:")
    assert spec["av_version"] == av.__version__
    assert spec["x264_version"].startswith("core ")
    assert spec["reference_sha256"] == AvcCodec().spec["reference_sha256"]
    rebuilt = AvcCodec.from_spec(spec)
    assert rebuilt.spec == codec.spec
    assert rebuilt.encode(videos["pan"]) == stream


def test_spec_depends_on_settings():
    assert AvcCodec(qp=30).spec["reference_sha256"] != AvcCodec().spec["reference_sha256"]
    assert reference_clip().shape == (6, 90, 120, 3)


def test_spec_mismatch_is_a_clear_error(codec: AvcCodec):
    tampered = {**codec.spec, "reference_sha256": "0" * 64, "av_version": "0.0.1"}
    with pytest.raises(CodecError, match=r"reference_sha256.*written with av 0\.0\.1, x264 core.*installed: av"):
        AvcCodec.from_spec(tampered)
    options = {**codec.spec["x264_options"], "x264-params": "bframes=3"}
    with pytest.raises(CodecError, match="x264_options"):
        AvcCodec.from_spec({**codec.spec, "x264_options": options})
    with pytest.raises(CodecError, match="'avc'"):
        AvcCodec.from_spec({**codec.spec, "codec": "jpeg"})
    with pytest.raises(CodecError, match="lacks"):
        AvcCodec.from_spec({key: value for key, value in codec.spec.items() if key != "reference_sha256"})


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "message", "reason"),
    [
        ("corrupt", "not a readable media file", "corrupt"),
        ("truncated", "not a readable media file|no decodable", "corrupt"),
        ("audio_only", "no video stream", "no_video"),
        ("truncated_index_first", "no decodable video frame", "corrupt"),
    ],
)
def test_bad_files_name_the_file(codec: AvcCodec, videos: dict[str, Path], name: str, message: str, reason: str):
    path = videos[name]
    with pytest.raises(CodecError, match=message) as error:
        codec.encode(path)
    assert str(path) in str(error.value)
    assert error.value.reason == reason
    with pytest.raises(CodecError, match=f"<{path.stat().st_size} bytes>"):
        codec.encode(path.read_bytes())


def test_missing_and_non_media_files(codec: AvcCodec, tmp_path: Path):
    with pytest.raises(CodecError, match="missing.mp4"):
        codec.encode(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)
    with pytest.raises(CodecError, match="notes.mp4"):
        codec.encode(text)


@pytest.mark.parametrize(
    ("video", "message"),
    [
        ([], "no frames"),
        ([np.zeros((32, 32), np.uint8)], r"frame 0 is <array \(32, 32\) uint8>"),
        ([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 4), np.uint8)], "frame 1"),
        ([np.zeros((32, 32, 3), np.float32)], "float32"),
        ([np.zeros((0, 32, 3), np.uint8)], "empty"),
        (["frame.png"], "frame 0 is frame.png"),
        (np.zeros((5, 32, 32, 3), np.float64), r"<array \(5, 32, 32, 3\) float64>"),
        (np.zeros((32, 32, 3), np.uint8), r"\(T, H, W, 3\)"),
        (Image.new("RGB", (32, 32)), "sequence of frames"),
        (42, "sequence of frames"),
    ],
)
def test_bad_frames(codec: AvcCodec, video, message: str):
    with pytest.raises(CodecError, match=message):
        codec.encode(video)


def test_pixel_cap(videos: dict[str, Path]):
    capped = AvcCodec(max_pixels=100 * 100)
    with pytest.raises(
        CodecError, match=rf"{re.escape(str(videos['pan']))}: frame of 320x240 exceeds max_pixels"
    ) as error:
        capped.encode(videos["pan"])
    assert error.value.reason == "too_large"
    with pytest.raises(CodecError, match="frame 0.*exceeds max_pixels"):
        capped.encode([Image.new("RGB", (200, 100))])
    with pytest.raises(CodecError, match="exceeds max_pixels"):
        capped.encode(np.zeros((2, 101, 100, 3), np.uint8))


@pytest.mark.parametrize(
    "settings", [{"width": 255}, {"height": 8}, {"fps": 0}, {"seconds": 0}, {"qp": 0}, {"qp": 52}, {"max_pixels": 0}]
)
def test_bad_settings(settings: dict):
    with pytest.raises(ValueError, match="must"):
        AvcCodec(**settings)


def test_fraction_counts_only_what_the_stream_drew(codec: AvcCodec, stream: bytes, decoded):
    """Slices that do not decode (no parameter sets, garbled data: grey or concealed frames) count for nothing."""
    assert decoded.fraction == 1.0
    starts = [match.start() for match in START_CODE.finditer(stream)] + [len(stream)]
    units = [stream[a:b] for a, b in itertools.pairwise(starts)]
    slices_only = b"".join(u for u in units if nal_types(u)[0] in (1, 5))  # no SPS or PPS: nothing can be drawn
    grey = codec.decode(slices_only)
    assert (grey.frames == 128).all()
    assert grey.fraction == 0.0  # counted its delimited slice NAL units before: flat grey reported as drawn
    two = codec.prompt(stream, frames=2)
    rng = np.random.default_rng(0)
    garbled = bytearray(stream)
    for at in range(len(two) + 8, len(stream), 5):  # every fifth byte after the second frame
        garbled[at] = int(rng.integers(1, 256))
    result = codec.decode(bytes(garbled))
    assert codec.decode(two).fraction == pytest.approx(2 / 15, abs=1.5 / codec.slices_per_frame / 15)
    assert result.fraction <= 2 / 15 + 1 / 15  # the first two frames, and at most a frame's worth of luck
