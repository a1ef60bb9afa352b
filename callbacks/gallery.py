"""Seeing the model draw while it trains: TensorBoard galleries of completions and unconditional samples.

Prompts are the first validation items of each image or video modality of the data module: each is cut
with the codec's prompt (JPEG: after the k-th FFD7 marker, k = int(32 * ratio); H.264: the first
max(1, int(ratio * frames)) frames), completed by the model, decoded (never raising) and shown as rows of
``prompt | completion | original``, all through :func:`jpeglm.generation.complete`. Unconditional samples
start from ``bos, tag``. For images trained with captions, held-out captions (those of the first validation items)
are drawn at each guidance scale, in rows of ``caption | image at scale 1 | image at scale 3 ...``.

Sampling is deterministic (its own seeded generator) and leaves no trace: the model's training mode
and every RNG state (Python, NumPy, torch CPU and CUDA) are restored, so a run with the callback has
bit-identical weights to one without. Under FSDP2 every rank runs the same generation (the forward
needs all ranks) and only rank 0 writes images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from litgpt import Config
from PIL import Image

from jpeglm.errors import UserError
from jpeglm.generation import Completion, complete, item_budget
from jpeglm.generation.sampling import kv_cache_bytes
from jpeglm.pictures import caption_rows, completion_row, grid
from jpeglm.tokenizer import MODALITIES
from jpeglm.vocabulary import DescribesVocabulary, Modality


def media_modalities(datamodule: Any) -> list[Modality]:
    """The image and video modalities of a data module that come with a dataset (text has nothing to draw)."""
    if not isinstance(datamodule, DescribesVocabulary):
        return []
    return [m for m in datamodule.modalities() if m.is_media and m.dataset is not None]


def originals(modality: Modality, count: int) -> list[bytes]:
    """The codec streams of the first ``count`` validation items (training items if there is no val split)."""
    split = "val" if modality.dataset.split_dir("val") is not None else "train"
    streams = []
    for sample in modality.dataset.samples(split):
        streams.append(modality.tokenizer.decode(sample))
        if len(streams) == count:
            break
    return streams


def held_out_captions(modality: Modality, count: int) -> list[str]:
    """The captions of the first ``count`` validation items of a captioned modality (training items without a val
    split): what the model never trained on, to draw from."""
    dataset = modality.dataset
    if modality.captions is None or not getattr(dataset, "captions", None):
        return []
    split = "val" if dataset.split_dir("val") is not None else "train"
    offset, tokenizer, captions = dataset.captions["offset"], dataset.caption_tokenizer, []
    for sample in dataset.samples(split):
        ids = sample.astype(np.int64)
        if len(ids) > 2 and ids[1] == MODALITIES["text"] and MODALITIES["jpeg"] in ids:
            end = int(np.flatnonzero(ids == MODALITIES["jpeg"])[0])
            captions.append(tokenizer.decode(ids[2:end] - offset).decode("utf-8", errors="replace"))
        if len(captions) == count:
            break
    return captions


def logger_step(trainer: L.Trainer) -> int:
    """The step TensorBoard gives what describes the model after ``trainer.global_step`` optimizer steps.

    Lightning's loggers record the training values of the k-th optimizer step, and a validation right after it,
    at k - 1 (the step-0 validation at 0); galleries and FID after k steps go there too, so that one step
    number (the console's, the PNG names', TensorBoard's) means one model. See ``jpeglm.callbacks.training``.
    """
    return max(trainer.global_step - 1, 0)


def log_scalars(trainer: L.Trainer, pl_module: L.LightningModule, scalars: dict[str, float], end: bool) -> None:
    """Write ``scalars`` to the loggers now, at :func:`logger_step` (rank 0), and to ``trainer.callback_metrics``.

    Straight to the loggers rather than through ``self.log``, which writes only every ``log_every_n_steps``
    steps (a gallery at another step would wait for the next multiple) and is forbidden at the end of training.
    """
    if not end:
        for name, value in scalars.items():
            pl_module.log(name, value, logger=False)  # callback_metrics only: monitors and LogLines see it
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=logger_step(trainer))


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

    def _warn_once(self, what: str) -> Callable[[int, str], None]:
        """An ``on_skip`` for :func:`complete` that warns once per run and kind of skip, not at every gallery."""

        def warn(index: int, reason: str) -> None:
            warned = self.__dict__.setdefault("_warned", set())
            if what not in warned:
                warned.add(what)
                rank_zero_warn(f"{what}: skipped ({reason}); the run goes on, and this is said only once")

        return warn

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_steps > 0 and trainer.global_step < trainer.max_steps:
            return
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.run(trainer, pl_module, end=True)


class SampleGallery(EveryNSteps):
    """Every ``every_n_steps`` optimizer steps, complete validation prompts and log the pictures.

    For each image/video modality and each ratio: a TensorBoard image ``samples/<modality>/ratio_<r>`` whose
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
        constrain: sample under the codec's stream grammar (JPEG), so every sample is a whole valid image; False:
            unconstrained, as the paper samples.
        num_captions: held-out captions drawn (``samples/<modality>/captions``), for images trained with captions.
        cfg_scales: the classifier-free guidance scales each caption is drawn at, one column each (1.0: none).
        cfg_start: new tokens each caption's picture draws before guidance starts (0: from the first).
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
        constrain: bool = True,
        num_captions: int = 4,
        cfg_scales: tuple[float, ...] = (1.0, 3.0),
        cfg_start: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_captions = num_captions
        self.cfg_scales = tuple(cfg_scales)
        self.cfg_start = cfg_start
        self.num_prompts = num_prompts
        self.ratios = tuple(ratios)
        self.num_unconditional = num_unconditional
        self.max_new_tokens = max_new_tokens
        self.sampling = {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "constrain": constrain,
        }
        self.last_scalars: dict[str, float] = {}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, end: bool) -> None:
        self.draw(trainer, pl_module, end)

    def kv_cache_bytes(self, config: Config, dtype: torch.dtype = torch.bfloat16, captioned: bool = False) -> int:
        """The most KV cache one gallery allocates for a model of ``config`` computing in ``dtype``.

        The gallery samples one batch at a time (each ratio's ``num_prompts`` prompts, then the
        ``num_unconditional`` samples, then for captioned data (``captioned``) the ``num_captions`` captions at each
        scale, twice as many rows under guidance), each with a cache of its batch x up to the whole context
        (``config.block_size``), freed before the next: the largest batch decides. On every rank, on top of
        training's memory (the gallery runs between steps; FSDP2 also gathers the whole model for it).
        """
        guided = any(s != 1.0 for s in self.cfg_scales)
        captions = (2 if guided else 1) * self.num_captions if captioned else 0
        batch = max(self.num_prompts if self.ratios else 0, self.num_unconditional, captions)
        return kv_cache_bytes(config, batch, config.block_size, dtype)

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, end: bool = False) -> dict[str, np.ndarray]:
        """Sample, decode and log one gallery; returns the pictures by tag (on every rank).

        ``end``: called from ``on_train_end``, where ``self.log`` is not allowed: scalars go to the loggers.
        """
        pictures, whole, fraction = {}, [], []
        with _PreservedState(pl_module):
            for modality in media_modalities(trainer.datamodule):
                for tag, rows, completions in self._modality_gallery(pl_module, modality):
                    pictures[f"samples/{modality.name}/{tag}"] = grid(rows)
                    whole += [c.complete for c in completions]
                    fraction += [c.fraction for c in completions]
        if whole:
            self.last_scalars = {
                "samples/complete": float(np.mean(whole)),
                "samples/fraction": float(np.mean(fraction)),
            }
            log_scalars(trainer, pl_module, self.last_scalars, end)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"  # log_dir is a collective: every rank
        if trainer.is_global_zero:
            self._write(trainer, pictures, folder)
        return pictures

    def _modality_gallery(
        self, pl_module: L.LightningModule, modality: Modality
    ) -> Iterator[tuple[str, list[list[np.ndarray]], list[Completion]]]:
        """(tag, rows of panels, completions) of each ratio that can cut the prompts, then of unconditional samples."""
        codec, streams = modality.codec, originals(modality, self.num_prompts)
        sampling = {**self.sampling, "max_new_tokens": self.max_new_tokens or item_budget(modality, streams)}
        requests = [
            (f"ratio_{r:.2f}", {"prompts": streams, "ratio": r, "batch_size": len(streams)}) for r in self.ratios
        ]
        requests = requests if streams else []
        if self.num_unconditional:
            requests.append(("unconditional", {"num_samples": self.num_unconditional}))
        captions = held_out_captions(modality, self.num_captions)
        requests += [
            (
                f"captions_cfg_{s:g}",
                {"captions": captions, "cfg_scale": s, "cfg_start": self.cfg_start, "batch_size": len(captions)},
            )
            for s in self.cfg_scales
            if captions
        ]
        drawn = []  # the caption rows, one column per scale
        for tag, request in requests:
            warn = self._warn_once(f"SampleGallery ({modality.name}, {tag})")
            try:  # each request in one batch, with the gallery's seed
                batch_size = request.pop("batch_size", self.num_unconditional)
                completions = complete(pl_module, modality, **request, batch_size=batch_size, on_skip=warn, **sampling)
            except UserError as e:  # a ratio that keeps no FFD7 marker of a small image, a budget too small, ...
                warn(0, str(e))
                continue
            if completions and tag == "unconditional":
                yield tag, [[codec.preview(c.decoded) for c in completions]], completions
            elif completions and "captions" in request:
                drawn.append(completions)
            elif completions:
                yield tag, [completion_row(codec, c) for c in completions], completions
        if drawn:
            yield "captions", caption_rows(codec, drawn), [c for column in drawn for c in column]

    def _write(self, trainer: L.Trainer, pictures: dict[str, np.ndarray], folder: Path) -> None:
        """PNG files of every picture, and TensorBoard images, at :func:`logger_step`."""
        step = logger_step(trainer)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                for tag, array in pictures.items():
                    experiment.add_image(tag, array, step, dataformats="HWC")
                experiment.flush()
        folder.mkdir(parents=True, exist_ok=True)
        for tag, array in pictures.items():
            Image.fromarray(array).save(folder / f"step{step:07d}_{tag.replace('/', '_')}.png")
