"""SampleGallery and FIDCallback during training, and the FID metric they share with `jpeglm evaluate`."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import fit

from jpeglm import callbacks
from jpeglm.callbacks import FIDCallback, SampleGallery
from jpeglm.callbacks.gallery import media_modalities, originals
from jpeglm.errors import UserError
from jpeglm.fid import SmallFeatures, add_pictures, fid, fid_metric, to_batch
from jpeglm.generation import complete
from jpeglm.pictures import completion_row, grid


def gallery() -> SampleGallery:
    return SampleGallery(
        every_n_steps=2, num_prompts=2, ratios=(0.25, 0.5), num_unconditional=1, max_new_tokens=40, constrain=False
    )


def test_gallery_images_are_in_the_tensorboard_event_file(tmp_path):
    callback = gallery()
    trainer, model = fit(tmp_path, [callback])
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0}).Reload()
    tags = events.Tags()["images"]
    assert "samples/jpeg/ratio_0.50" in tags
    assert "samples/jpeg/unconditional" in tags
    assert "samples/jpeg/ratio_0.25" not in tags  # 64x64 images have 2 FFD7 markers: 0.25 keeps none, skipped
    steps = [e.step for e in events.Images("samples/jpeg/ratio_0.50")]
    assert steps == [1, 3]  # after 2 and 4 optimizer steps: where Lightning logs those steps' training values
    assert [e.step for e in events.Scalars("samples/complete")] == steps  # written at once, at the same steps
    picture = events.Images("samples/jpeg/ratio_0.50")[-1]
    # prompt | completion | original, 2 rows; 64 px shown at 2x (jpeglm.pictures) in a 3-px frame, 16-px gaps
    assert (picture.width, picture.height) == (3 * 134 + 2 * 16, 2 * 134 + 16)
    pngs = sorted((tmp_path / "run").rglob("samples/step*_ratio_0.50.png"))
    assert [p.name[:11] for p in pngs] == ["step0000001", "step0000003"]
    assert 0.0 <= callback.last_scalars["samples/fraction"] <= 1.0
    assert "samples/complete" in trainer.callback_metrics

    # The gallery is complete() with its settings: every ratio's prompts in one batch, the gallery's seed.
    pictures = callback.draw(trainer, model, end=True)
    [modality] = media_modalities(trainer.datamodule)
    sampling = {"temperature": 1.0, "top_k": 40, "top_p": 0.9, "seed": 0, "max_new_tokens": 40, "constrain": False}
    completions = complete(model, modality, originals(modality, 2), ratio=0.5, batch_size=2, **sampling)
    expected = grid([completion_row(modality.codec, c) for c in completions])
    assert np.array_equal(pictures["samples/jpeg/ratio_0.50"], expected)
    unconditional = complete(model, modality, num_samples=1, batch_size=1, **sampling)
    expected = grid([[modality.codec.preview(c.decoded) for c in unconditional]])
    assert np.array_equal(pictures["samples/jpeg/unconditional"], expected)


class StopAt(L.Callback):
    """Stops the run after ``step`` steps, as SlurmRequeue does before a requeue."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_run_stopped_before_max_steps_draws_no_final_gallery(tmp_path):
    callback = SampleGallery(
        every_n_steps=100, num_prompts=1, ratios=(0.5,), num_unconditional=0, max_new_tokens=8, constrain=False
    )
    fit(tmp_path, [callback, StopAt(2)], steps=10)  # a requeue's last seconds are not for sampling
    assert not list((tmp_path / "run").rglob("samples/*.png"))
    fit(tmp_path, [callback], steps=2, name="done")  # reaching max_steps draws one
    assert len(list((tmp_path / "done").rglob("samples/*.png"))) == 1


def test_callbacks_leave_training_bit_identical(tmp_path):
    _, plain = fit(tmp_path, [], name="plain")
    fid_callback = FIDCallback(
        every_n_steps=2, num_samples=3, feature_extractor="small", max_new_tokens=20, batch_size=2, constrain=False
    )
    _, watched = fit(tmp_path, [gallery(), fid_callback], name="watched")
    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert np.isfinite(fid_callback.last["fid/ratio_0.50"])
    assert 0 <= fid_callback.last["fid/undecodable"] <= 3


