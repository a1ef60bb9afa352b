"""Seeing the model draw while it trains: TensorBoard galleries of completions and unconditional samples.

Prompts are the first validation items of each image or video source of the data module: each is cut
with the codec's prompt (JPEG: after the k-th FFD7 marker, k = int(32 * ratio); H.264: after
int(ratio * frames) frames), completed by the model, decoded (never raising) and shown as rows of
``prompt | completion | original``. Unconditional samples start from ``bos, tag``.

Sampling is deterministic (its own seeded generator) and leaves no trace: the model's training mode
and every RNG state (Python, NumPy, torch CPU and CUDA) are restored, so a run with the callback has
bit-identical weights to one without. Under FSDP2 every rank runs the same generation (the forward
needs all ranks) and only rank 0 writes images.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from jpeglm.generation import generate_source, make_prompt, sequence_bytes
from jpeglm.vocabulary import DescribesVocabulary
from jpeglm.vocabulary import Modality as Source

_GAP = 4  # pixels of white between panels


def media_sources(datamodule: Any) -> list[Source]:
    """The image and video sources of a data module (text has nothing to draw)."""
    if not isinstance(datamodule, DescribesVocabulary):
        return []
    return [m for m in datamodule.modalities() if m.is_media and m.dataset is not None]


def originals(source: Source, count: int) -> list[bytes]:
    """The codec streams of the first ``count`` validation items (training items if there is no val split)."""
    split = "val" if source.dataset.split_dir("val") is not None else "train"
    streams = []
    for sample in source.dataset.samples(split):
        streams.append(source.tokenizer.decode(sample))
        if len(streams) == count:
            break
    return streams


def cut(codec: Any, stream: bytes, ratio: float) -> bytes:
    """The paper's prompt: a share of the image's restart intervals, or of the video's frames."""
    if codec.name == "avc":
        frames = max(1, int(ratio * codec.frames_per_clip))
        return codec.prompt(stream, frames=frames)
    return codec.prompt(stream, ratio)


