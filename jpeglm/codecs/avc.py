"""H.264 codec of AVC-LM: video clips become Annex-B byte streams that a language model learns to write.

The settings are the JPEG-LM paper's (arXiv 2408.08459): the first ``seconds`` of a video at ``fps``,
scaled to fit ``width`` x ``height`` keeping the aspect ratio and padded with black, yuv420p, libx264
baseline profile at constant QP, no B-frames and one macroblock per slice. One macroblock per slice
puts a NAL start code before every 16x16 block, which plays the part of JPEG's restart markers: a
stream cut at any start code is a valid prefix, and a broken slice spoils one macroblock, not a frame.

The stream is raw Annex-B (start codes, no container, no audio) exactly as x264 writes it, headers and
the x264 SEI included. :meth:`AvcCodec.decode` never raises: model output is often broken, so it
returns best-effort frames and says how much of the clip the stream held.
"""

from __future__ import annotations

import io
import itertools
import os
import re
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Any, NamedTuple

import av
import numpy as np
from PIL import Image

from jpeglm.codecs.base import PREVIEW_GAP, CodecError, DecodedVideo, check_spec, describe, sha256

# Annex-B start code; a 4-byte code's leading zero belongs to it (the cut goes before it).
_START_CODE = re.compile(rb"\x00\x00\x00?\x01")
_SLICE_TYPES = (1, 5)  # coded slice of a non-IDR / IDR picture: one macroblock each here
_VCL_TYPES = range(1, 6)
# Non-VCL NAL units that may open an access unit (H.264 7.4.1.2.3): SEI, SPS, PPS, AUD, SPS extension, 14-18.
_AU_PREFIX_TYPES = frozenset({6, 7, 8, 9, 13, 14, 15, 16, 17, 18})
_GREY = 128  # frames the stream does not reach
_DECODE_PIXEL_FACTOR = 16  # a decoded picture may be at most this many times the codec's size
_CONSTRUCTOR_FIELDS = ("width", "height", "fps", "seconds", "qp", "max_pixels")
_DECODE_ERRORS = (av.FFmpegError, ValueError, MemoryError)  # what broken streams make PyAV raise

# The paper's x264 settings; the constant QP, profile and threads are libx264 options of their own.
X264_PARAMS = {
    "bframes": "0",
    "slice-max-mbs": "1",
    "trellis": "0",
    "me": "dia",
    "subme": "0",
    "psy": "0",
    "mixed-refs": "0",
    "fast-pskip": "0",
    "partitions": "none",
    "ref": "3",
}


def x264_options(qp: int) -> dict[str, str]:
    """The libx264 encoder options of AVC-LM at constant quantiser ``qp`` (what ``ffmpeg -c:v libx264`` takes)."""
    params = ":".join(f"{key}={value}" for key, value in X264_PARAMS.items())
    return {"profile": "baseline", "qp": str(qp), "threads": "1", "x264-params": params}


