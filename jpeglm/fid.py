"""FID (the paper's main metric) with torchmetrics, shared by ``jpeglm evaluate`` and the FID callback.

Feature extractors:

- ``"inception"``: the standard FID network (torch-fidelity's InceptionV3 port of the TF weights, as
  torchmetrics uses it), read from a local ``inception_weights`` file (the usual
  ``weights-inception-2015-12-05-6726825d.pth``). Nothing is ever downloaded at run time: a missing file
  is a :class:`~jpeglm.errors.UserError`. Needs ``pip install 'jpeglm[fid]'`` (torch-fidelity).
- ``"small"``: :class:`SmallFeatures`, coarse colour-layout statistics with no weights. Cheap on a CPU and
  for tests; its numbers are not comparable with published FIDs.

The FID definition, written down once here and used by ``jpeglm evaluate`` and the FID callback alike:

- Reals (:func:`real_picture`): the paper compares generated images with the dataset's real images, so the
  protocol's reals are the images as the codec crops and resizes them, *before* JPEG compression
  (``codec.reference``, ``reals="reference"``). ``jpeglm evaluate`` has the original files and uses them. The FID
  callback only has the streams of the validation shards (the originals' pixels are gone once a set is
  prepared), so during training the reals are the decoded quality-25 streams (``reals="decoded"``); its numbers
  sit a little apart from the protocol's and are meant for following a run, not for tables.
- Fakes (:func:`fake_picture`): each completion's decode as the codec previews it (grey where a stream broke).
- Resizing: none by jpeglm. Both sides reach the features at the codec's size (256 x 256 for the paper).
  torchmetrics' ``FrechetInceptionDistance`` takes ``(N, 3, H, W)`` uint8 (``normalize=False``, so no rescaling
  of values), and its Inception resizes every image to 299 x 299 bilinearly, then maps pixels to
  ``(x - 128) / 128``. Which bilinear: torchmetrics >= 1.5 antialiases by default (``torch`` interpolate); jpeglm
  asks for ``antialias=False`` where the argument exists, which is torch-fidelity's TensorFlow-1.x-compatible
  interpolation, the original FID's, and what older torchmetrics always did (:func:`feature_resize` says which
  one a metric uses). For 256 -> 299 (an enlargement) the two differ little. ``"small"`` features pool the
  pictures as they come, no resize.
- Count: as many reals as fakes per setting (every readable image once; the paper used 5000 ImageNet and 1000
  FFHQ validation images). Both sides' features are accumulated as running sums, so the count is bounded by
  time, not memory.

:func:`fid_definition` records all of it (results.json ``fid_definition``, ``FIDCallback.definition``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from jpeglm.errors import UserError

if TYPE_CHECKING:
    from jpeglm.codecs import Codec

FEATURE_EXTRACTORS = ("inception", "small")
REALS = ("reference", "decoded")
"""Which real images FID compares with: the media before compression (the paper's) or the decoded streams."""

PAPER_FID: dict[str, dict[float | None, float]] = {
    "imagenet": {0.25: 272.12, 0.5: 123.09, 0.75: 34.21, None: 121.35},
    "ffhq": {0.375: 36.15, 0.4375: 31.22, 0.5: 27.15},
}
"""The paper's JPEG-LM FIDs by dataset and prompt ratio (None: unconditional samples, listed with ImageNet)."""


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
    # The original FID's resize (module docstring); torchmetrics before the argument existed always used it.
    tf1_resize = {"antialias": False} if "antialias" in inspect.signature(FrechetInceptionDistance).parameters else {}
    try:
        return FrechetInceptionDistance(
            feature=2048,
            feature_extractor_weights_path=str(inception_weights),
            reset_real_features=False,
            sync_on_compute=False,
            **tf1_resize,
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


# ---------------------------------------------------------------------- the definition (module docstring)


def real_picture(codec: Codec, original: Any, reals: str = "reference") -> np.ndarray:
    """The real image FID compares completions with: ``(H, W, 3)`` uint8 at the codec's size.

    Args:
        codec: the checkpoint's codec.
        original: for ``reals="reference"`` the source media (a path, the file's bytes, a PIL image or array);
            for ``reals="decoded"`` the codec's stream of it.
        reals: "reference", the protocol's: the media as the codec crops and resizes it, before compression
            (``codec.reference``). "decoded": the stream's decode, for when only streams remain (the FID callback
            on prepared shards).

    Raises:
        ValueError: an unknown ``reals``; CodecError (a ValueError) for media the codec cannot read.
    """
    if reals == "reference":
        return codec.reference(original)
    if reals == "decoded":
        return codec.preview(codec.decode(original))
    raise ValueError(f"reals must be one of {REALS}, got {reals!r}")


def fake_picture(codec: Codec, decoded: Any) -> np.ndarray:
    """A completion as FID sees it: the codec's preview of its decode (grey where the stream broke)."""
    return codec.preview(decoded)


def feature_resize(metric: Any) -> str:
    """What happens to a picture's size between :func:`add_pictures` and the metric's features."""
    inception = getattr(metric, "inception", None)
    if isinstance(inception, SmallFeatures):
        return "none: the small features average-pool the pictures as given (8x8 and 4x4 cells)"
    if getattr(inception, "use_antialias", False):
        return "bilinear to 299x299 with antialiasing (torch interpolate) inside torchmetrics' Inception"
    return (
        "bilinear to 299x299, TensorFlow-1.x-compatible without antialiasing (torch-fidelity's, the original "
        "FID's), inside torchmetrics' Inception"
    )


def fid_definition(metric: Any, feature_extractor: str, reals: str, num_reals: int, num_fakes: int) -> dict[str, Any]:
    """The FID definition as used, JSON-able: results.json ``fid_definition`` and ``FIDCallback.definition``."""
    if reals not in REALS:
        raise ValueError(f"reals must be one of {REALS}, got {reals!r}")
    return {
        "reals": reals,
        "reals_are": {
            "reference": "the images as the codec crops and resizes them, before JPEG compression",
            "decoded": "the decoded codec streams (the originals' pixels are not available)",
        }[reals],
        "fakes_are": "the completions' decodes (grey where a stream broke)",
        "picture_size": "the codec's (no resize by jpeglm)",
        "resize": feature_resize(metric),
        "feature_extractor": feature_extractor,
        "num_reals": num_reals,
        "num_fakes": num_fakes,
    }