def test_fid_features_and_weights():
    assert callbacks.SmallFeatures is SmallFeatures  # still importable from jpeglm.callbacks
    features = SmallFeatures()(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert features.shape == (2, 240)
    metric = fid_metric("small")
    rng = np.random.default_rng(0)
    same = torch.from_numpy(rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    metric.update(same, real=True)
    metric.update(same, real=False)
    assert abs(float(metric.compute())) < 1e-3  # identical sets
    pictures = list(same.permute(0, 2, 3, 1).numpy())  # (H, W, 3) each
    assert torch.equal(to_batch(pictures), same)
    assert abs(fid(metric, pictures)) < 1e-3  # resets the fakes, keeps the reals
    darker = fid(metric, [p // 4 for p in pictures])
    assert darker > 1
    sizes = []
    metric.update = lambda batch, real, update=metric.update: sizes.append(len(batch)) or update(batch, real=real)
    assert fid(metric, (p // 4 for p in pictures), batch_size=3) == pytest.approx(darker)  # a generator, in batches
    assert sizes == [3, 3, 2]
    with pytest.raises(UserError, match="batch size"):
        add_pictures(metric, pictures, real=False, batch_size=0)
    with pytest.raises(UserError, match="never downloads"):
        fid_metric("inception", "/no/such/weights.pth")
    with pytest.raises(UserError, match="local file"):
        FIDCallback(feature_extractor="inception")
    with pytest.raises(UserError, match="feature_extractor"):
        fid_metric("vgg")


def test_gallery_kv_cache_is_the_arithmetic(tmp_path, monkeypatch):
    """The largest cache a gallery allocates is SampleGallery.kv_cache_bytes (checked at a small shape)."""
    from litgpt import GPT

    allocated = []
    set_kv_cache = GPT.set_kv_cache

    def spy(self, batch_size, max_seq_length=None, **kwargs):
        set_kv_cache(self, batch_size, max_seq_length, **kwargs)
        caches = [block.attn.kv_cache for block in self.transformer.h]
        allocated.append(sum(t.numel() * t.element_size() for c in caches for t in (c.k, c.v)))

    callback = SampleGallery(every_n_steps=100, num_prompts=2, ratios=(0.5,), num_unconditional=3)
    trainer, model = fit(tmp_path, [], steps=1)
    monkeypatch.setattr(GPT, "set_kv_cache", spy)
    callback.draw(trainer, model, end=True)  # no max_new_tokens: each batch may fill the context
    assert len(allocated) == 2  # the prompts' batch, then the unconditional batch, one after the other
    assert max(allocated) == callback.kv_cache_bytes(model.model.config, torch.float32)
    assert allocated[0] < allocated[1]  # 2 prompts < 3 unconditional samples


@pytest.mark.parametrize("recipe", ["jpeg_7b", "avc_7b", "jpeg_text_7b"])
def test_the_7b_recipes_state_their_gallery_cache(recipe):
    """Each 7B recipe's comment gives its gallery's KV cache (bf16, the policy's compute dtype) in GiB."""
    import re
    from pathlib import Path

    import yaml
    from litgpt import Config

    text = (Path(__file__).parents[1] / "recipes" / f"{recipe}.yaml").read_text()
    settings = yaml.safe_load(text)
    [args] = [c.get("init_args", {}) for c in settings["trainer"]["callbacks"] if c["class_path"].endswith("Gallery")]
    config = Config.from_name(settings["model"]["model_name"], block_size=settings["data"]["init_args"]["seq_len"])
    gib = SampleGallery(**args).kv_cache_bytes(config, torch.bfloat16) / 2**30
    stated = re.search(r"# gallery KV cache ([0-9.]+) GiB", text)
    assert stated, "the recipe's gallery comment gives its KV cache: '# gallery KV cache N GiB'"
    assert float(stated.group(1)) == pytest.approx(gib, rel=0.01)


def test_prompts_too_long_for_the_context_are_skipped_with_one_warning(tmp_path):
    """A gallery or FID prompt that leaves no room in the context never crashes training: skipped, said once."""
    trainer, model = fit(tmp_path, [], steps=1)
    [modality] = media_modalities(trainer.datamodule)
    lengths = [len(modality.tokenizer.encode(modality.codec.prompt(s, 0.5))) + 2 for s in originals(modality, 3)]
    model.model.config.block_size = sorted(lengths)[1] + 1  # the longest prompt no longer fits
    callback = SampleGallery(
        every_n_steps=100, num_prompts=3, ratios=(0.5,), num_unconditional=1, max_new_tokens=4, constrain=False
    )
    with pytest.warns(UserWarning, match=r"SampleGallery \(jpeg, ratio_0.50\): skipped \(prompt \d is \d+ tokens"):
        pictures = callback.draw(trainer, model, end=True)
    assert pictures["samples/jpeg/ratio_0.50"].shape[0] == 2 * 134 + 16  # two rows: the prompts that fit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the next gallery is quiet
        callback.draw(trainer, model, end=True)
    fid_callback = FIDCallback(num_samples=3, feature_extractor="small", max_new_tokens=4, constrain=False)
    with pytest.warns(UserWarning, match=r"FIDCallback \(jpeg\): skipped"):
        scalars = fid_callback.evaluate(trainer, model, end=True)
    assert np.isfinite(scalars["fid/ratio_0.50"])
