"""SyntheticDataModule: deterministic procedural pictures, prepared once into a cache, safe when processes race."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from jpeglm.data_modules import SyntheticDataModule
from jpeglm.data_modules.synthetic import procedural_clip, procedural_image
from jpeglm.tokenizer import MODALITIES


def test_pictures_are_deterministic_and_varied():
    first = np.asarray(procedural_image(7, 0, 32))
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, np.asarray(procedural_image(7, 0, 32)))
    assert not np.array_equal(first, np.asarray(procedural_image(7, 1, 32)))
    assert not np.array_equal(first, np.asarray(procedural_image(8, 0, 32)))
    clip = procedural_clip(7, 0, 48, 32, frames=4)
    assert len(clip) == 4
    assert clip[0].shape == (32, 48, 3)


def test_builds_once_then_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")  # rank 1 of a training job under srun: still the whole set, alone
    monkeypatch.setenv("SLURM_PROCID", "1")
    start = time.perf_counter()
    module = SyntheticDataModule(seq_len=127, batch_size=4, num_images=64, cache_dir=str(tmp_path))
    assert module.vocab_size > 264  # reading the vocabulary builds the set (the CLI links it to the model)
    assert time.perf_counter() - start < 20
    stamp = (module.data_dir / "dataset.json").stat().st_mtime_ns
    again = SyntheticDataModule(seq_len=127, batch_size=4, num_images=64, cache_dir=str(tmp_path))
    again.prepare_data()
    again.setup("fit")
    assert again.data_dir == module.data_dir
    assert (again.data_dir / "dataset.json").stat().st_mtime_ns == stamp
    batch = next(iter(again.train_dataloader()))
    assert batch["input_ids"].shape == (4, 128)
    assert batch["modality"].tolist() == [MODALITIES["jpeg"]] * 4
    other = SyntheticDataModule(seq_len=127, batch_size=4, num_images=64, seed=1, cache_dir=str(tmp_path))
    assert other.data_dir != module.data_dir
    assert again.dataset.splits["train"]["items"] + again.dataset.splits["val"]["items"] == 64
    decoded = again.codec.decode(again.tokenizer.decode(next(again.dataset.samples("train"))))
    assert decoded.complete


def test_processes_racing_to_build_the_set_build_it_once(tmp_path, monkeypatch):
    """prepare_data on one process per node and setup on every rank may run at once: one builds, all see it."""
    builds = []
    build = SyntheticDataModule._build

    def counted(module):
        builds.append(module)
        time.sleep(0.5)  # a slow build: the others must wait for it, not start their own
        build(module)

    monkeypatch.setattr(SyntheticDataModule, "_build", counted)
    modules = [SyntheticDataModule(seq_len=63, batch_size=2, num_images=16, cache_dir=str(tmp_path)) for _ in range(3)]
    errors = []

    def start(module, hook):
        try:
            hook(module)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    hooks = [SyntheticDataModule.prepare_data, lambda m: m.setup("fit"), lambda m: m.vocab_size]
    threads = [threading.Thread(target=start, args=(m, h)) for m, h in zip(modules, hooks, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({m.vocab_size for m in modules}) == 1
    assert len(builds) == 1


def test_video_clips(tmp_path):
    module = SyntheticDataModule(seq_len=255, batch_size=2, num_images=8, modality="avc", cache_dir=str(tmp_path))
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["modality"].tolist() == [MODALITIES["avc"]] * 2
    video = module.codec.decode(module.tokenizer.decode(next(module.dataset.samples("train"))))
    assert video.complete


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 16"):
        SyntheticDataModule(seq_len=8, batch_size=1, image_size=40)
    with pytest.raises(ValueError, match="'jpeg' or 'avc'"):
        SyntheticDataModule(seq_len=8, batch_size=1, modality="text")
