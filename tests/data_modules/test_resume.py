"""Exact resume through Lightning's Trainer: after ``fit(ckpt_path=...)`` a run trains on exactly the batches an
uninterrupted run trains on, mid-epoch, at an epoch's end and in later epochs, with 0 or 2 loader workers,
for one dataset and for a mixture, on one rank and on two."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import SingleDeviceStrategy
from recording import fit

from jpeglm.data_modules import CodecDataModule, MixedDataModule

# Resuming without the ModelCheckpoint that wrote the checkpoint is what the tests mean to do.
pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

SEQ_LEN, BATCH = 63, 4


def codec_module(token_dataset, num_workers: int) -> CodecDataModule:
    data = token_dataset("codec", items=(24, 4))
    return CodecDataModule(str(data), seq_len=SEQ_LEN, batch_size=BATCH, num_workers=num_workers)


def mixed_module(token_dataset, num_workers: int) -> MixedDataModule:
    jpeg = token_dataset("jpeg", items=(24, 4), seed=1)
    text = token_dataset("text", modality="text", num_ids=300, items=(16, 4), seed=2)
    return MixedDataModule([str(jpeg), str(text)], [0.7, 0.3], SEQ_LEN, BATCH, num_workers=num_workers)


MODULES = {"codec": codec_module, "mixed": mixed_module}


def epoch_length(module) -> int:
    return len(module.train_dataloader())


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["codec", "mixed"])
def test_resumed_run_sees_the_batches_of_an_uninterrupted_run(token_dataset, tmp_path, kind, num_workers):
    make = MODULES[kind]
    length = epoch_length(make(token_dataset, num_workers))
    assert length >= 8
    total = 2 * length + length // 2  # into the third epoch
    uninterrupted = fit(make(token_dataset, num_workers), tmp_path / "a", max_steps=total, checkpoint_every=1)
    assert [epoch for _, epoch, _, _ in uninterrupted] == [s // length for s in range(total)]
    assert len({d for _, _, d, _ in uninterrupted[:length]}) == length  # every batch of an epoch differs
    assert uninterrupted[:length] != uninterrupted[length : 2 * length]  # and each epoch is reshuffled

    for step in (length // 2, length, length + 3):  # mid-epoch, at the end of an epoch, in the second epoch
        checkpoint = str(tmp_path / "a" / f"step={step}.ckpt")
        resumed = fit(make(token_dataset, num_workers), tmp_path / "b", max_steps=total, ckpt_path=checkpoint)
        assert resumed == uninterrupted[step:], f"resumed from step {step}"


class RestoreAfterSetup(SingleDeviceStrategy):
    """Restores checkpoints after ``configure_optimizers``, as Lightning's FSDP and ModelParallel strategies do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


@pytest.mark.parametrize("restore_after_setup", [False, True])
def test_resume_survives_reading_estimated_stepping_batches(token_dataset, tmp_path, restore_after_setup):
    """With ``max_epochs`` set, reading the estimate builds the loader before the checkpoint is restored."""
    make = MODULES["codec"]
    length = epoch_length(make(token_dataset, 0))
    args = {"max_epochs": 2, "read_stepping_batches": True}
    if restore_after_setup:
        args["strategy"] = RestoreAfterSetup(torch.device("cpu"), accelerator=CPUAccelerator())
    uninterrupted = fit(make(token_dataset, 0), tmp_path / "a", checkpoint_every=1, **args)
    assert len(uninterrupted) == 2 * length
    step = length + 2
    resumed = fit(make(token_dataset, 0), tmp_path / "b", ckpt_path=str(tmp_path / "a" / f"step={step}.ckpt"), **args)
    assert resumed == uninterrupted[step:]


def test_state_dict_round_trip_without_a_trainer(token_dataset):
    """The data module alone: its state after k batches, loaded into a new module, continues the stream."""
    first = MODULES["mixed"](token_dataset, 0)
    stream = iter(first.train_dataloader())
    for _ in range(5):
        next(stream)
    state = first.state_dict()
    expected = next(stream)["input_ids"]
    second = MODULES["mixed"](token_dataset, 0)
    second.load_state_dict(state)
    assert second.state_dict() == state  # kept until the loader is built
    assert (next(iter(second.train_dataloader()))["input_ids"] == expected).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path: Path, name: str, data: dict, fit_args: dict, world_size: int = 2) -> list[list]:
    """Start one process per rank as a launcher would (env vars), each recording its batches."""
    spec = tmp_path / f"{name}.json"
    out = str(tmp_path / f"{name}-rank{{rank}}.json")
    spec.write_text(json.dumps({"data": data, "fit": fit_args, "root": str(tmp_path / "ckpt"), "out": out}))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world_size)}
    script = Path(__file__).with_name("recording.py")
    logs = [tmp_path / f"{name}-rank{rank}.log" for rank in range(world_size)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(spec)],
            env={**env, "NODE_RANK": "0", "LOCAL_RANK": str(rank)},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        for rank, log in enumerate(logs)
    ]
    deadline = time.monotonic() + 180
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode not in (None, 0) for p in procs):
            break  # a rank failed: the others would wait for it forever
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"{log.name} (exit {p.returncode}):\n" + log.read_text()[-4000:]
    return [json.loads(Path(out.format(rank=r)).read_text()) for r in range(world_size)]


@pytest.mark.slow
def test_two_ranks_resume_exactly(token_dataset, tmp_path):
    """Two ranks (gloo on CPU) mixing two sources: each rank resumes its own stream, and the ranks differ."""
    jpeg = token_dataset("jpeg", items=(20, 4), seed=1)
    text = token_dataset("text", modality="text", num_ids=300, items=(16, 4), seed=2)
    args = {"sources": [str(jpeg), str(text)], "weights": [0.7, 0.3], "seq_len": SEQ_LEN, "batch_size": BATCH}
    data = {"class": "MixedDataModule", "args": {**args, "num_workers": 1}}
    total, step = 20, 13
    uninterrupted = _run_ranks(tmp_path, "a", data, {"max_steps": total, "checkpoint_every": step})
    resumed = _run_ranks(
        tmp_path, "b", data, {"max_steps": total, "ckpt_path": str(tmp_path / "ckpt" / f"step={step}.ckpt")}
    )
    assert all(len(seen) == total for seen in uninterrupted)
    assert uninterrupted[0][-1][1] >= 1, "the run should cross an epoch"
    assert {d for _, _, d, _ in uninterrupted[0]}.isdisjoint(d for _, _, d, _ in uninterrupted[1])
    for rank in range(2):
        assert resumed[rank] == uninterrupted[rank][step:], f"rank {rank}"
