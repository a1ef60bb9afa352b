"""Cached and resumable data are keyed by the codec's settings, defaults included: a changed default is a new key.

JpegCodec's default resize filter became the reference's bilinear (it was bicubic); a synthetic set cached or a
`jpeglm prepare` job begun under the old default must not be reused or resumed with the new one's bytes.
"""

from __future__ import annotations

from jpeglm import prepare as prepare_module
from jpeglm import train_tokenizer
from jpeglm.codecs import AvcCodec, JpegCodec
from jpeglm.data_modules import SyntheticDataModule, synthetic

SETTINGS = {"val_fraction": 0.1, "seed": 0, "part_size": 8, "chunk_bytes": 2**20}


def old_default_jpeg(**kwargs) -> JpegCodec:
    return JpegCodec(**{"resample": "bicubic", **kwargs})


def test_codec_settings_hold_the_defaults():
    assert prepare_module.codec_settings(JpegCodec(size=64))["resample"] == "bilinear"
    assert prepare_module.codec_settings(JpegCodec(resample="bicubic"))["resample"] == "bicubic"
    assert prepare_module.codec_settings(AvcCodec())["qp"] == AvcCodec().qp
    assert prepare_module.codec_settings(None) is None


def test_synthetic_cache_directory_changes_with_the_jpeg_default(tmp_path, monkeypatch):
    now = SyntheticDataModule(seq_len=63, batch_size=2, num_images=8, cache_dir=str(tmp_path))
    assert now.settings["codec"]["resample"] == "bilinear"
    monkeypatch.setattr(synthetic, "JpegCodec", old_default_jpeg)
    before = SyntheticDataModule(seq_len=63, batch_size=2, num_images=8, cache_dir=str(tmp_path))
    assert before.settings["codec"]["resample"] == "bicubic"
    assert before.data_dir != now.data_dir


def fingerprint(photos, tmp_path, codec_options=None) -> str:
    job = prepare_module._make_job(
        "jpeg", [str(p) for p in photos], tmp_path / "out", None, None, SETTINGS, codec_options, None, False
    )
    return job.fingerprint


def test_prepare_fingerprint_changes_with_the_jpeg_default(photos, tmp_path, monkeypatch):
    now = fingerprint(photos, tmp_path)
    assert fingerprint(photos, tmp_path) == now  # stable: an interrupted job resumes
    monkeypatch.setitem(train_tokenizer.CODEC_FOR_MODALITY, "jpeg", old_default_jpeg)
    assert fingerprint(photos, tmp_path) != now
    assert fingerprint(photos, tmp_path, {"resample": "bicubic"}) != now
