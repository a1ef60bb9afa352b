"""A small procedural dataset made in-process: the tiny recipe and the tests train on it with no download.

Images are gradients with a few flat shapes and, sometimes, a stripe texture: structure a tiny model can
learn within minutes (flat regions, edges, repeated MCUs), all drawn deterministically from ``seed``. Videos
are the same scenes with the shapes moving. The set is written once into a cache directory keyed by its
settings, a tokenizer is trained on it and ``jpeglm.prepare.prepare`` turns it into shards; after that the
data module is a :class:`~jpeglm.data_modules.codec.CodecDataModule` over that directory.

Two processes (ranks) may start at once: whoever holds the lock file builds the directory, the others wait for
the lock and then find it complete (``dataset.json`` is written last). Lightning calls ``prepare_data`` on one
process per node; ``setup`` (and anything that reads the vocabulary) makes sure of it on every process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jpeglm.codecs import AvcCodec, JpegCodec
from jpeglm.data_modules.codec import PreparedDataModule
from jpeglm.errors import UserError
from jpeglm.prepare import codec_settings
from jpeglm.shards import PreparedDataset, read_dataset
from jpeglm.tokenizer import DEFAULT_VOCAB_SIZE, CodecTokenizer

__all__ = [
    "COLOUR_NAMES",
    "SyntheticDataModule",
    "caption_colours",
    "caption_pattern",
    "palette",
    "procedural_caption",
    "procedural_clip",
    "procedural_image",
]

_VERSION = 2  # bump when the pictures change, so old caches are not reused
_VIDEO_FPS, _VIDEO_SECONDS = 3, 2


def procedural_image(seed: int, index: int, size: int) -> Image.Image:
    """One ``size`` x ``size`` RGB picture: a gradient, maybe stripes, and 1-3 flat shapes."""
    return _scene(np.random.default_rng([seed, index]), size, size)(0.0)


def procedural_caption(seed: int, index: int, size: int) -> str:
    """The caption of :func:`procedural_image` ``(seed, index, size)``, in plain words from what was drawn.

    E.g. "a red circle at the top left and a blue square on a teal and white striped background": each shape's
    colour, kind (circle or oval, square or rectangle, triangle) and place (a 3 x 3 grid), then the background's
    colours and pattern (plain, gradient, striped). :func:`caption_colours` reads the colours back.
    """
    return _scene(np.random.default_rng([seed, index]), size, size).caption


def procedural_clip(seed: int, index: int, width: int, height: int, frames: int) -> list[np.ndarray]:
    """``frames`` RGB frames ``(height, width, 3)`` of one scene whose shapes move in straight lines."""
    draw = _scene(np.random.default_rng([seed, index]), width, height)
    return [np.asarray(draw(t / max(frames - 1, 1))) for t in range(frames)]


# Saturated colours and greys: a tiny model learns a few colours' MCUs within minutes, so its samples show
# shapes and backgrounds instead of the noise of an uncountable range of colours.
_PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
        (70, 240, 240), (240, 50, 230), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0),
        (0, 0, 128), (255, 255, 255), (128, 128, 128), (0, 0, 0),
    ]
)  # fmt: skip


COLOUR_NAMES = (
    "red", "green", "yellow", "blue", "orange", "purple", "cyan", "magenta",
    "pink", "teal", "brown", "maroon", "navy", "white", "grey", "black",
)  # fmt: skip
"""The name of each palette colour, in palette order (the words of the captions)."""
_PLACES = (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right"))


def palette() -> np.ndarray:
    """(16, 3) uint8: the colours of the pictures, in the order of :data:`COLOUR_NAMES`."""
    return _PALETTE.astype(np.uint8)


def caption_pattern(caption: str) -> str:
    """The background pattern a :func:`procedural_caption` names: "plain", "gradient" or "striped" ("" if none)."""
    background = caption.rpartition(" on ")[2].split()
    return next((word for word in ("plain", "gradient", "striped") if word in background), "")


def caption_colours(caption: str) -> tuple[list[str], list[str]]:
    """The background's colours and the shapes' colours that a :func:`procedural_caption` names, in order."""
    shapes, _, background = caption.rpartition(" on ")
    names = set(COLOUR_NAMES)
    return [w for w in background.split() if w in names], [p.split()[1] for p in shapes.split(" and ")]


class _Scene:
    """One scene (fixed by its random draws): a function of time ``t`` in [0, 1] that draws it, and its caption."""

    def __init__(self, background: Image.Image, shapes: list, caption: str) -> None:
        self.background, self.shapes, self.caption = background, shapes, caption

    def __call__(self, t: float) -> Image.Image:
        image = self.background.copy()
        pen = ImageDraw.Draw(image)
        for kind, color, w, h, start, end in self.shapes:
            x, y = start + t * (end - start)
            box = [x, y, x + w, y + h]
            if kind == "ellipse":
                pen.ellipse(box, fill=color)
            elif kind == "rectangle":
                pen.rectangle(box, fill=color)
            else:
                pen.polygon([(x, y + h), (x + w / 2, y), (x + w, y + h)], fill=color)
        return image


def _shape_words(kind: str, color: int, w: float, h: float, start: np.ndarray, size: tuple[int, int]) -> str:
    """ "a red circle at the top left": a shape's colour, kind and place (where its centre starts, on a 3 x 3 grid)."""
    square = int(0.8 < w / h < 1.25)
    noun = {"ellipse": ("oval", "circle"), "rectangle": ("rectangle", "square"), "triangle": ("triangle",) * 2}
    column, row = (min(int(3 * (c + d / 2) / n), 2) for c, d, n in zip(start, (w, h), size, strict=True))
    place = _PLACES[row][column]
    return f"{_a(COLOUR_NAMES[color])} {noun[kind][square]} {'in the' if place == 'centre' else 'at the'} {place}"


