"""FID of partial-image completions during training (the paper's main metric), with torchmetrics.

Every ``every_n_steps`` steps the first ``num_samples`` validation images are cut at ``ratio``, completed
by the model and compared with the originals by ``torchmetrics.image.fid.FrechetInceptionDistance``.
Undecodable completions enter as decoded (grey where the stream broke) and are counted.

Feature extractors:

- ``"inception"``: the standard FID network (torch-fidelity's InceptionV3 port of the TF weights, as
  torchmetrics uses it), read from a local ``inception_weights`` file (the usual
  ``weights-inception-2015-12-05-6726825d.pth``). Nothing is ever downloaded at run time: a missing file
  is a clear error. Needs ``pip install 'jpeglm[fid]'`` (torch-fidelity).
- ``"small"``: :class:`SmallFeatures`, coarse colour-layout statistics with no weights. Cheap on a CPU and
  for tests; its numbers are not comparable with published FIDs.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from jpeglm.callbacks.samples import EveryNSteps, _PreservedState, cut, log_scalars, media_sources, originals
from jpeglm.generation import generate_source, make_prompt, sequence_bytes


class SmallFeatures(nn.Module):
    """240 features of an image with no learned weights: 8x8 mean colours and 4x4 colour spread.

    Takes ``(N, 3, H, W)`` uint8 images like torchmetrics' Inception, returns ``(N, 240)`` float64.
    """

    num_features = 240

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.double() / 255  # (N, 3, H, W)
        means = nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)  # (N, 192)
        spread = nn.functional.adaptive_avg_pool2d(x * x, 4) - nn.functional.adaptive_avg_pool2d(x, 4) ** 2
        return torch.cat([means, spread.clamp(min=0).sqrt().flatten(1)], dim=1)  # (N, 240)


def fid_metric(feature_extractor: str = "inception", inception_weights: str | None = None):
    """A ``FrechetInceptionDistance`` that keeps the real images' statistics across resets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature_extractor == "small":
        return FrechetInceptionDistance(feature=SmallFeatures(), reset_real_features=False, sync_on_compute=False)
    if feature_extractor != "inception":
        raise ValueError(f"feature_extractor must be 'inception' or 'small', got {feature_extractor!r}")
    if not inception_weights or not Path(inception_weights).is_file():
        raise FileNotFoundError(
            f"FID with Inception needs its weights as a local file (got {inception_weights!r}); jpeglm never "
            "downloads at run time. Get weights-inception-2015-12-05-6726825d.pth once and pass its path, "
            "or use feature_extractor='small'."
        )
    try:
        return FrechetInceptionDistance(
            feature=2048,
            feature_extractor_weights_path=str(inception_weights),
            reset_real_features=False,
            sync_on_compute=False,
        )
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{e}\nInstall it with: pip install 'jpeglm[fid]'") from e


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """``(N, 3, H, W)`` uint8 from a list of ``(H, W, 3)`` uint8 arrays."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


class FIDCallback(EveryNSteps):
    """FID between completions of validation prompts and the original images, every ``every_n_steps`` steps.

    Logs ``fid/ratio_<r>`` and ``fid/undecodable`` (completions that are not complete, valid streams).

    Args:
        every_n_steps: optimizer steps between evaluations (also one at the end of training).
        num_samples: validation images completed each time (the paper: 5000 for ImageNet, 1000 for FFHQ).
        ratio: share of each image kept as the prompt.
        feature_extractor: "inception" (the standard, from ``inception_weights``) or "small" (no weights).
        inception_weights: path to the FID Inception weights file (needed for "inception").
        batch_size: completions sampled at once.
        max_new_tokens: new tokens per completion (default: 1.5x the longest original, in tokens).
        top_k: keep the k most likely ids (None: all).
        top_p: nucleus sampling threshold.
        seed: sampling seed.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        ratio: float = 0.5,
        feature_extractor: str = "inception",
        inception_weights: str | None = None,
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        top_k: int | None = 40,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.every_n_steps, self.num_samples, self.ratio = every_n_steps, num_samples, ratio
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.sampling = {"top_k": top_k, "top_p": top_p, "seed": seed}
        self.metric = fid_metric(feature_extractor, inception_weights)  # fails at construction, not mid-run
        self._real_done = False
        self.last: dict[str, float] = {}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, end: bool) -> None:
        self.evaluate(trainer, pl_module, end)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, end: bool = False) -> dict[str, float]:
        sources = [s for s in media_sources(trainer.datamodule) if s.name == "jpeg"]
        if not sources:
            return {}
        source = sources[0]
        codec = source.codec
        streams = originals(source, self.num_samples)
        with _PreservedState(pl_module):
            completions = self._complete(pl_module, source, streams)
        self.metric.reset()
        if not self._real_done:
            self.metric.update(to_batch([np.asarray(codec.decode(s).image) for s in streams]), real=True)
            self._real_done = True
        decoded = [codec.decode(c) for c in completions]
        self.metric.update(to_batch([np.asarray(d.image) for d in decoded]), real=False)
        self.last = {
            f"fid/ratio_{self.ratio:.2f}": float(self.metric.compute()),
            "fid/undecodable": float(sum(not d.complete for d in decoded)),
        }
        log_scalars(trainer, pl_module, self.last, end)
        return self.last

    def _complete(self, pl_module: L.LightningModule, source, streams: list[bytes]) -> list[bytes]:
        codec, tok = source.codec, source.tokenizer
        longest = max(len(tok.encode(s)) for s in streams)
        completions = []
        for i in range(0, len(streams), self.batch_size):
            chunk = streams[i : i + self.batch_size]
            prompts = [make_prompt(tok, cut(codec, s, self.ratio), source.offset) for s in chunk]
            max_new = self.max_new_tokens or int(1.5 * longest) + 2
            outputs = generate_source(
                pl_module, source, prompts, max_new, **{**self.sampling, "seed": self.sampling["seed"] + i}
            )
            completions += [sequence_bytes(ids, tok, source.offset, codec) for ids in outputs]
        return completions
