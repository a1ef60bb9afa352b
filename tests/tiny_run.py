"""A tiny training run on built-in synthetic 64x64 JPEGs, for the gallery, FID and command tests.

Test modules import it as ``tiny_run`` (pytest puts this folder on sys.path because it holds the rootdir conftest).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from jpeglm.data_modules import SyntheticDataModule
from jpeglm.model import CodecLM

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_query_groups": 2, "intermediate_size": 172}


def data(cache: Path, captions: bool = False) -> SyntheticDataModule:
    return SyntheticDataModule(
        captions=captions,
        seq_len=512,
        batch_size=4,
        num_images=48,
        image_size=64,
        val_fraction=0.2,
        cache_dir=str(cache),
        tokenizer_vocab_size=300,
    )


def fit(
    tmp_path: Path, callbacks: list, steps: int = 4, name: str = "run", captions: bool = False
) -> tuple[L.Trainer, CodecLM]:
    """Train a 2-layer CodecLM for ``steps`` steps under ``tmp_path / name`` (data cached next to ``tmp_path``;
    ``captions``: the captioned pictures)."""
    L.seed_everything(3)
    dm = data(tmp_path.parent / "synthetic-cache", captions)
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


def fit_checkpoint(tmp_path: Path, steps: int, captions: bool = False) -> tuple[L.Trainer, CodecLM, Path]:
    """:func:`fit` with no callbacks, then the trained model saved as ``tmp_path / "model.ckpt"``."""
    trainer, model = fit(tmp_path, [], steps=steps, captions=captions)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return trainer, model, path
