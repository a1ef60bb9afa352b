"""`LogLines` on a fake trainer driven through Lightning's order of hooks: which step each line names.

tests/test_train.py runs it inside a real `jpeglm fit` and compares the steps with what the logger recorded.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch

from jpeglm.callbacks import LogLines


def fake_trainer(max_steps: int = 4) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=0,
        callback_metrics={},
        is_global_zero=True,
        sanity_checking=False,
        state=SimpleNamespace(fn="fit"),
        world_size=1,
        max_steps=max_steps,
    )


BATCH = {"input_ids": torch.zeros(2, 9, dtype=torch.long)}


def validate(callback: LogLines, trainer: SimpleNamespace, bits_per_byte: float) -> None:
    trainer.callback_metrics["val/bits_per_byte"] = torch.tensor(bits_per_byte)
    callback.on_validation_end(trainer, None)


def train_batch(callback: LogLines, trainer: SimpleNamespace, index: int, steps: bool, loss: float) -> None:
    callback.on_train_batch_start(trainer, None, BATCH, index)
    trainer.global_step += steps  # the optimizer step happens inside the batch
    trainer.callback_metrics["train/loss"] = torch.tensor(loss)
    callback.on_train_batch_end(trainer, None, None, BATCH, index)


def test_lines_name_the_logger_step_and_when_validation_values_were_measured(capsys):
    callback, trainer = LogLines(every_n_steps=2), fake_trainer()
    callback.on_train_start(trainer, None)
    callback.on_train_batch_start(trainer, None, BATCH, 0)
    validate(callback, trainer, 5.0)  # InitialValidation: before any step
    for index in range(4):
        train_batch(callback, trainer, index, steps=True, loss=3.0 - index)
        if index == 1:
            validate(callback, trainer, 4.37)  # Lightning's in-loop validation after the 2nd step
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "validation at step 0 | val/bits_per_byte 5"  # plain on validation lines
    assert lines[1].startswith("step 1 (2/4 done, 50%) | train/loss 2 | val/bits_per_byte 5 @0 | ")
    assert lines[2] == "validation at step 1 | val/bits_per_byte 4.37"
    assert lines[3].startswith("step 3 (4/4 done, 100%) | train/loss 0 | val/bits_per_byte 4.37 @1 | ")
    assert re.search(r"\| \d+ tok/s \| \d\d:\d\d:\d\d elapsed, ETA \d\d:\d\d:\d\d$", lines[1]), lines[1]
    assert len(lines) == 4


def test_with_gradient_accumulation_the_step_is_counted_at_the_batch_that_steps(capsys):
    callback, trainer = LogLines(every_n_steps=1), fake_trainer(max_steps=2)
    callback.on_train_start(trainer, None)
    train_batch(callback, trainer, 0, steps=False, loss=3.0)
    validate(callback, trainer, 4.5)  # mid-accumulation (val_check_interval counts batches): nothing stepped yet
    train_batch(callback, trainer, 1, steps=True, loss=2.5)
    validate(callback, trainer, 4.0)  # right after the 1st step: still the 1st step's logger step, 0
    train_batch(callback, trainer, 2, steps=False, loss=2.0)
    validate(callback, trainer, 3.5)  # the 1st step is counted now: 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "validation at step 0 | val/bits_per_byte 4.5"
    assert lines[1].startswith("step 0 (1/2 done, 50%) | train/loss 2.5 | val/bits_per_byte 4.5 @0 | ")
    assert lines[2] == "validation at step 0 | val/bits_per_byte 4"
    assert lines[3] == "validation at step 1 | val/bits_per_byte 3.5"
    assert len(lines) == 4  # one line per optimizer step, not per batch
