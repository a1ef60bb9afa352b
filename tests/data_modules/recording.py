"""A tiny training run that records every batch it trains on: the probe of the exact-resume tests.

Used in-process by test_resume.py, and as a script for runs on several ranks (one process per rank, started
the way a cluster launcher starts them: MASTER_ADDR, MASTER_PORT, WORLD_SIZE, NODE_RANK, LOCAL_RANK)::

    python recording.py SPEC.json     # SPEC: {"data": {"class": ..., "args": {...}}, "fit": {...}, "out": ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import Strategy


def digest(ids: torch.Tensor) -> str:
    return hashlib.blake2b(ids.cpu().numpy().tobytes(), digest_size=8).hexdigest()


class BatchRecorder(LightningModule):
    """Trains one parameter and records ``[global_step, epoch, digest of input_ids, modality]`` per batch.

    Args:
        read_stepping_batches: read ``trainer.estimated_stepping_batches`` in ``configure_optimizers``, as LR
            schedules do (with ``max_epochs`` set it makes Lightning build the train loader before restoring a
            checkpoint: litdata #775, Lightning #20550).
    """

    def __init__(self, read_stepping_batches: bool = False) -> None:
        super().__init__()
        self.read_stepping_batches = read_stepping_batches
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[Any]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]  # (B, seq_len + 1)
        self.seen.append([self.global_step, self.current_epoch, digest(ids), batch["modality"].tolist()])
        return self.weight * ids.float().mean() / 1000

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.read_stepping_batches:
            assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(
    datamodule: Any,
    root: Path,
    max_steps: int = -1,
    max_epochs: int | None = None,
    checkpoint_every: int | None = None,
    ckpt_path: str | None = None,
    read_stepping_batches: bool = False,
    **trainer_args: Any,
) -> list[list[Any]]:
    """Train a :class:`BatchRecorder` on ``datamodule``; checkpoints ``root/step=N.ckpt`` every N steps."""
    callbacks = []
    if checkpoint_every:
        callbacks.append(
            ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=checkpoint_every, save_top_k=-1)
        )
    model = BatchRecorder(read_stepping_batches)
    if not isinstance(trainer_args.get("strategy"), Strategy):  # a strategy object brings its accelerator
        trainer_args["accelerator"] = "cpu"
    trainer = Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_checkpointing=bool(checkpoint_every),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        **trainer_args,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model.seen


def main(spec_path: str) -> None:
    import jpeglm.data_modules as data_modules

    spec = json.loads(Path(spec_path).read_text())
    datamodule = getattr(data_modules, spec["data"]["class"])(**spec["data"]["args"])
    seen = fit(datamodule, Path(spec["root"]), strategy="ddp", devices=int(os.environ["WORLD_SIZE"]), **spec["fit"])
    Path(spec["out"].format(rank=os.environ["LOCAL_RANK"])).write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])