def picture(codec: Any, stream: bytes, max_frames: int = 8) -> tuple[np.ndarray, Any]:
    """(H, W, 3) uint8 of a decoded stream (a video as a strip of frames) and the decode result."""
    decoded = codec.decode(stream)
    if codec.name != "avc":
        return np.asarray(decoded.image), decoded
    frames = decoded.frames  # (T, H, W, 3)
    step = max(1, -(-len(frames) // max_frames))
    return _row(list(frames[::step])), decoded


def _row(panels: list[np.ndarray]) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    gap = np.full((h, _GAP, 3), 255, np.uint8)
    parts = []
    for p in panels:
        parts += [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255), gap]
    return np.concatenate(parts[:-1], axis=1)


def grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Panels laid out in rows (each row left to right), white gaps between them: (H, W, 3) uint8."""
    lines = [_row(r) for r in rows]
    w = max(line.shape[1] for line in lines)
    gap = np.full((_GAP, w, 3), 255, np.uint8)
    parts = []
    for line in lines:
        parts += [np.pad(line, ((0, 0), (0, w - line.shape[1]), (0, 0)), constant_values=255), gap]
    return np.concatenate(parts[:-1], axis=0)


def log_scalars(trainer: L.Trainer, pl_module: L.LightningModule, scalars: dict[str, float], end: bool) -> None:
    """``self.log`` during training; straight to the loggers at the end of training, where Lightning forbids it."""
    if not end:
        for name, value in scalars.items():
            pl_module.log(name, value)
    elif trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)


class _PreservedState:
    """Saves every RNG and the module's training mode on enter, restores them on exit."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.training = self.module.training
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        self.module.train(self.training)


class EveryNSteps(Callback):
    """Calls :meth:`run` after every ``every_n_steps``-th optimizer step, and once more when training ends.

    Not when a run stops before ``max_steps`` (a SLURM requeue, a stop after too many NaN steps): a requeue has
    seconds left before its time limit, and the run that resumes will draw its own.
    """

    every_n_steps: int
    _last_step = -1

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, end: bool) -> None:
        raise NotImplementedError

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # with gradient accumulation several batches end at one step: run once
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.run(trainer, pl_module, end=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_steps > 0 and trainer.global_step < trainer.max_steps:
            return
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.run(trainer, pl_module, end=True)


class SampleGallery(EveryNSteps):
    """Every ``every_n_steps`` optimizer steps, complete validation prompts and log the pictures.

    For each image/video source and each ratio: a TensorBoard image ``samples/<modality>/ratio_<r>`` whose
    rows are ``prompt | completion | original`` (videos as strips of frames), plus
    ``samples/<modality>/unconditional``; the same pictures as PNG files under ``<log_dir>/samples/``; and
    scalars ``samples/complete`` (share of samples that decode as full valid streams) and
    ``samples/fraction`` (mean share of MCUs or slices decoded).

    Args:
        every_n_steps: optimizer steps between galleries (also one at the end of training).
        num_prompts: validation items used as prompts.
        ratios: shares of each item kept as the prompt (the paper: 0.25, 0.5, 0.75).
        num_unconditional: samples from ``bos, tag`` alone.
        max_new_tokens: new tokens per sample (default: 1.5x the longest original, in tokens).
        temperature: sampling temperature (0: greedy).
        top_k: keep the k most likely ids (None: all).
        top_p: nucleus sampling threshold (1.0: off).
        seed: seed of the sampling generator (the same samples every time for the same weights).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_prompts: int = 4,
        ratios: tuple[float, ...] = (0.25, 0.5, 0.75),
        num_unconditional: int = 4,
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = 40,
        top_p: float = 0.9,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self.ratios = tuple(ratios)
        self.num_unconditional = num_unconditional
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        self.last_scalars: dict[str, float] = {}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, end: bool) -> None:
        self.draw(trainer, pl_module, end)

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, end: bool = False) -> dict[str, np.ndarray]:
        """Sample, decode and log one gallery; returns the pictures by tag (on every rank).

        ``end``: called from ``on_train_end``, where ``self.log`` is not allowed: scalars go to the loggers.
        """
        pictures, complete, fraction = {}, [], []
        with _PreservedState(pl_module):
            for source in media_sources(trainer.datamodule):
                for tag, rows, results in self._source_gallery(pl_module, source):
                    pictures[f"samples/{source.name}/{tag}"] = grid(rows)
                    complete += [r.complete for r in results]
                    fraction += [r.fraction for r in results]
        if complete:
            self.last_scalars = {
                "samples/complete": float(np.mean(complete)),
                "samples/fraction": float(np.mean(fraction)),
            }
            log_scalars(trainer, pl_module, self.last_scalars, end)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"  # log_dir is a collective: every rank
        if trainer.is_global_zero:
            self._write(trainer, pictures, folder)
        return pictures

    def _source_gallery(self, pl_module: L.LightningModule, source: Source):
        codec, tok = source.codec, source.tokenizer
        streams = originals(source, self.num_prompts)
        cuts = []
        for ratio in self.ratios:
            try:
                cuts += [(ratio, stream, cut(codec, stream, ratio)) for stream in streams]
            except ValueError as e:  # e.g. a ratio that keeps no FFD7 marker of a small image
                rank_zero_warn(f"SampleGallery: skipping ratio {ratio} for {source.name}: {e}")
        longest = max((len(tok.encode(s)) for s in streams), default=1024)
        conditional = [make_prompt(tok, prompt, source.offset) for _, _, prompt in cuts]
        unconditional = [make_prompt(tok, b"", source.offset)] * self.num_unconditional
        # Two calls: batched with [bos, tag], a long prompt would be fed one token per step.
        completions = self._sample(pl_module, source, conditional, longest)
        unconditional = self._sample(pl_module, source, unconditional, longest)
        for ratio in dict.fromkeys(r for r, _, _ in cuts):
            rows, results = [], []
            for (r, original, prompt), completion in zip(cuts, completions, strict=True):
                if r == ratio:
                    image, result = picture(codec, completion)
                    rows.append([picture(codec, prompt)[0], image, picture(codec, original)[0]])
                    results.append(result)
            yield f"ratio_{ratio:.2f}", rows, results
        if unconditional:
            drawn = [picture(codec, stream) for stream in unconditional]
            yield "unconditional", [[image for image, _ in drawn]], [result for _, result in drawn]

    def _sample(self, pl_module: L.LightningModule, source: Source, prompts: list[list[int]], longest: int) -> list:
        """The codec streams the model writes after each prompt."""
        if not prompts:
            return []
        outputs = generate_source(
            pl_module, source, prompts, self.max_new_tokens or int(1.5 * longest) + 2, **self.sampling
        )
        return [sequence_bytes(ids, source.tokenizer, source.offset, source.codec) for ids in outputs]

    def _write(self, trainer: L.Trainer, pictures: dict[str, np.ndarray], folder: Path) -> None:
        step = trainer.global_step
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                for tag, array in pictures.items():
                    experiment.add_image(tag, array, step, dataformats="HWC")
                experiment.flush()
        folder.mkdir(parents=True, exist_ok=True)
        for tag, array in pictures.items():
            Image.fromarray(array).save(folder / f"step{step:07d}_{tag.replace('/', '_')}.png")