class AvcCodec:
    """H.264 (AVC) codec with the settings of the paper's AVC-LM.

    Args:
        width: Frame width in pixels (even); videos are scaled to fit and padded with black.
        height: Frame height in pixels (even).
        fps: Frames per second sampled from a video file.
        seconds: Length of a clip; only the first ``seconds`` of a video are encoded.
        qp: Constant quantiser of x264 (1-51; higher is smaller and blurrier).
        max_pixels: Largest input frame (width x height) accepted; larger ones are refused before decoding.

    Implements :class:`~jpeglm.codecs.Codec` (a ``Codec[DecodedVideo]``).
    """

    name = "avc"
    file_suffix = ".mp4"

    def __init__(
        self,
        width: int = 256,
        height: int = 144,
        fps: int = 3,
        seconds: int = 5,
        qp: int = 37,
        max_pixels: int = 8192 * 8192,
    ) -> None:
        if width < 16 or height < 16 or width % 2 or height % 2:
            raise ValueError(f"width and height must be even and at least 16, got {width}x{height}")
        if fps < 1 or seconds < 1:
            raise ValueError(f"fps and seconds must be positive, got fps={fps} seconds={seconds}")
        if not 1 <= qp <= 51:  # qp 0 is lossless, which the baseline profile cannot code
            raise ValueError(f"qp must be in 1..51, got {qp}")
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        self.width, self.height, self.fps, self.seconds, self.qp = width, height, fps, seconds, qp
        self.max_pixels = max_pixels
        self._reference: dict[str, str] | None = None  # computed on first use of ``spec``

    @property
    def frames_per_clip(self) -> int:
        """Frames in a full clip: ``fps * seconds``."""
        return self.fps * self.seconds

    @property
    def slices_per_frame(self) -> int:
        """Slice NAL units per frame: one per 16x16 macroblock."""
        return -(-self.width // 16) * -(-self.height // 16)

    # ------------------------------------------------------------------ encode

    def encode(self, video: Any) -> bytes:
        """Encode a video into an H.264 Annex-B byte stream.

        Clips shorter than :attr:`frames_per_clip` are encoded with the frames they have (the stream
        then decodes as incomplete, its missing frames grey).

        Args:
            video: A video file (path or its bytes; the first video stream is read, audio is ignored),
                a sequence of frames (PIL images or ``(H, W, 3)`` uint8 arrays, taken as already at ``fps``),
                or a ``(T, H, W, 3)`` uint8 array.

        Returns:
            The Annex-B stream: SPS, PPS, x264's SEI, then one slice NAL unit per macroblock.

        Raises:
            CodecError: If the input is not a readable video, holds no decodable frame, has frames of
                the wrong shape or type, or frames larger than ``max_pixels``.
        """
        return self._encode_frames(self._read(video))

    def reference(self, video: Any) -> np.ndarray:
        """The clip as :meth:`encode` hands it to x264: resampled to ``fps``, scaled, padded, yuv420p.

        Args:
            video: What :meth:`encode` takes.

        Returns:
            ``(T, height, width, 3)`` uint8 RGB, ``T`` the frames the clip has, at most :attr:`frames_per_clip`
            (a short clip is not padded to full length).

        Raises:
            CodecError: As :meth:`encode`.
        """
        return np.stack([frame.to_ndarray(format="rgb24") for frame in self._read(video)])

    def _read(self, video: Any) -> list[av.VideoFrame]:
        """The yuv420p frames of the clip at the codec's size and rate, ready for x264."""
        if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
            return self._read_file(video)
        return self._read_frames(video)

    def _read_file(self, source: str | os.PathLike | bytes | bytearray | memoryview) -> list[av.VideoFrame]:
        """The first ``frames_per_clip`` frames of a file's first video stream, at ``fps`` and codec size."""
        name = describe(source)
        file = source if isinstance(source, (str, os.PathLike)) else io.BytesIO(bytes(source))
        try:
            container = av.open(file, "r")
        except (av.FFmpegError, OSError) as error:
            raise CodecError(f"{name}: not a readable media file ({error})") from error
        with container:
            if not container.streams.video:
                streams = [s.type for s in container.streams]
                raise CodecError(f"{name}: no video stream (streams: {streams})", reason="no_video")
            stream = container.streams.video[0]
            self._check_size(name, stream.codec_context.width, stream.codec_context.height)
            # FFmpeg refuses to allocate larger pictures even if the header lied about the size.
            stream.codec_context.options = {"max_pixels": str(self.max_pixels)}
            try:
                frames = list(itertools.islice(self._resample(name, container, stream), self.frames_per_clip))
            except av.FFmpegError as error:  # the filter graph refused a frame (e.g. an unusual pixel format)
                raise CodecError(f"{name}: cannot resample the video ({error})") from error
        if not frames:
            raise CodecError(f"{name}: no decodable video frame")
        return frames

    def _resample(self, name: str, container: Any, stream: Any) -> Iterator[av.VideoFrame]:
        """Decoded frames of ``stream`` through an fps/scale/pad filter graph; stops at the first decode error."""
        graph, rate = None, stream.guessed_rate or stream.average_rate or Fraction(25)
        for index, frame in enumerate(self._decode_until_error(container, stream)):
            self._check_size(name, frame.width, frame.height)
            time_base = frame.time_base or stream.time_base or Fraction(1, 90000)
            if frame.pts is None:  # raw elementary streams carry no timestamps: space frames at the stream's rate
                frame.pts, frame.time_base = round(index / (rate * time_base)), time_base
            if graph is None:
                graph = self._filter_graph(frame, time_base=time_base, resample=True)
            graph.push(frame)
            yield from _pull_all(graph)
        if graph is not None:
            graph.push(None)  # the fps filter holds back its last frames until the end of input
            yield from _pull_all(graph)

    @staticmethod
    def _decode_until_error(container: Any, stream: Any) -> Iterator[av.VideoFrame]:
        # A corrupt or truncated file keeps the frames decoded before the damage.
        try:
            yield from container.decode(stream)
        except _DECODE_ERRORS:
            return

    def _read_frames(self, video: Any) -> list[av.VideoFrame]:
        """Frames of an in-memory clip (already at ``fps``), scaled and padded to the codec size."""
        name = describe(video) if isinstance(video, np.ndarray) else f"<{type(video).__name__} of frames>"
        if isinstance(video, np.ndarray) and (video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8):
            raise CodecError(f"{name}: expected a (T, H, W, 3) uint8 array")
        if not isinstance(video, Iterable) or isinstance(video, (str, Image.Image)):
            raise CodecError(f"{name}: expected a video file, its bytes, or a sequence of frames")
        frames = []
        for index, image in enumerate(itertools.islice(video, self.frames_per_clip)):
            rgb = self._frame_array(name, index, image)  # (H, W, 3) uint8
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, self.fps)
            graph = self._filter_graph(frame, time_base=frame.time_base, resample=False)
            graph.push(frame)
            frames.extend(_pull_all(graph))
        if not frames:
            raise CodecError(f"{name}: no frames")
        return frames

    def _frame_array(self, name: str, index: int, image: Any) -> np.ndarray:
        """One input frame as an ``(H, W, 3)`` uint8 RGB array, or a CodecError saying what is wrong with it."""
        if isinstance(image, Image.Image):
            self._check_size(f"{name} frame {index}", *image.size)
            return np.asarray(image.convert("RGB"))
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            raise CodecError(
                f"{name}: frame {index} is {describe(image)}; expected an (H, W, 3) uint8 array or PIL image"
            )
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise CodecError(f"{name}: frame {index} is empty {image.shape}")
        self._check_size(f"{name} frame {index}", image.shape[1], image.shape[0])
        return image

    def _check_size(self, name: str, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise CodecError(f"{name}: frame of {width}x{height} exceeds max_pixels={self.max_pixels}", "too_large")

    def _filter_graph(self, frame: av.VideoFrame, time_base: Fraction, resample: bool) -> av.filter.Graph:
        """buffer -> [fps] -> scale to fit -> pad to codec size (black, centred) -> yuv420p -> sink."""
        graph = av.filter.Graph()
        graph.threads = 1  # the same bytes on every machine
        w, h = self.width, self.height
        nodes = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format, time_base=time_base)]
        if resample:
            nodes.append(graph.add("fps", str(self.fps)))
        nodes += [
            graph.add("scale", f"{w}:{h}:force_original_aspect_ratio=decrease"),
            graph.add("pad", f"{w}:{h}:(ow-iw)/2:(oh-ih)/2:black"),
            graph.add("format", "yuv420p"),
            graph.add("buffersink"),
        ]
        graph.link_nodes(*nodes).configure()
        return graph

    def _encode_frames(self, frames: list[av.VideoFrame]) -> bytes:
        """x264 with the paper's settings; frames are numbered 0, 1, ... at ``1/fps``."""
        encoder = av.CodecContext.create("libx264", "w")
        encoder.width, encoder.height, encoder.pix_fmt = self.width, self.height, "yuv420p"
        encoder.time_base, encoder.framerate = Fraction(1, self.fps), Fraction(self.fps)
        encoder.options = x264_options(self.qp)  # no GLOBAL_HEADER flag: SPS/PPS stay in-band (Annex-B)
        stream = bytearray()
        for index, frame in enumerate(frames):
            frame.pts, frame.time_base = index, Fraction(1, self.fps)
            for packet in encoder.encode(frame):
                stream += bytes(packet)
        for packet in encoder.encode(None):  # flush
            stream += bytes(packet)
        return bytes(stream)

    # ------------------------------------------------------------------ decode

    def decode(self, stream: bytes) -> DecodedVideo:
        """Decode any byte string into a full clip of frames; never raises on broken streams.

        Args:
            stream: An Annex-B H.264 stream, possibly truncated or garbled (model output).

        Returns:
            ``DecodedVideo`` with ``(frames_per_clip, height, width, 3)`` uint8 RGB frames (frames the stream
            does not reach are grey 128), ``complete`` (every frame and slice present and a strict decode
            reports no error) and ``fraction``: the share of the clip the stream really drew, i.e. whole slices
            (delimited by the next start code) of frames that FFmpeg decoded without error or concealment, over
            all slices of the clip. Slices of a frame that did not decode (garbage parameter sets or slice data,
            drawn grey or concealed) count for nothing, at most 1.0.
        """
        stream = bytes(stream)
        decoded, clean, drawn = self._decode_lenient(stream)
        nals = _nal_units(stream)
        counts = _complete_slices(nals)  # whole slices of each frame in the stream
        if nals and nals[-1].kind in _SLICE_TYPES and not nals[-1].followed:
            # The last slice has no start code after it: it counts only when the whole stream proves complete.
            with_last = [*counts[:-1], counts[-1] + 1]
        else:
            with_last = counts
        complete = (
            clean
            and len(decoded) == self.frames_per_clip
            and with_last == [self.slices_per_frame] * self.frames_per_clip
            and self._decodes_strictly(stream)
        )
        counts = with_last if complete else counts
        # Slices are measured against the codec's frame size: a frame never counts for more than one frame. Frames
        # are decoded in stream order (baseline: no reordering), so the i-th counted frame is the i-th decoded one.
        pairs = zip(counts[: self.frames_per_clip], drawn, strict=False)
        whole = sum(min(count, self.slices_per_frame) for count, clean_frame in pairs if clean_frame)
        fraction = whole / (self.slices_per_frame * self.frames_per_clip)
        return DecodedVideo(frames=self._clip(decoded), complete=complete, fraction=fraction)

    def _decoder(self, strict: bool) -> Any:
        decoder = av.CodecContext.create("h264", "r")
        decoder.thread_count = 1
        # Garbage SPS may claim any size: cap the picture so the decoder never allocates something huge.
        options = {"max_pixels": str(self.width * self.height * _DECODE_PIXEL_FACTOR)}
        if strict:
            options["err_detect"] = "explode"  # fail on the first bitstream error instead of concealing it
        decoder.options = options
        return decoder

    def _decode_lenient(self, stream: bytes) -> tuple[list[np.ndarray | None], bool, list[bool]]:
        """Frames FFmpeg can make of the stream (with error concealment), whether nothing went wrong, and for each
        frame whether it decoded without error or concealment."""
        decoder, frames, clean, drawn = self._decoder(strict=False), [], True, []
        for packet in [*_parse(decoder, stream), None]:  # None flushes the decoder
            try:
                pictures = decoder.decode(packet)
            except _DECODE_ERRORS:
                clean = False
                drawn.append(False)  # this access unit's frame was not drawn
                continue
            for picture in pictures:
                clean = clean and not picture.is_corrupt
                drawn.append(not picture.is_corrupt)
                if len(frames) < self.frames_per_clip:
                    frames.append(self._to_rgb(picture))
                else:
                    frames.append(None)  # counted, not converted: the clip is full
        return frames, clean, drawn

    def _decodes_strictly(self, stream: bytes) -> bool:
        """True when FFmpeg with ``err_detect=explode`` decodes every frame without error or concealment."""
        decoder, count = self._decoder(strict=True), 0
        try:
            for packet in [*_parse(decoder, stream), None]:
                for picture in decoder.decode(packet):
                    if picture.is_corrupt:
                        return False
                    count += 1
        except _DECODE_ERRORS:
            return False
        return count == self.frames_per_clip

    def _to_rgb(self, picture: av.VideoFrame) -> np.ndarray | None:
        """A decoded picture as ``(height, width, 3)`` RGB, fitted and padded if the stream has another size."""
        try:
            if (picture.width, picture.height) == (self.width, self.height):
                return picture.to_ndarray(format="rgb24")
            scale = min(self.width / picture.width, self.height / picture.height)
            w = min(self.width, max(1, round(picture.width * scale)))
            h = min(self.height, max(1, round(picture.height * scale)))
            rgb = picture.reformat(width=w, height=h, format="rgb24").to_ndarray()  # (h, w, 3)
        except _DECODE_ERRORS:
            return None  # a pixel format swscale cannot convert: leave the frame grey
        canvas = np.zeros((self.height, self.width, 3), np.uint8)
        top, left = (self.height - h) // 2, (self.width - w) // 2
        canvas[top : top + h, left : left + w] = rgb
        return canvas

    def _clip(self, decoded: list[np.ndarray | None]) -> np.ndarray:
        clip = np.full((self.frames_per_clip, self.height, self.width, 3), _GREY, np.uint8)  # (T, H, W, 3)
        for index, rgb in enumerate(decoded[: self.frames_per_clip]):
            if rgb is not None:
                clip[index] = rgb
        return clip

    # ------------------------------------------------------------------ prompts and files

    def prompt(self, stream: bytes, ratio: float | None = None, *, frames: int | None = None) -> bytes:
        """The first whole frames of a stream, to be completed by a model: give ``ratio`` or ``frames``.

        The cut is at the start code that opens frame ``frames + 1`` (its first NAL unit: SEI, SPS, PPS or
        AUD just before its first slice belong to it), so the prompt is an exact prefix of the stream.

        Args:
            stream: A full Annex-B stream, e.g. from :meth:`encode`.
            ratio: Share of a full clip to keep, inside (0, 1): ``max(1, int(ratio * frames_per_clip))``
                frames, rounded down to whole frames but at least one (the paper's prompt, as
                ``JpegCodec.prompt``'s ``ratio``).
            frames: Number of frames to keep, ``1 <= frames < frames in the stream`` (the precise form).

        Returns:
            The stream's prefix up to (not including) the start code of the first frame not kept.

        Raises:
            ValueError: If both or neither of ``ratio`` and ``frames`` are given, ``ratio`` is not inside
                (0, 1), or the number of frames is out of range for this stream.
        """
        keep = self._prompt_frames(ratio, frames)
        starts = _frame_starts(_nal_units(bytes(stream)))
        if not 1 <= keep < len(starts):
            raise ValueError(
                f"a prompt keeps 1 to {len(starts) - 1} frames of this {len(starts)}-frame stream, got frames={keep}"
            )
        return bytes(stream[: starts[keep]])

    def grammar(self, tokenizer: Any, offset: int = 0, num_ids: int | None = None) -> None:
        """None: H.264 streams are not constrained (sampling draws from the tokenizer's ids, any order).

        A structural grammar of these Annex-B streams would have to follow NAL units (start codes, emulation
        prevention bytes 00 00 03), the fixed SPS and PPS the codec writes, and each slice header's exp-Golomb
        fields (first_mb_in_slice rising one macroblock per slice, frame_num, slice type I then P), then CAVLC
        residual coding of every macroblock, whose tables depend on the neighbours' coefficient counts: far more
        state than JPEG's fixed Huffman tables, so it is left for later.
        """
        return None

    def prompt_share(self, ratio: float) -> float:
        """The share of a full clip's frames :meth:`prompt` keeps at ``ratio``: ``max(1, int(ratio * n)) / n``."""
        return self._prompt_frames(ratio, None) / self.frames_per_clip

    def _prompt_frames(self, ratio: float | None, frames: int | None) -> int:
        """The frames a prompt keeps: ``frames``, or ``max(1, int(ratio * frames_per_clip))``."""
        if frames is not None and ratio is None:
            return frames
        if ratio is None or frames is not None:
            raise ValueError(f"give a prompt exactly one of ratio and frames, got ratio={ratio} frames={frames}")
        if not 0 < ratio < 1:
            hint = f"; to keep {ratio} frames pass frames={ratio}" if isinstance(ratio, int) and ratio >= 1 else ""
            raise ValueError(f"prompt ratio must be inside (0, 1), got {ratio}{hint}")
        return max(1, int(ratio * self.frames_per_clip))

    def stream_end(self, stream: bytes) -> int | None:
        """Length of the first whole clip at the start of ``stream``, or None while it may still grow.

        A clip is whole once the next frame has begun: the result is the offset of the start code that
        opens frame ``frames_per_clip + 1`` (where :meth:`prompt` would cut), known as soon as that frame's
        first slice header is in the stream. A stream of exactly one clip has no end here (the model ends
        it with eos). Used to stop generation as soon as a clip is written (``jpeglm.generation.codec_stop``).
        """
        # A quick necessary test first (parsing every NAL unit at each generated token is slow): count start
        # codes followed by a VCL NAL header (nal_unit_type 1-5, any nal_ref_idc) whose first_mb_in_slice is 0.
        vcl = rb"[\x01-\x05\x21-\x25\x41-\x45\x61-\x65\x81-\x85\xa1-\xa5\xc1-\xc5\xe1-\xe5]"
        if len(re.findall(rb"\x00\x00\x01" + vcl + rb"[\x80-\xff]", stream)) <= self.frames_per_clip:
            return None
        starts = _frame_starts(_nal_units(bytes(stream)))
        return starts[self.frames_per_clip] if len(starts) > self.frames_per_clip else None

    def to_mp4(self, stream: bytes) -> bytes:
        """Wrap an Annex-B stream in a playable MP4 (no re-encoding), frames timed at ``1/fps``.

        Args:
            stream: An Annex-B H.264 stream, e.g. from :meth:`encode`.

        Returns:
            The MP4 file's bytes.

        Raises:
            CodecError: If FFmpeg finds no H.264 picture in the stream to mux.
        """
        output = io.BytesIO()
        try:
            with av.open(io.BytesIO(bytes(stream)), "r", format="h264") as source:
                _remux(source, output, Fraction(1, self.fps))
        except _DECODE_ERRORS as error:
            raise CodecError(f"{describe(stream)}: cannot mux into MP4 ({error})") from error
        return output.getvalue()

    def to_file(self, stream: bytes, decoded: DecodedVideo | None = None) -> bytes:
        """A playable MP4 of any stream; never fails on model output.

        Args:
            stream: A stream from :meth:`encode` or what a model wrote.
            decoded: ``self.decode(stream)`` when the caller already has it (it is not decoded again).

        Returns:
            ``to_mp4(stream)`` (the model's own bytes, not re-encoded) when the stream decodes complete;
            otherwise the best-effort decode (grey where the stream broke) encoded again by this codec,
            ``to_mp4(encode(list(decoded.frames)))``.
        """
        decoded = self.decode(stream) if decoded is None else decoded
        if decoded.complete:
            return self.to_mp4(stream)
        return self.to_mp4(self.encode(list(decoded.frames)))

    def preview(self, decoded: DecodedVideo, max_frames: int = 8) -> np.ndarray:
        """The clip as one picture: at most ``max_frames`` evenly stepped frames side by side.

        Args:
            decoded: A result of :meth:`decode`.
            max_frames: Most frames shown; every ``ceil(T / max_frames)``-th frame is, starting with the first.

        Returns:
            ``(H, n * W + (n - 1) * 4, 3)`` uint8 for ``n`` frames shown, 4-pixel white gaps between them.

        Raises:
            ValueError: If ``max_frames < 1``.
        """
        if max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        frames = decoded.frames  # (T, H, W, 3)
        step = max(1, -(-len(frames) // max_frames))
        gap = np.full((frames.shape[1], PREVIEW_GAP, 3), 255, np.uint8)
        parts = [part for frame in frames[::step] for part in (gap, frame)][1:]
        return np.concatenate(parts, axis=1)

    # ------------------------------------------------------------------ spec

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description of this codec: settings, x264 options, library versions, reference hash."""
        if self._reference is None:
            self._reference = _fingerprint(self.encode(reference_clip()))
        return {
            "codec": self.name,
            **{field: getattr(self, field) for field in _CONSTRUCTOR_FIELDS},
            "x264_options": x264_options(self.qp),
            "av_version": av.__version__,
            "ffmpeg_versions": _library_versions(),
            **self._reference,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> AvcCodec:
        """Build the codec a spec describes, refusing installations that would encode differently.

        Args:
            spec: A dict from :attr:`spec` (e.g. stored with a checkpoint).

        Raises:
            CodecError: If ``spec`` is not an AVC spec, or this installation's x264 options or reference
                encoding differ from those that wrote it (new prompts and data would not match what a model
                trained with the spec has seen).
        """
        codec = cls(**check_spec(spec, cls.name, _CONSTRUCTOR_FIELDS))
        stored = check_spec(spec, cls.name, ("x264_options", "reference_sha256"))
        mine = codec.spec
        for field in ("x264_options", "reference_sha256"):
            if stored[field] != mine[field]:
                raise CodecError(
                    f"avc codec spec mismatch in {field}: the spec has {stored[field]!r}, this installation "
                    f"gives {mine[field]!r}. It encodes video differently from the one the spec (and the model "
                    f"trained with it) came from. Spec written with {_versions(spec)}; installed: {_versions(mine)}.",
                    reason="spec",
                )
        return codec


def reference_clip() -> np.ndarray:
    """A fixed procedural clip whose encoding fingerprints an installation: ``(6, 90, 120, 3)`` uint8.

    Its size differs from the codec's so the hash also covers scaling and padding.
    """
    t, y, x = np.meshgrid(np.arange(6), np.arange(90), np.arange(120), indexing="ij")  # (T, H, W) each
    red = (x * 2 + t * 7) % 256
    green = (y * 3 + (x // 8) * 16) % 256
    blue = np.where(((x - 4 * t) // 15 + y // 15) % 2 == 0, 220, 30)  # a moving checkerboard
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------- Annex-B parsing


class _Nal(NamedTuple):
    """One NAL unit of an Annex-B stream."""

    start: int  # offset of its start code (the leading zero of a 4-byte code)
    kind: int  # nal_unit_type, -1 when the stream ends right after the start code
    first_in_picture: bool  # a slice with first_mb_in_slice == 0
    followed: bool  # another start code follows, so the unit is whole


def _nal_units(stream: bytes) -> list[_Nal]:
    """The NAL units of an Annex-B stream, in order (bytes before the first start code are ignored)."""
    codes = list(_START_CODE.finditer(stream))
    nals = []
    for index, code in enumerate(codes):
        header = code.end()
        end = codes[index + 1].start() if index + 1 < len(codes) else len(stream)
        kind = stream[header] & 0x1F if header < end else -1
        # first_mb_in_slice is ue(v) right after the 1-byte header; ue(v) of 0 is the single bit 1.
        first = kind in _VCL_TYPES and header + 1 < end and bool(stream[header + 1] & 0x80)
        nals.append(_Nal(code.start(), kind, first, index + 1 < len(codes)))
    return nals


def _frame_starts(nals: list[_Nal]) -> list[int]:
    """Byte offset where each frame (access unit) begins: its first slice or the SEI/SPS/PPS/AUD before it."""
    starts, opening = [], None  # opening: first prefix NAL seen since the last slice
    for nal in nals:
        if nal.kind in _AU_PREFIX_TYPES:
            opening = nal.start if opening is None else opening
        elif nal.first_in_picture:
            starts.append(nal.start if opening is None else opening)
            opening = None
        else:  # other slices of the picture, end of sequence, filler: the next frame has not begun
            opening = None
    return starts


def _complete_slices(nals: list[_Nal]) -> list[int]:
    """Number of whole slice NAL units in each frame of the stream, in order."""
    counts: list[int] = []
    for nal in nals:
        if nal.kind in _SLICE_TYPES:
            if nal.first_in_picture or not counts:  # a stream may start mid-picture
                counts.append(0)
            counts[-1] += nal.followed
    return counts


def _parse(decoder: Any, stream: bytes) -> list[Any]:
    """Packets (access units) that FFmpeg's H.264 parser finds in the stream; never raises."""
    packets = []
    for chunk in (stream, None):  # None flushes the parser's last access unit
        try:
            packets += decoder.parse(chunk)
        except _DECODE_ERRORS:
            break
    return packets


def _pull_all(graph: av.filter.Graph) -> Iterator[av.VideoFrame]:
    while True:
        try:
            yield graph.pull()
        except (av.BlockingIOError, av.EOFError):
            return


def _remux(source: Any, output: io.BytesIO, time_base: Fraction) -> None:
    """Copy the raw stream's access units into MP4, numbering them 0, 1, ... at ``time_base`` (no B-frames)."""
    if not source.streams.video:
        raise ValueError("no H.264 stream found")
    template = source.streams.video[0]
    with av.open(output, "w", format="mp4") as mp4:
        track = mp4.add_stream_from_template(template)
        track.time_base = time_base
        count = 0
        for packet in source.demux(template):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            packet.pts = packet.dts = count
            packet.duration, packet.time_base, packet.stream = 1, time_base, track
            mp4.mux(packet)
            count += 1
        if count == 0:
            raise ValueError("no H.264 picture found")


def _fingerprint(stream: bytes) -> dict[str, str]:
    """The reference encoding's hash and the x264 build named in its SEI (``"core 165"``, maybe with a revision)."""
    build = re.search(rb"x264 - (core \d+(?: r\d+ \w+)?)", stream)
    return {"reference_sha256": sha256(stream), "x264_version": build.group(1).decode() if build else "unknown"}


def _versions(spec: dict[str, Any]) -> str:
    """The library versions a spec names that shape the encoding, on one line."""
    ffmpeg = spec.get("ffmpeg_versions") or {}
    libraries = ", ".join(f"{name} {ffmpeg.get(name)}" for name in ("libavcodec", "libavfilter", "libswscale"))
    return f"av {spec.get('av_version')}, x264 {spec.get('x264_version')}, {libraries}"


def _library_versions() -> dict[str, str]:
    return {name: ".".join(map(str, version)) for name, version in sorted(av.library_versions.items())}
