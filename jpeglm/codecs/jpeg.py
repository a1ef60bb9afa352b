"""The JPEG codec of JPEG-LM: images become abbreviated baseline JPEG streams and back.

Every image is center-cropped, resized to ``size`` x ``size`` and written by Pillow/libjpeg with the
paper's settings (quality 25, 4:2:0, a restart marker after every MCU) as an *abbreviated* stream:
quantisation and Huffman tables are the same for every image, so they are left out of the stream
(the model never has to write them) and stored once in the codec spec (``tables``). The frame and
scan headers are identical for every image too, which lets :meth:`JpegCodec.decode` rebuild a
canonical header around whatever entropy-coded data the model wrote, so garbage headers can neither
crash decoding nor ask for a giant image.

Stream layout for the defaults (256x256, 4:2:0, restart every MCU)::

    SOI APP0(JFIF) SOF0 DRI SOS | MCU0 FFD0 MCU1 FFD1 ... MCU254 FFD6 MCU255 | EOI
    <------- header (59 B) -----> <---------- scan: 256 MCUs, 255 markers ---->
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageCms, ImageOps, features

from jpeglm.codecs.base import CodecError, DecodedImage, check_spec, describe, sha256

# Markers (second byte after 0xFF).
_SOI, _EOI, _SOS, _SOF0, _DHT, _DQT = 0xD8, 0xD9, 0xDA, 0xC0, 0xC4, 0xDB
_RST = re.compile(rb"\xff[\xd0-\xd7]")
# Any marker that may not appear inside entropy-coded data: not a stuffed 0xFF00, a restart marker or fill.
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SUBSAMPLING = ("4:4:4", "4:2:2", "4:2:0")
_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
_GREY = (128, 128, 128)
# What a spec that names no filter means: the default before the reference's bilinear became it.
_LEGACY_RESAMPLE = "bicubic"
_SPEC_FIELDS = ("size", "quality", "subsampling", "restart_interval", "resample")

ImageSource = Image.Image | np.ndarray | bytes | bytearray | memoryview | str | os.PathLike


class JpegCodec:
    """Encode images as the paper's abbreviated JPEG streams, decode any byte string back.

    Implements :class:`~jpeglm.codecs.Codec` (a ``Codec[DecodedImage]``).

    Args:
        size: side of the square output image in pixels (the paper: 256).
        quality: libjpeg quality, 1-95 (the paper: 25).
        subsampling: chroma subsampling, one of "4:4:4", "4:2:2", "4:2:0" (the paper: "4:2:0").
        restart_interval: MCUs between restart markers (the paper: 1, a marker after every MCU).
        resample: resize filter: "nearest", "bilinear", "bicubic" or "lanczos". The default, "bilinear", is the
            reference code's (xhan77/jpeg-lm ``run.py``: torchvision's ``RandomResizedCrop`` over a PIL image, which
            for scale = ratio = 1 is a centre crop of the short side at offset ``(big - small) // 2`` followed by
            PIL's antialiased bilinear resize), so an RGB photo gives the reference's bytes. Specs written while the
            default was "bicubic" name their filter and keep it; a spec that names none means "bicubic".
        max_pixels: largest source image (width x height) that :meth:`encode` opens; larger ones are
            refused before they are decoded (decompression bombs). Pillow's own limit
            (``PIL.Image.MAX_IMAGE_PIXELS``, about 179M pixels before it raises) applies as well.
    """

    name = "jpeg"
    file_suffix = ".jpg"

    def __init__(
        self,
        size: int = 256,
        quality: int = 25,
        subsampling: str = "4:2:0",
        restart_interval: int = 1,
        resample: str = "bilinear",
        max_pixels: int = 89_478_485,
    ) -> None:
        if size < 16 or size % 16:
            raise ValueError(f"size must be a positive multiple of 16 (one MCU), got {size}")
        if not 1 <= quality <= 95:
            raise ValueError(f"quality must be in 1..95, got {quality}")
        if subsampling not in _SUBSAMPLING:
            raise ValueError(f"subsampling must be one of {_SUBSAMPLING}, got {subsampling!r}")
        if restart_interval < 1:
            raise ValueError(f"restart_interval must be >= 1 MCU, got {restart_interval}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        self.size = size
        self.quality = quality
        self.subsampling = subsampling
        self.restart_interval = restart_interval
        self.resample = resample
        self.max_pixels = max_pixels

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in _SPEC_FIELDS)
        return f"JpegCodec({args})"

    # ------------------------------------------------------------------ encode

    def encode(self, image: ImageSource) -> bytes:
        """Turn an image into the codec's abbreviated JPEG stream.

        Args:
            image: a PIL image, a path, the bytes of an image file, or an HxWx3 (or HxW) uint8 array.
                EXIF orientation is applied, any mode becomes RGB (transparency over white, 16-bit
                greyscale scaled down, embedded ICC profiles converted to sRGB), then the image is
                center-cropped to a square and resized to ``size`` x ``size``.

        Returns:
            Exactly the bytes ``Image.save(buf, "JPEG", quality=..., subsampling=..., streamtype=2,
            restart_marker_blocks=...)`` writes for the prepared image (no tables, no metadata).

        Raises:
            CodecError: the input is not a readable image, is corrupt or truncated, or is larger
                than ``max_pixels``. The message names the input.
        """
        return self._save(self.prepare(image), streamtype=2)

    def prepare(self, image: ImageSource) -> Image.Image:
        """The RGB ``size`` x ``size`` image that :meth:`encode` compresses (see there for the steps)."""
        name = describe(image)
        try:
            im = self._open(image, name)
            im = _to_rgb_or_rgba(_exif_transpose(im))
            icc = im.info.get("icc_profile")
            im = self._crop_resize(im)
            if im.mode == "RGBA":
                im = _over_white(im)
            if icc:
                im = _to_srgb(im, icc)
        except CodecError:
            raise
        except Exception as e:  # Pillow raises many types on hostile files; all mean "cannot encode this"
            reason = "truncated" if "truncated" in str(e) else "corrupt"
            raise CodecError(f"{name}: cannot read image ({type(e).__name__}: {e})", reason) from e
        im.info = {}  # no metadata (ICC, EXIF, DPI) may reach the stream
        return im

    def reference(self, image: ImageSource) -> np.ndarray:
        """The image as :meth:`encode` compresses it: :meth:`prepare` as a ``(size, size, 3)`` uint8 array.

        Raises:
            CodecError: as :meth:`encode`.
        """
        return np.array(self.prepare(image).convert("RGB"))  # (size, size, 3)

    def _open(self, image: ImageSource, name: str) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, np.ndarray):
            return _from_array(image, name)
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = io.BytesIO(bytes(image))
        elif not isinstance(image, (str, os.PathLike)):
            raise CodecError(f"{name}: expected a PIL image, path, file bytes or uint8 array", reason="invalid")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap follows
            try:
                im = Image.open(image)
            except Image.DecompressionBombError as e:
                raise CodecError(f"{name}: refused, {e}", reason="too_large") from e
        if im.width * im.height > self.max_pixels:
            raise CodecError(
                f"{name}: {im.width}x{im.height} = {im.width * im.height} pixels exceeds max_pixels="
                f"{self.max_pixels} (possible decompression bomb); raise max_pixels to accept it",
                reason="too_large",
            )
        im.load()
        return im

    def _crop_resize(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        side = min(w, h)
        if w == h == self.size:
            return im.copy()
        left, top = (w - side) // 2, (h - side) // 2
        # Crop, then resize (not resize(box=...), whose filter reads pixels outside the box): what torchvision's
        # RandomResizedCrop(scale=(1, 1), ratio=(1, 1)) does to a PIL image in the reference code, whose fallback
        # crop of a non-square image starts at (big - small) // 2 and whose resize is PIL's own, antialiased.
        square = im.crop((left, top, left + side, top + side)) if w != h else im
        return square.resize((self.size, self.size), _RESAMPLE[self.resample])

    def _save(self, im: Image.Image, streamtype: int) -> bytes:
        buf = io.BytesIO()
        im.save(
            buf,
            format="JPEG",
            quality=self.quality,
            subsampling=self.subsampling,
            streamtype=streamtype,
            restart_marker_blocks=self.restart_interval,
        )
        return buf.getvalue()

    # ------------------------------------------------------------------ tables, header, spec

    @cached_property
    def tables(self) -> bytes:
        """The tables-only stream (SOI, DQT, DHT, EOI) that every abbreviated stream of this codec shares."""
        return self._save(Image.new("RGB", (self.size, self.size), _GREY), streamtype=1)

    @cached_property
    def header(self) -> bytes:
        """The bytes every stream of this codec starts with: SOI, APP0, SOF0, DRI and SOS, up to the scan."""
        ref = self._save(Image.new("RGB", (self.size, self.size), _GREY), streamtype=2)
        return ref[: _scan_start(ref)]

    @cached_property
    def num_mcus(self) -> int:
        """MCUs in one image: 256 for the paper's 256x256 at 4:2:0 (16x16 pixels per MCU)."""
        mcu_w, mcu_h = self._layout.mcu_size
        return -(-self.size // mcu_w) * -(-self.size // mcu_h)

    @property
    def num_intervals(self) -> int:
        """Restart intervals in one image; a restart marker ends every interval but the last."""
        return -(-self.num_mcus // self.restart_interval)

    @cached_property
    def _layout(self) -> _ScanLayout:
        return _ScanLayout(self.tables, self.header)

    @property
    def spec(self) -> dict[str, Any]:
        """Every setting, the library versions and checksums of the tables and header, JSON-able."""
        return {
            "codec": self.name,
            **{f: getattr(self, f) for f in _SPEC_FIELDS},
            "pillow": PIL.__version__,
            "libjpeg": features.version("jpg"),
            "tables_sha256": sha256(self.tables),
            "header_sha256": sha256(self.header),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> JpegCodec:
        """Rebuild the codec a spec describes; refuse if this installation writes different tables.

        Raises:
            CodecError: ``spec`` is not a JPEG spec, or this Pillow/libjpeg writes other tables or
                headers than the ones that made the data (decoding would silently give garbage).
        """
        if isinstance(spec, dict) and "resample" not in spec:
            spec = {**spec, "resample": _LEGACY_RESAMPLE}  # written before the filter was part of the spec
        codec = cls(**check_spec(spec, cls.name, _SPEC_FIELDS))
        mine = codec.spec
        for key in ("tables_sha256", "header_sha256"):
            if key in spec and spec[key] != mine[key]:
                raise CodecError(
                    f"JPEG {key.split('_')[0]} differ from the ones this data was made with: it was written by "
                    f"Pillow {spec.get('pillow')} / libjpeg {spec.get('libjpeg')}, this installation has "
                    f"Pillow {mine['pillow']} / libjpeg {mine['libjpeg']}. Decoding would produce garbage; "
                    "install the versions that wrote it, or prepare the data again.",
                    reason="spec",
                )
        return codec

    # ------------------------------------------------------------------ to_jpeg, prompt

    def to_jpeg(self, stream: bytes) -> bytes:
        """A standalone JPEG file: ``stream`` with the codec's tables re-inserted.

        For a stream from :meth:`encode` the result is byte-identical to Pillow's full (tables
        included) save of the same image. ``stream`` is used as is; use :meth:`decode` for model
        output that may be broken.
        """
        sof = stream.find(b"\xff\xc0")
        if not stream.startswith(b"\xff\xd8") or sof < 0:
            raise ValueError("not an abbreviated baseline JPEG stream (no SOI or SOF0 marker)")
        dqt, dht = self._layout.dqt, self._layout.dht
        sof_end = sof + 2 + int.from_bytes(stream[sof + 2 : sof + 4], "big")
        return stream[:sof] + dqt + stream[sof:sof_end] + dht + stream[sof_end:]

    def prompt(self, stream: bytes, ratio: float) -> bytes:
        """The paper's partial-image prompt: ``stream`` cut right after its k-th FFD7 marker.

        ``k = int(32 * ratio)`` for the paper's 256 MCUs (in general ``int(ratio * num_intervals / 8)``:
        every eighth restart marker is FFD7). The cut lies on a restart-marker boundary, so
        :class:`~jpeglm.tokenizer.CodecTokenizer` turns it into an exact prefix of the full stream's tokens.

        Raises:
            ValueError: ``ratio`` is not inside (0, 1), gives k = 0, or the stream has fewer than k FFD7 markers.
        """
        k = self._ffd7_markers(ratio)
        pos = len(self.header) if stream.startswith(self.header) else _scan_start(stream)
        for _ in range(k):
            pos = stream.find(b"\xff\xd7", pos)
            if pos < 0:
                raise ValueError(f"stream holds fewer than {k} FFD7 restart markers; cannot cut at ratio {ratio}")
            pos += 2
        return stream[:pos]

    def prompt_share(self, ratio: float) -> float:
        """The share of the image's restart intervals :meth:`prompt` keeps at ``ratio``: ``8 k / num_intervals``.

        Cuts fall after FFD7 markers, every eighth restart marker: a 64x64 image at restart interval 1 has 16
        intervals and 2 FFD7 markers, so 0.5 and 0.75 both keep half of it.
        """
        return 8 * self._ffd7_markers(ratio) / self.num_intervals

    def _ffd7_markers(self, ratio: float) -> int:
        """How many FFD7 markers a prompt at ``ratio`` keeps (at least one, or ValueError saying why)."""
        if not 0 < ratio < 1:
            raise ValueError(f"prompt ratio must be inside (0, 1), got {ratio}")
        k = int(ratio * self.num_intervals / 8)
        if k < 1:
            markers = self.num_intervals // 8
            raise ValueError(
                f"ratio {ratio} keeps no FFD7 marker: prompts are cut after every eighth restart marker (FFD7), and "
                f"this codec ({self.size}x{self.size}, restart interval {self.restart_interval}) has "
                f"{self.num_intervals} restart intervals, so {markers} FFD7 marker(s) and ratios in steps of "
                f"{8 / self.num_intervals:g}; the smallest ratio is {8 / self.num_intervals:g}"
            )
        return k

    def grammar(self, tokenizer: Any, offset: int = 0, num_ids: int | None = None) -> Any:
        """The grammar of this codec's streams over ``tokenizer``'s ids (:class:`~jpeglm.codecs.grammar.TokenGrammar`).

        Sampling under its masks writes only streams that decode complete. Made once per (tokenizer, offset,
        num_ids) and kept, so its caches of masks serve every later call (each gallery, each batch).
        """
        from jpeglm.codecs.grammar import TokenGrammar

        key = (id(tokenizer), offset, num_ids)
        cache = self.__dict__.setdefault("_grammars", {})
        if key not in cache:
            cache[key] = (tokenizer, TokenGrammar.for_tokenizer(self, tokenizer, offset, num_ids))
        return cache[key][1]

    def to_file(self, stream: bytes, decoded: DecodedImage | None = None) -> bytes:
        """A standalone JPEG file of any stream, which every viewer opens; never fails on model output.

        Args:
            stream: a stream from :meth:`encode` or what a model wrote.
            decoded: ``self.decode(stream)`` when the caller already has it (it is not decoded again).

        Returns:
            ``to_jpeg(stream)`` (the model's own bytes with the tables put back) when the stream decodes
            complete; otherwise the best-effort decode (grey where the stream broke) saved by Pillow as a
            JPEG of quality 95.
        """
        decoded = self.decode(stream) if decoded is None else decoded
        if decoded.complete:
            return self.to_jpeg(stream)
        buffer = io.BytesIO()
        decoded.image.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    def preview(self, decoded: DecodedImage, max_frames: int = 8) -> np.ndarray:
        """The decoded image as a ``(size, size, 3)`` uint8 array (``max_frames`` is for videos; ignored)."""
        return np.array(decoded.image.convert("RGB"))

    def stream_end(self, stream: bytes) -> int | None:
        """Length of the first whole image at the start of ``stream``, or None while its scan has not ended.

        The image ends just after the marker that ends its scan: the EOI marker (FFD9) in every stream
        :meth:`encode` writes. Model output may end the scan with another marker instead; :meth:`decode`
        reads nothing after that marker either, so the image ends there too. Used to stop generation as
        soon as an image is written (see ``jpeglm.generation.codec_stop``).
        """
        start = len(self.header) if stream.startswith(self.header) else _scan_start(stream)
        if not start:
            return None  # no scan header yet
        end = _END_OF_SCAN.search(stream, start)
        return None if end is None else end.end()

    # ------------------------------------------------------------------ decode

    def decode(self, stream: bytes) -> DecodedImage:
        """Best-effort decode of any byte string; never raises.

        The entropy-coded data after the stream's scan header is decoded under the codec's own
        canonical header, so a broken or foreign header cannot change the size or crash libjpeg.
        MCUs the data does not reach are neutral grey.

        Returns:
            ``DecodedImage(image, complete, fraction)``: ``fraction`` is the share of MCUs present as
            well-formed Huffman-coded data; ``complete`` is True only for a full valid stream (exact
            header, every MCU well-formed, restart markers in order, EOI and nothing after it).
        """
        try:
            return self._decode(bytes(stream))
        except Exception:  # decode must survive anything a model writes; grey image, nothing decoded
            return DecodedImage(Image.new("RGB", (self.size, self.size), _GREY), complete=False, fraction=0.0)

    def _decode(self, stream: bytes) -> DecodedImage:
        exact_header = stream.startswith(self.header)
        start = len(self.header) if exact_header else _scan_start(stream)
        scan = stream[start:] if start else b""
        end = _END_OF_SCAN.search(scan)
        ends_with_eoi = end is not None and end.group() == b"\xff\xd9" and end.end() == len(scan)
        scan = scan[: end.start()] if end else scan
        if scan.endswith(b"\xff") and not scan.endswith(b"\xff\x00"):
            scan = scan[:-1]  # half a marker: the next byte would have said what it is
        report = self._layout.check_scan(scan, self.num_mcus, self.restart_interval, ends_with_eoi)
        image = self._render(scan, report.reached)
        complete = exact_header and ends_with_eoi and report.valid
        return DecodedImage(image, complete=complete, fraction=report.decoded / self.num_mcus)

    def _render(self, scan: bytes, reached: int) -> Image.Image:
        data = self.to_jpeg(self.header + scan + b"\xff\xd9")
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # libjpeg gives MCUs after the end of the data zero coefficients: grey
            pixels = np.array(im.convert("RGB"))  # (size, size, 3)
        # ... except the first one, which it decodes from zero bits; make every MCU the data never reached grey.
        if reached < self.num_mcus:
            mcu_w, mcu_h = self._layout.mcu_size
            row, col = divmod(reached, -(-self.size // mcu_w))
            pixels[row * mcu_h : (row + 1) * mcu_h, col * mcu_w :] = _GREY
            pixels[(row + 1) * mcu_h :] = _GREY
        return Image.fromarray(pixels)


# ---------------------------------------------------------------------- stream structure


def _segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment from SOI up to and including SOS or EOI."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == _EOI:
            yield marker, pos, pos + 2
            return
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        yield marker, pos, end
        if marker == _SOS:
            return
        pos = end


def _scan_start(stream: bytes) -> int:
    """Offset of the entropy-coded data after the first SOS segment, or 0 if there is none."""
    sos = stream.find(b"\xff\xda")
    if sos < 0 or sos + 4 > len(stream):
        return 0
    return min(len(stream), sos + 2 + int.from_bytes(stream[sos + 2 : sos + 4], "big"))


@dataclass
class _ScanReport:
    decoded: int = 0  # MCUs whose Huffman codes are well-formed
    reached: int = 0  # MCUs before the point where the data ends (a cut-short last MCU is not reached)
    valid: bool = False  # every MCU well-formed, right number of intervals, markers in order


class _ScanLayout:
    """Checks entropy-coded data against the codec's Huffman tables and MCU structure.

    This is a Huffman *parser*, not a decoder: it walks the codes of each MCU (one 16-bit lookup
    per code) to say how many MCUs a model wrote well-formed, which libjpeg does not report.
    """

    def __init__(self, tables: bytes, header: bytes) -> None:
        self.dqt = b"".join(tables[s:e] for m, s, e in _segments(tables) if m == _DQT)
        self.dht = b"".join(tables[s:e] for m, s, e in _segments(tables) if m == _DHT)
        luts = {}
        for m, s, e in _segments(tables):
            if m == _DHT:
                luts.update(_parse_dht(tables[s + 4 : e]))
        segs = {m: header[s + 4 : e] for m, s, e in _segments(header)}
        sof, sos = segs[_SOF0], segs[_SOS]
        sampling = {sof[6 + 3 * i]: (sof[7 + 3 * i] >> 4, sof[7 + 3 * i] & 15) for i in range(sof[5])}
        self.blocks: list[tuple[list[int], list[int]]] = []  # (dc lut, ac lut) per block of one MCU
        for i in range(sos[0]):
            comp, sel = sos[1 + 2 * i], sos[2 + 2 * i]
            h, v = sampling[comp]
            self.blocks += [(luts[0, sel >> 4], luts[1, sel & 15])] * (h * v)
        hmax = max(h for h, _ in sampling.values())
        vmax = max(v for _, v in sampling.values())
        self.mcu_size = (8 * hmax, 8 * vmax)

    def check_scan(self, scan: bytes, num_mcus: int, interval: int, terminated: bool) -> _ScanReport:
        """How much of ``scan`` (entropy-coded data, restart markers included) is well-formed."""
        parts = _RST.split(scan)
        markers = _RST.findall(scan)
        report = _ScanReport(valid=len(parts) == -(-num_mcus // interval))
        report.valid &= all(m[1] == 0xD0 + i % 8 for i, m in enumerate(markers))
        for i, part in enumerate(parts):
            expected = min(interval, num_mcus - i * interval)
            if expected <= 0:
                report.valid = False  # more intervals than the image has
                break
            ended = terminated or i < len(parts) - 1
            n, clean = self._check_interval(part, expected, ended)
            report.decoded += n
            report.reached = i * interval + (expected if ended else n)
            report.valid &= clean
        return report

    def _check_interval(self, part: bytes, mcus: int, terminated: bool) -> tuple[int, bool]:
        data = part.replace(b"\xff\x00", b"\xff")  # undo byte stuffing
        nbits = 8 * len(data)
        # 16 one-bits of padding so a 16-bit peek never runs off the end; lengths are checked against nbits.
        bits = (int.from_bytes(data, "big") << 16) | 0xFFFF
        pos = 0
        for n in range(mcus):
            pos = self._mcu(bits, nbits, pos)
            if pos < 0:
                return n, False
        # A terminated interval ends with < 8 padding bits, all ones (JPEG F.1.2.3).
        rest = nbits - pos
        clean = not terminated or (rest < 8 and (bits >> 16) & ((1 << rest) - 1) == (1 << rest) - 1)
        return mcus, clean

    def _mcu(self, bits: int, nbits: int, pos: int) -> int:
        """Bit position after one MCU starting at ``pos``, or -1 if it is malformed or cut short."""
        top = nbits + 16
        for dc, ac in self.blocks:
            entry = dc[(bits >> (top - pos - 16)) & 0xFFFF]
            pos += (entry >> 8) + (entry & 0xFF)  # code length + magnitude bits
            if entry == 0 or pos > nbits:
                return -1
            k = 1
            while k < 64:
                entry = ac[(bits >> (top - pos - 16)) & 0xFFFF]
                if entry == 0:
                    return -1
                run, size = (entry & 0xFF) >> 4, entry & 15
                pos += (entry >> 8) + size
                if pos > nbits:
                    return -1
                if size == 0:
                    if run != 15:
                        break  # end of block
                    k += 16
                    if k > 64:
                        return -1
                    continue
                k += run
                if k > 63:
                    return -1
                k += 1
        return pos


def _parse_dht(body: bytes) -> dict[tuple[int, int], list[int]]:
    """16-bit lookup tables, keyed by (class, id): entry = code length << 8 | symbol, 0 for no code."""
    luts = {}
    pos = 0
    while pos < len(body):
        cls_id, counts = body[pos], body[pos + 1 : pos + 17]
        symbols = body[pos + 17 : pos + 17 + sum(counts)]
        lut = [0] * 65536
        code = index = 0
        for length, count in enumerate(counts, start=1):
            for _ in range(count):
                span = 1 << (16 - length)
                lut[code * span : (code + 1) * span] = [length << 8 | symbols[index]] * span
                code += 1
                index += 1
            code <<= 1
        luts[cls_id >> 4, cls_id & 15] = lut
        pos += 17 + len(symbols)
    return luts


# ---------------------------------------------------------------------- image preparation


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise CodecError(f"{name}: expected an HxW, HxWx1, HxWx3 or HxWx4 uint8 array", reason="invalid")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))


def _exif_transpose(im: Image.Image) -> Image.Image:
    if im.getexif().get(0x0112, 1) == 1:  # orientation tag absent or "normal"
        return im
    return ImageOps.exif_transpose(im)


def _to_rgb_or_rgba(im: Image.Image) -> Image.Image:
    """RGB, or RGBA when the image has transparency (composited over white after resizing)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        # 16-bit (and 32-bit int) greyscale: scale 0..65535 to 0..255; float taken as 0..255.
        scale = 1.0 if im.mode == "F" else 1 / 257
        grey = np.clip(np.asarray(im, dtype=np.float32) * scale, 0, 255).round().astype(np.uint8)
        rgb = Image.fromarray(grey).convert("RGB")
        rgb.info = im.info
        return rgb
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        return im.convert("RGBA")
    return im.convert("RGB")


def _over_white(im: Image.Image) -> Image.Image:
    out = Image.new("RGB", im.size, (255, 255, 255))
    out.paste(im, mask=im.getchannel("A"))
    return out


_SRGB = ImageCms.createProfile("sRGB")


def _to_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """Convert from an embedded RGB ICC profile to sRGB; a broken or non-RGB profile is ignored."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "RGB":
            return im
        return ImageCms.profileToProfile(im, profile, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im
