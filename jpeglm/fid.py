"""FID (the paper's main metric) with torchmetrics, shared by ``jpeglm evaluate`` and the FID callback.

Feature extractors:

- ``"inception"``: the standard FID network (torch-fidelity's InceptionV3 port of the TF weights, as
  torchmetrics uses it), read from a local ``inception_weights`` file (the usual
  ``weights-inception-2015-12-05-6726825d.pth``). Nothing is ever downloaded at run time: a missing file
  is a :class:`~jpeglm.errors.UserError`. Needs ``pip install 'jpeglm[fid]'`` (torch-fidelity).
- ``"small"``: :class:`SmallFeatures`, coarse colour-layout statistics with no weights. Cheap on a CPU and
  for tests; its numbers are not comparable with published FIDs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jpeglm.errors import UserError

FEATURE_EXTRACTORS = ("inception", "small")


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


def fid_metric(feature_extractor: str = "inception", inception_weights: str | None = None) -> Any:
    """A torchmetrics ``FrechetInceptionDistance`` that keeps the real images' statistics across resets.

    Args:
        feature_extractor: "inception" (the standard, from ``inception_weights``) or "small" (no weights).
        inception_weights: local path of the Inception weights file (needed for "inception").

    Raises:
        UserError: an unknown extractor, a missing weights file, or torch-fidelity not installed.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature_extractor == "small":
        return FrechetInceptionDistance(feature=SmallFeatures(), reset_real_features=False, sync_on_compute=False)
    if feature_extractor != "inception":
        raise UserError(f"feature_extractor must be one of {FEATURE_EXTRACTORS}, got {feature_extractor!r}")
    if not inception_weights or not Path(inception_weights).is_file():
        raise UserError(
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
        raise UserError(f"{e}: install it with pip install 'jpeglm[fid]'") from e


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """``(N, 3, H, W)`` uint8 from a list of ``(H, W, 3)`` uint8 arrays (all of one size)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def add_pictures(metric: Any, pictures: Iterable[np.ndarray], *, real: bool, batch_size: int = 64) -> int:
    """Feed ``(H, W, 3)`` uint8 pictures to the metric's feature network, ``batch_size`` at a time.

    Each batch goes to the metric's device (move the metric with ``metric.to(device)``: the features then run
    there), so memory holds one batch of pictures and features, never the whole set: torchmetrics keeps only
    running sums (the mean and covariance FID needs) of each side's features.

    Returns:
        How many pictures were added.
    """
    if batch_size < 1:
        raise UserError(f"the FID feature batch size must be >= 1, got {batch_size}")
    count, batch = 0, []
    for picture in pictures:
        batch.append(picture)
        if len(batch) == batch_size:
            count += _update(metric, batch, real)
            batch = []
    return count + (_update(metric, batch, real) if batch else 0)


def _update(metric: Any, pictures: list[np.ndarray], real: bool) -> int:
    metric.update(to_batch(pictures).to(metric.device), real=real)
    return len(pictures)


def fid(metric: Any, fakes: Iterable[np.ndarray], batch_size: int = 64) -> float:
    """FID of ``fakes`` (``(H, W, 3)`` uint8 pictures) against the real images the metric already holds.

    The metric's fake statistics are reset first; the real ones stay (``reset_real_features=False``).
    ``fakes`` may be a generator: it is read once, ``batch_size`` pictures at a time (:func:`add_pictures`).
    """
    metric.reset()
    add_pictures(metric, fakes, real=False, batch_size=batch_size)
    return float(metric.compute())