def _a(word: str) -> str:
    """ "a red", "an orange"."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _scene(rng: np.random.Generator, width: int, height: int) -> _Scene:
    """The scene of ``rng``'s draws: a background, 1-3 shapes moving in straight lines, and its caption."""
    i0, i1 = rng.choice(len(_PALETTE), 2, replace=False)
    c0, c1 = _PALETTE[i0], _PALETTE[i1]
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    kind = rng.choice(["flat", "gradient", "stripes"], p=[0.4, 0.35, 0.25])
    background_words = {
        "flat": f"a plain {COLOUR_NAMES[i0]} background",
        "gradient": f"{_a(COLOUR_NAMES[i0])} to {COLOUR_NAMES[i1]} gradient",
        "stripes": f"{_a(COLOUR_NAMES[i0])} and {COLOUR_NAMES[i1]} striped background",
    }[kind]
    if kind == "flat":
        background = np.broadcast_to(c0.astype(float), (height, width, 3))
    elif kind == "gradient":
        angle = rng.choice([0, 0.5, 1, 1.5]) * np.pi  # along an axis: rows or columns of MCUs repeat
        ramp = np.cos(angle) * xx + np.sin(angle) * yy - min(0, np.cos(angle)) - min(0, np.sin(angle))
        background = c0 + (c1 - c0) * ramp[..., None]  # (H, W, 3)
    else:  # stripes of two colours: a texture that repeats across MCUs
        period = rng.choice([8, 16]) / max(width, height)
        along = xx if rng.random() < 0.5 else yy
        background = np.where((np.sin(2 * np.pi * along / period) >= 0)[..., None], c0, c1).astype(float)
    background = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    shapes, phrases = [], []
    for _ in range(rng.integers(1, 4)):
        kind = rng.choice(["ellipse", "rectangle", "triangle"])
        w, h = rng.uniform(0.2, 0.5, 2) * (width, height)
        start = rng.uniform(0, 1, 2) * (width - w, height - h)
        end = rng.uniform(0, 1, 2) * (width - w, height - h)
        color = int(rng.integers(len(_PALETTE)))
        shapes.append((kind, tuple(int(c) for c in _PALETTE[color]), w, h, start, end))
        phrases.append(_shape_words(str(kind), color, w, h, start, (width, height)))
    return _Scene(background, shapes, f"{' and '.join(phrases)} on {background_words}")


