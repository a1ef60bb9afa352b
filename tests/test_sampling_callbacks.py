"""SampleGallery and FIDCallback during training; `jpeglm generate` and `jpeglm evaluate` on a checkpoint."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jpeglm.callbacks import FIDCallback, SampleGallery
from jpeglm.callbacks.fid import SmallFeatures, fid_metric
from jpeglm.cli import main
from jpeglm.codecs import JpegCodec
from jpeglm.data_modules import SyntheticDataModule
from jpeglm.model import CodecLM
from jpeglm.tokenizer import CodecTokenizer

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_query_groups": 2, "intermediate_size": 172}


def data(cache) -> SyntheticDataModule:
    return SyntheticDataModule(
        seq_len=512,
        batch_size=4,
        num_images=48,
        image_size=64,
        val_fraction=0.2,
        cache_dir=str(cache),
        tokenizer_vocab_size=300,
    )


def fit(tmp_path, callbacks, steps=4, name="run") -> tuple[L.Trainer, CodecLM]:
    L.seed_everything(3)
    dm = data(tmp_path.parent / "synthetic-cache")
    model = CodecLM(model_overrides=TINY, vocab_size=dm.vocab_size, seq_len=512, learning_rate=1e-3, warmup_steps=1)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path / name,
        logger=TensorBoardLogger(tmp_path / name, name="tb"),
        deterministic=True,
    )
    trainer.fit(model, dm)
    return trainer, model


def gallery() -> SampleGallery:
    return SampleGallery(every_n_steps=2, num_prompts=2, ratios=(0.25, 0.5), num_unconditional=1, max_new_tokens=40)


def test_gallery_images_are_in_the_tensorboard_event_file(tmp_path):
    callback = gallery()
    trainer, _ = fit(tmp_path, [callback])
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0}).Reload()
    tags = events.Tags()["images"]
    assert "samples/jpeg/ratio_0.50" in tags
    assert "samples/jpeg/unconditional" in tags
    assert "samples/jpeg/ratio_0.25" not in tags  # 64x64 images have 2 FFD7 markers: 0.25 keeps none, skipped
    steps = [e.step for e in events.Images("samples/jpeg/ratio_0.50")]
    assert steps == [2, 4]
    picture = events.Images("samples/jpeg/ratio_0.50")[-1]
    assert (picture.width, picture.height) == (3 * 64 + 2 * 4, 2 * 64 + 4)  # prompt | completion | original, 2 rows
    pngs = sorted((tmp_path / "run").rglob("samples/step*_ratio_0.50.png"))
    assert len(pngs) == 2
    assert 0.0 <= callback.last_scalars["samples/fraction"] <= 1.0
    assert "samples/complete" in trainer.callback_metrics


class StopAt(L.Callback):
    """Stops the run after ``step`` steps, as SlurmRequeue does before a requeue."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_run_stopped_before_max_steps_draws_no_final_gallery(tmp_path):
    callback = SampleGallery(every_n_steps=100, num_prompts=1, ratios=(0.5,), num_unconditional=0, max_new_tokens=8)
    fit(tmp_path, [callback, StopAt(2)], steps=10)  # a requeue's last seconds are not for sampling
    assert not list((tmp_path / "run").rglob("samples/*.png"))
    fit(tmp_path, [callback], steps=2, name="done")  # reaching max_steps draws one
    assert len(list((tmp_path / "done").rglob("samples/*.png"))) == 1


def test_callbacks_leave_training_bit_identical(tmp_path):
    _, plain = fit(tmp_path, [], name="plain")
    fid = FIDCallback(every_n_steps=2, num_samples=3, feature_extractor="small", max_new_tokens=20, batch_size=2)
    _, watched = fit(tmp_path, [gallery(), fid], name="watched")
    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert np.isfinite(fid.last["fid/ratio_0.50"])
    assert 0 <= fid.last["fid/undecodable"] <= 3


def test_fid_features_and_weights():
    features = SmallFeatures()(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert features.shape == (2, 240)
    metric = fid_metric("small")
    rng = np.random.default_rng(0)
    same = torch.from_numpy(rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    metric.update(same, real=True)
    metric.update(same, real=False)
    assert abs(float(metric.compute())) < 1e-3  # identical sets
    with pytest.raises(FileNotFoundError, match="never downloads"):
        fid_metric("inception", "/no/such/weights.pth")
    with pytest.raises(FileNotFoundError, match="local file"):
        FIDCallback(feature_extractor="inception")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    trainer, _ = fit(tmp, [], steps=3)
    path = tmp / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_generate_writes_files_that_open(checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "samples"
    code = main(
        [
            "generate",
            "--checkpoint",
            str(checkpoint),
            "--prompt-images",
            str(photos[0].parent),
            "--ratio",
            "0.5",
            "--num-samples",
            "3",
            "--max-new-tokens",
            "60",
            "--batch-size",
            "2",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    record = json.loads((out / "samples.json").read_text())["samples"]
    assert len(record) == 3
    assert {"file", "prompt", "new_tokens", "complete", "fraction", "seed", "top_k", "top_p"} <= record[0].keys()
    for r in record:
        with Image.open(out / r["file"]) as im:
            im.load()
            assert im.size == (64, 64)
        assert 0 < r["new_tokens"] <= 60
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == (3 * 64 + 2 * 4, 3 * 64 + 2 * 4)
    assert "wrote 3 samples" in capsys.readouterr().out

    code = main(
        [
            "generate",
            "--checkpoint",
            str(checkpoint),
            "--unconditional",
            "--num-samples",
            "2",
            "--max-new-tokens",
            "30",
            "--output",
            str(tmp_path / "uncond"),
            "--no-progress",
        ]
    )
    assert code == 0
    assert len(list((tmp_path / "uncond").glob("sample_*.jpg"))) == 2


def test_generate_refuses_another_tokenizer(checkpoint, photos, tmp_path, capsys):
    other = CodecTokenizer.train([p.read_bytes() for p in photos], "jpeg", 280)
    other.codec_spec = JpegCodec(size=64).spec
    other.save(tmp_path / "tok")
    code = main(
        [
            "generate",
            "--checkpoint",
            str(checkpoint),
            "--unconditional",
            "--tokenizer",
            str(tmp_path / "tok"),
            "--output",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("jpeglm generate: error: tokenizer ")
    assert "not the jpeg tokenizer this model was trained with" in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_writes_the_table(checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--images",
            str(photos[0].parent),
            "--ratios",
            "0.5",
            "--seeds",
            "2",
            "--top-k",
            "40",
            "--top-p",
            "0.9,1.0",
            "--feature-extractor",
            "small",
            "--batch-size",
            "3",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["ratio"], r["top_k"], r["top_p"]) for r in rows] == [
        (0.5, 40, 0.9),
        (0.5, 40, 1.0),
        (None, 40, 0.9),
        (None, 40, 1.0),
    ]
    for r in rows:
        assert np.isfinite(r["fid_mean"])
        assert r["fid_std"] >= 0
        assert r["seeds"] == 2
        assert r["images"] == len(photos)
        assert 0 <= r["complete_share"] <= 1
        assert r["tokens_per_s"] > 0
    table = (out / "results.md").read_text()
    assert "| 0.5 | 40 | 0.9 |" in table
    assert "| unconditional | 40 | 1 |" in table
