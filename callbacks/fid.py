"""FID of partial-image completions during training (the paper's main metric).

Every ``every_n_steps`` steps the first ``num_samples`` validation items are cut at ``ratio``, completed by the
model (:func:`jpeglm.generation.complete`) and compared with the originals by FID (:mod:`jpeglm.fid`: the
standard Inception from a local weights file, or the weight-free "small" features). Undecodable completions
enter as decoded (grey where the stream broke) and are counted.

The FID definition is :mod:`jpeglm.fid`'s, the one ``jpeglm evaluate`` uses, with one difference forced by the
data: the validation shards hold streams, not the original images, so the reals here are the decoded streams
(``real_picture(..., reals="decoded")``), not the crops before compression that the paper and ``jpeglm
evaluate`` compare with. The numbers follow a run; for tables, run ``jpeglm evaluate`` on the original files.
:attr:`FIDCallback.definition` records what was used.
"""

from __future__ import annotations

import lightning as L

from jpeglm.callbacks.gallery import EveryNSteps, _PreservedState, log_scalars, media_modalities, originals
from jpeglm.errors import UserError
from jpeglm.fid import add_pictures, fake_picture, fid_definition, fid_metric, real_picture
from jpeglm.generation import item_budget, iter_complete
from jpeglm.vocabulary import Modality


class FIDCallback(EveryNSteps):
    """FID between completions of validation prompts and the original items, every ``every_n_steps`` steps.

    Logs ``fid/ratio_<r>`` and ``fid/undecodable`` (completions that are not complete, valid streams). A
    prompt that leaves no room in the model's context is not completed (one warning; the originals' side still
    has its item).

    Args:
        every_n_steps: optimizer steps between evaluations (also one at the end of training).
        num_samples: validation items completed each time (the paper: 5000 for ImageNet, 1000 for FFHQ).
        ratio: share of each item kept as the prompt.
        feature_extractor: "inception" (the standard, from ``inception_weights``) or "small" (no weights).
        inception_weights: path to the FID Inception weights file (needed for "inception").
        batch_size: completions sampled at once.
        feature_batch_size: pictures per batch through the FID features, which run on the model's device.
        max_new_tokens: new tokens per completion (default: 1.5x the longest original, in tokens).
        top_k: keep the k most likely ids (None: all).
        top_p: nucleus sampling threshold.
        seed: sampling seed (batch b uses ``seed + b * batch_size``).
        modality: the data's modality to complete (FID of a video compares strips of its frames).
        constrain: sample under the codec's stream grammar (JPEG: every completion a valid image); False: the
            paper's unconstrained sampling.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        ratio: float = 0.5,
        feature_extractor: str = "inception",
        inception_weights: str | None = None,
        batch_size: int = 16,
        feature_batch_size: int = 64,
        max_new_tokens: int | None = None,
        top_k: int | None = 40,
        top_p: float = 1.0,
        seed: int = 0,
        modality: str = "jpeg",
        constrain: bool = True,
    ) -> None:
        self.every_n_steps, self.num_samples, self.ratio, self.modality = every_n_steps, num_samples, ratio, modality
        self.batch_size, self.feature_batch_size, self.max_new_tokens = batch_size, feature_batch_size, max_new_tokens
        self.sampling = {"top_k": top_k, "top_p": top_p, "seed": seed, "constrain": constrain}
        self.feature_extractor = feature_extractor
        self.metric = fid_metric(feature_extractor, inception_weights)  # fails at construction, not mid-run
        self.definition: dict[str, object] = {}  # jpeglm.fid.fid_definition, once the reals are in
        self._real_done = False
        self.last: dict[str, float] = {}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, end: bool) -> None:
        self.evaluate(trainer, pl_module, end)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, end: bool = False) -> dict[str, float]:
        """Complete, decode and score one round: the scalars (also logged), {} when the data lacks the modality."""
        found = [m for m in media_modalities(trainer.datamodule) if m.name == self.modality]
        if not found:
            return {}
        modality = found[0]
        codec, streams = modality.codec, originals(modality, self.num_samples)
        budget = self.max_new_tokens or item_budget(modality, streams)
        self.metric = self.metric.to(pl_module.device)
        if not self._real_done:
            reals = (real_picture(codec, s, reals="decoded") for s in streams)  # the originals' pixels are gone
            count = add_pictures(self.metric, reals, real=True, batch_size=self.feature_batch_size)
            self.definition = fid_definition(self.metric, self.feature_extractor, "decoded", count, count)
            self._real_done = True
        self.metric.reset()  # the completions' running sums; the originals' stay
        try:
            undecodable = self._complete(pl_module, modality, streams, budget)
        except UserError as e:  # e.g. a budget too small for the grammar: no FID this time, the run goes on
            self._warn_once(f"FIDCallback ({modality.name})")(0, str(e))
            return {}
        self.last = {f"fid/ratio_{self.ratio:.2f}": float(self.metric.compute()), "fid/undecodable": float(undecodable)}
        log_scalars(trainer, pl_module, self.last, end)
        return self.last

    def _complete(self, pl_module: L.LightningModule, modality: Modality, streams: list[bytes], budget: int) -> int:
        """Complete the prompts into the metric's fake side, batch by batch; how many were not complete."""
        codec, undecodable = modality.codec, 0
        with _PreservedState(pl_module):
            for completions in iter_complete(
                pl_module,
                modality,
                streams,
                ratio=self.ratio,
                batch_size=self.batch_size,
                max_new_tokens=budget,
                on_skip=self._warn_once(f"FIDCallback ({modality.name})"),
                **self.sampling,
            ):
                undecodable += sum(not c.complete for c in completions)
                fakes = [fake_picture(codec, c.decoded) for c in completions]
                add_pictures(self.metric, fakes, real=False, batch_size=self.feature_batch_size)
        return undecodable