def _make_codec(modality: str, size: int) -> JpegCodec | AvcCodec:
    """The codec the set is encoded with: its defaults but the size (clips three quarters as high)."""
    if modality == "jpeg":
        return JpegCodec(size=size)
    return AvcCodec(width=size, height=size * 3 // 4, fps=_VIDEO_FPS, seconds=_VIDEO_SECONDS)


class SyntheticDataModule(PreparedDataModule):
    """A ``CodecDataModule`` over procedural images (or clips) that it makes and prepares itself.

    The set is built on first use (``prepare_data``, ``setup`` or reading :attr:`vocab_size`) in
    ``cache_dir``, under a name made from the settings, and reused from then on.

    Args:
        seq_len: tokens the model sees per sequence; blocks hold ``seq_len + 1`` ids.
        batch_size: sequences per batch on each rank.
        num_images: pictures (or clips, for ``modality="avc"``) to make.
        image_size: side of the square pictures in pixels (a multiple of 16); clips are ``image_size`` wide
            and three quarters as high, at 3 frames per second for 2 seconds.
        modality: "jpeg" (pictures) or "avc" (clips).
        tokenizer_vocab_size: BPE symbols of the tokenizer trained on the set (default: 320 jpeg, 1024 avc; fewer are
            learned when the set has too few repeated pairs).
        val_fraction: share of the set in the validation split.
        cache_dir: where prepared sets are kept (default: ``$JPEGLM_CACHE`` or ``~/.cache/jpeglm``, then
            ``synthetic/``).
        num_workers: loader worker processes per rank (0: load in the training process).
        seed: seed of the pictures and of the shuffle.
        captions: caption every picture in plain words (:func:`procedural_caption`) and prepare captioned samples
            (``jpeglm prepare --captions``: ``bos, text tag, caption, image tag, JPEG, eos``), so the model learns
            to draw what a caption says (jpeg only).
        caption_dropout: share of training samples whose caption is dropped, for classifier-free guidance (see
            :class:`~jpeglm.data_modules.CodecDataModule`).
    """

    def __init__(
        self,
        seq_len: int,
        batch_size: int,
        num_images: int = 256,
        image_size: int = 64,
        modality: str = "jpeg",
        tokenizer_vocab_size: int | None = None,
        val_fraction: float = 0.05,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 42,
        captions: bool = False,
        caption_dropout: float = 0.1,
    ) -> None:
        if modality not in ("jpeg", "avc"):
            raise UserError(f"modality must be 'jpeg' or 'avc', got {modality!r}")
        if captions and modality != "jpeg":
            raise UserError("captions=True makes captioned pictures: use it with modality='jpeg'")
        if num_images < 1:
            raise UserError(f"num_images must be >= 1, got {num_images}")
        if image_size < 16 or image_size % 16:
            raise UserError(f"image_size must be a positive multiple of 16, got {image_size}")
        self.settings = {
            "version": _VERSION,
            "modality": modality,
            "num_images": num_images,
            "image_size": image_size,
            "vocab_size": tokenizer_vocab_size or DEFAULT_VOCAB_SIZE[modality],
            "val_fraction": val_fraction,
            "seed": seed,
            # The codec's settings, defaults included: a changed default (JPEG's resize filter) is a new cache.
            "codec": codec_settings(_make_codec(modality, image_size)),
            **({"captions": True} if captions else {}),  # uncaptioned sets keep the key they always had
        }
        key = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        root = Path(cache_dir or os.environ.get("JPEGLM_CACHE", "~/.cache/jpeglm")).expanduser()
        if cache_dir is None:
            root = root / "synthetic"
        kind = f"{modality}-captioned" if captions else modality
        data_dir = root / f"{kind}-{num_images}x{image_size}-{key}"
        super().__init__(data_dir, seq_len, batch_size, num_workers, shuffle=True, seed=seed,
                         caption_dropout=caption_dropout)  # fmt: skip
        self.save_hyperparameters()

    @cached_property
    def dataset(self) -> PreparedDataset:
        """The prepared set (made first if it is not in the cache yet)."""
        self.prepare_data()
        return read_dataset(self.data_dir)

    def prepare_data(self) -> None:
        """Make and prepare the set unless the cache already holds it; safe when processes race."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir.with_name(self.data_dir.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process builds it
            if not (self.data_dir / "dataset.json").is_file():
                self._build()

    def _build(self) -> None:
        from jpeglm.prepare import prepare

        inputs = self.data_dir.with_name(self.data_dir.name + ".inputs")
        tokenizer_dir = self.data_dir.with_name(self.data_dir.name + ".tokenizer")
        for leftover in (inputs, tokenizer_dir, self.data_dir):  # of a process killed while building
            shutil.rmtree(leftover, ignore_errors=True)
        inputs.mkdir()
        modality, size = self.settings["modality"], self.settings["image_size"]
        codec = _make_codec(modality, size)
        files = self._write_images(inputs, size) if modality == "jpeg" else self._write_clips(inputs, codec)
        streams = [codec.encode(path) for path in files]
        tokenizer = CodecTokenizer.train(streams, modality, self.settings["vocab_size"], codec_spec=codec.spec)
        tokenizer.save(tokenizer_dir)
        prepare(
            modality,
            [str(inputs)],
            self.data_dir,
            tokenizer=tokenizer_dir,
            val_fraction=self.settings["val_fraction"],
            num_workers=1,  # in this process: spawning workers costs more than the set takes
            seed=self.settings["seed"],
            progress=False,
            captions=self.settings.get("captions", False),
            num_nodes=1,  # this process alone: not a share of SLURM's tasks (one per training rank)
        )
        shutil.rmtree(tokenizer_dir)  # prepare copied it into the dataset directory

    def _write_images(self, directory: Path, size: int) -> list[Path]:
        paths = []
        for index in range(self.settings["num_images"]):
            path = directory / f"image-{index:06d}.png"
            scene = _scene(np.random.default_rng([self.settings["seed"], index]), size, size)
            scene(0.0).save(path)
            if self.settings.get("captions"):
                path.with_suffix(".txt").write_text(scene.caption + "\n")
            paths.append(path)
        return paths

    def _write_clips(self, directory: Path, codec: AvcCodec) -> list[Path]:
        import av

        paths = []
        for index in range(self.settings["num_images"]):
            path = directory / f"clip-{index:06d}.mp4"
            frames = procedural_clip(self.settings["seed"], index, codec.width, codec.height, codec.frames_per_clip)
            with av.open(str(path), "w") as container:
                stream = container.add_stream("libx264", rate=codec.fps)
                stream.width, stream.height, stream.pix_fmt = codec.width, codec.height, "yuv420p"
                stream.options = {"preset": "ultrafast", "qp": "10", "threads": "1"}
                for frame in frames:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode(None))
            paths.append(path)
        return paths
