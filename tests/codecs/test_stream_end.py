"""``stream_end``: where the first whole image (JPEG) or clip (AVC) of a growing stream ends."""

from __future__ import annotations

import numpy as np
import pytest
from media import PHOTOS, pan_frames

from jpeglm.codecs import AvcCodec

# ---------------------------------------------------------------------- JPEG


def test_jpeg_ends_just_after_eoi(jpeg_codec, jpeg_streams):
    for stream in jpeg_streams[:3]:
        assert stream.endswith(b"\xff\xd9")
        assert jpeg_codec.stream_end(stream) == len(stream)
        assert jpeg_codec.stream_end(stream + b"\x12\xff\xd9 more") == len(stream)  # the first image only


def test_jpeg_prefixes_are_not_complete(jpeg_codec, jpeg_streams):
    stream = jpeg_streams[0]
    cuts = [0, 1, 2, 20, len(jpeg_codec.header) - 1, len(jpeg_codec.header), len(stream) // 2]
    cuts += range(len(stream) - 300, len(stream))  # every cut near the end, the last one half a marker
    for cut in cuts:
        assert jpeg_codec.stream_end(stream[:cut]) is None, cut
    assert jpeg_codec.stream_end(jpeg_codec.prompt(stream, 0.5)) is None  # restart markers do not end a scan


def test_jpeg_scan_starts_after_a_foreign_header(jpeg_codec, jpeg_streams):
    stream = jpeg_streams[1]
    full = jpeg_codec.to_jpeg(stream)  # tables re-inserted: the header is not the codec's own
    assert not full.startswith(jpeg_codec.header)
    assert jpeg_codec.stream_end(full) == len(full)
    assert jpeg_codec.stream_end(full[:-1]) is None
    assert jpeg_codec.stream_end(b"\xff\xd8\xff\xd9") is None  # EOI without a scan header: no scan yet
    assert jpeg_codec.stream_end(b"") is None


def test_jpeg_scan_ends_at_any_marker_decode_stops_at(jpeg_codec, jpeg_streams):
    stream = jpeg_streams[2]
    cut = jpeg_codec.prompt(stream, 0.25)
    broken = cut + b"\x12\x34\xff\xc4\x00\x05junk"  # model output that writes a DHT marker inside the scan
    assert jpeg_codec.stream_end(broken) == len(cut) + 4
    assert jpeg_codec.decode(broken).image == jpeg_codec.decode(broken[: len(cut) + 4]).image
    padded = stream[:-2] + b"\xff\xff\xff\xd9"  # fill bytes before EOI are allowed
    assert jpeg_codec.stream_end(padded) == len(padded)
    stuffed = cut + b"\xff\x00\x12"  # a stuffed 0xFF is data
    assert jpeg_codec.stream_end(stuffed) is None


# ---------------------------------------------------------------------- AVC


def small_avc(seconds: int) -> AvcCodec:
    return AvcCodec(width=64, height=48, fps=2, seconds=seconds)


@pytest.fixture(scope="module")
def six_frames() -> bytes:
    """A 6-frame stream from a pan over a photo (small, so it encodes in a moment)."""
    return small_avc(3).encode(np.stack(pan_frames(PHOTOS[0], 6, (64, 48))))


def test_avc_ends_where_the_next_frame_starts(six_frames):
    codec = small_avc(2)  # 4-frame clips
    end = codec.stream_end(six_frames)
    assert end == len(codec.prompt(six_frames, frames=4))
    assert six_frames[end:].startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01"))  # a start code
    assert small_avc(3).stream_end(six_frames) is None  # the whole clip, but nothing after it
    five_seconds = AvcCodec(width=64, height=48, fps=1, seconds=5)
    assert five_seconds.stream_end(six_frames) == len(codec.prompt(six_frames, frames=5))


def test_avc_end_is_known_once_the_next_frame_has_a_slice_header(six_frames):
    codec = small_avc(2)
    end = codec.stream_end(six_frames)
    results = [codec.stream_end(six_frames[:cut]) for cut in range(end - 50, len(six_frames) + 1, 7)]
    results += [codec.stream_end(six_frames[:cut]) for cut in range(end - 2, end + 60)]
    assert all(r in (None, end) for r in results)
    assert all(codec.stream_end(six_frames[:cut]) is None for cut in range(end - 50, end + 1))
    assert codec.stream_end(six_frames[: end + 400]) == end


def test_avc_clip_followed_by_another_clip(six_frames):
    codec = small_avc(2)
    four = codec.encode(np.stack(pan_frames(PHOTOS[1], 4, (64, 48))))
    assert codec.stream_end(four) is None
    assert codec.stream_end(four + four) == len(four)  # its SPS, PPS and SEI open frame 5
    assert codec.stream_end(four + six_frames) == len(four)
    assert codec.stream_end(b"") is None
    # Pictures are counted by their first slices, headers or not: here the fifth one-slice picture opens at 20.
    assert codec.stream_end(b"\x00\x00\x01\x65\x88" * 10) == 20
