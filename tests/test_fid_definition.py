"""One FID definition (jpeglm.fid) for `jpeglm evaluate` and the FID callback, and the paper's numbers beside ours."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_run import fit

from jpeglm import evaluate as evaluate_module
from jpeglm import fid as fid_module
from jpeglm.callbacks import FIDCallback
from jpeglm.callbacks.gallery import media_modalities, originals
from jpeglm.codecs import JpegCodec
from jpeglm.errors import UserError
from jpeglm.evaluate import Row
from jpeglm.fid import PAPER_FID, fid_definition, fid_metric, real_picture


def test_real_pictures_are_the_crop_before_compression_or_the_decoded_stream(photos):
    codec = JpegCodec(size=64)
    stream = codec.encode(photos[0])
    reference = real_picture(codec, photos[0])
    assert np.array_equal(reference, codec.reference(photos[0]))
    decoded = real_picture(codec, stream, reals="decoded")
    assert np.array_equal(decoded, codec.preview(codec.decode(stream)))
    assert reference.shape == decoded.shape == (64, 64, 3)
    assert not np.array_equal(reference, decoded)  # quality 25 is lossy: the two definitions differ
    with pytest.raises(ValueError, match="reals must be one of"):
        real_picture(codec, stream, reals="compressed")


def test_the_definition_says_reals_resize_features_and_count():
    definition = fid_definition(fid_metric("small"), "small", "reference", 5, 5)
    assert definition["reals"] == "reference"
    assert "before JPEG compression" in definition["reals_are"]
    assert definition["resize"].startswith("none")
    assert (definition["feature_extractor"], definition["num_reals"], definition["num_fakes"]) == ("small", 5, 5)
    inception = SimpleNamespace(inception=SimpleNamespace(use_antialias=False))
    assert "TensorFlow-1.x-compatible" in fid_module.feature_resize(inception)
    antialiased = SimpleNamespace(inception=SimpleNamespace(use_antialias=True))
    assert "with antialiasing" in fid_module.feature_resize(antialiased)
    with pytest.raises(ValueError, match="reals"):
        fid_definition(fid_metric("small"), "small", "pixels", 1, 1)


def test_inception_is_asked_for_the_original_fid_resize(tmp_path, monkeypatch):
    import torchmetrics.image.fid as torchmetrics_fid

    made = {}

    def recording(feature, feature_extractor_weights_path, reset_real_features, sync_on_compute, antialias=True):
        made.update(feature=feature, antialias=antialias)
        return SimpleNamespace()

    monkeypatch.setattr(torchmetrics_fid, "FrechetInceptionDistance", recording)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    fid_metric("inception", str(weights))
    assert made == {"feature": 2048, "antialias": False}


def row(ratio: float | None) -> Row:
    return Row(ratio, 40, 1.0, 100.0, 1.0, 1.0, 10.0, 1, 8)


def test_paper_numbers_stand_beside_ours():
    assert PAPER_FID["imagenet"] == {0.25: 272.12, 0.5: 123.09, 0.75: 34.21, None: 121.35}
    assert PAPER_FID["ffhq"] == {0.375: 36.15, 0.4375: 31.22, 0.5: 27.15}
    rows = [evaluate_module._with_paper(row(r), "imagenet") for r in (0.5, 0.6, None)]
    assert [r.paper_fid for r in rows] == [123.09, None, 121.35]
    table = evaluate_module._table(rows)
    assert table[0] == (
        "| prompt ratio | kept | top-k | top-p | FID | paper FID | complete | tokens/s | images x seeds |"
    )
    assert table[2].startswith("| 0.5 | - | 40 | 1 | 100.00 ± 1.00 | 123.09 |")
    assert table[3].startswith("| 0.6 | - | 40 | 1 | 100.00 ± 1.00 | - |")
    assert table[4].startswith("| unconditional | - | 40 | 1 | 100.00 ± 1.00 | 121.35 |")
    assert evaluate_module._with_paper(row(0.4375), "ffhq").paper_fid == 31.22
    assert evaluate_module._with_paper(row(None), "ffhq").paper_fid is None
    plain = evaluate_module._table([evaluate_module._with_paper(row(0.5), "none")])
    assert "paper FID" not in plain[0]


def test_evaluate_refuses_an_unknown_paper_dataset_before_any_work(tmp_path):
    with pytest.raises(UserError, match="paper must be one of"):
        evaluate_module.evaluate("/no/such.ckpt", ["/no/images"], str(tmp_path), paper="cifar")


def test_the_callback_uses_the_definition_with_decoded_reals(tmp_path, monkeypatch):
    trainer, model = fit(tmp_path, [], steps=1)
    [modality] = media_modalities(trainer.datamodule)
    reals = []
    update = fid_module._update

    def recording(metric, pictures, real):
        if real:
            reals.extend(pictures)
        return update(metric, pictures, real)

    monkeypatch.setattr(fid_module, "_update", recording)
    callback = FIDCallback(num_samples=3, feature_extractor="small", max_new_tokens=4, constrain=False)
    callback.evaluate(trainer, model, end=True)
    expected = [real_picture(modality.codec, s, reals="decoded") for s in originals(modality, 3)]
    assert len(reals) == 3
    assert all(np.array_equal(a, b) for a, b in zip(reals, expected, strict=True))
    assert callback.definition == fid_definition(callback.metric, "small", "decoded", 3, 3)
    assert torch.is_tensor(callback.metric.real_features_sum)
