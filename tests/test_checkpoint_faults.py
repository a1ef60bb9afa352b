"""`jpeglm fit` killed inside a checkpoint write, then `--ckpt_path last`: one device (a file) and FSDP2 on two
gloo processes (a sharded directory).

Each test runs `jpeglm fit` for 3 steps with a checkpoint after every step (``epoch=0-step=N.ckpt``, then
``last.ckpt``) and kills it inside its last write: ``last.ckpt`` of step 3 (tests/kill_in_write.py). Up to that
write the run was uninterrupted, so its whole ``epoch=0-step=3.ckpt`` holds the weights of an uninterrupted run.
``--ckpt_path last`` must then pass over the half-written checkpoint (saying so), resume from step 2's
``last.ckpt`` and train step 3 again to the same weights, bit for bit. Before jpeglm wrote checkpoints atomically
the file run resumed from a cut file (torch.load fails) and the FSDP2 run from step 3's shards with step 2's loop
state (it silently trained a 4th step).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_train import prepared_crops

from jpeglm.checkpoints import consolidate, load_checkpoint
from jpeglm.errors import UserError
from jpeglm.model import CodecLM
from jpeglm.trainer import (
    REPLACED,
    WRITING,
    SameCheckpointOnEveryRank,
    Trainer,
    check_same_checkpoint,
    commit,
    is_complete,
    newest_complete,
)

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_query_groups": 2, "intermediate_size": 64}
KILL_THEN_RESUME = [sys.executable, str(Path(__file__).with_name("kill_in_write.py")), "6", "fit"]  # 6: step 3's last
SHARDED = {
    "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
}


@pytest.fixture(scope="module")
def data(photos, tmp_path_factory) -> Path:
    """16 prepared 64x64 JPEG crops of the fixture photos: enough blocks for 3 steps on two ranks."""
    return prepared_crops(photos, tmp_path_factory.mktemp("fault_data"), 16, val_fraction=0.2)


def config(tmp_path: Path, data_dir: Path, **trainer) -> Path:
    run_dir = tmp_path / "run"
    checkpoint = {"every_n_train_steps": 1, "save_last": True, "save_top_k": -1, "save_on_train_epoch_end": True}
    settings = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "deterministic": True,
            "default_root_dir": str(run_dir),
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint}],
            **trainer,
        },
        "model": {"model_overrides": TINY, "learning_rate": 3e-3, "warmup_steps": 1},
        "data": {
            "class_path": "jpeglm.data_modules.codec.CodecDataModule",
            "init_args": {"data_dir": str(data_dir), "seq_len": 64, "batch_size": 2},
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def start(command: list[str], ranks: int) -> list[subprocess.Popen]:
    """``ranks`` processes of ``command``; two are started here as one node's two ranks, importing side by side."""
    env = [{}]
    if ranks > 1:
        shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "RESUME_PORT": free_port()}
        shared |= {"WORLD_SIZE": str(ranks), "NODE_RANK": "0"}
        env = [{**shared, "LOCAL_RANK": str(rank)} for rank in range(ranks)]
    return [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **e})
        for e in env
    ]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def finish(processes: list[subprocess.Popen]) -> str:
    """Wait for the ranks (killing any left over), check that each exited 0; rank 0's output."""
    try:
        outputs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, output in zip(processes, outputs, strict=True):
        assert p.returncode == 0, output[-5000:]
    return outputs[0]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def kill_then_resume(tmp_path: Path, data_dir: Path, ranks: int, **trainer) -> Path:
    """Kill a run inside step 3's ``last.ckpt``, resume it with ``--ckpt_path last``; its checkpoint directory."""
    path = config(tmp_path, data_dir, devices=ranks, **trainer)
    checkpoints = tmp_path / "run" / "checkpoints"
    output = finish(start([*KILL_THEN_RESUME, "--config", str(path)], ranks))
    killed, resumed = output.split("killed inside checkpoint write 6\n")
    # Step 3's own checkpoint was whole before the kill: the weights of an uninterrupted run.
    a, b = weights(checkpoints / "epoch=0-step=3.ckpt"), weights(checkpoints / "last.ckpt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert f"skipping {checkpoints / WRITING / 'last.ckpt'}: the run stopped while writing it" in resumed
    assert f"Restoring states from the checkpoint path at {checkpoints / 'last.ckpt'}" in resumed
    assert is_complete(checkpoints / "epoch=0-step=3-v1.ckpt"), "step 3 was not trained again"
    assert not (checkpoints / WRITING).exists()
    return checkpoints


@pytest.mark.slow
def test_one_device_killed_inside_a_checkpoint_file_resumes_from_the_last_whole_one(data, tmp_path):
    checkpoints = kill_then_resume(tmp_path, data, ranks=1)
    assert (checkpoints / "last.ckpt").is_file()


@pytest.mark.slow
def test_fsdp2_killed_inside_a_sharded_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(data, tmp_path):
    checkpoints = kill_then_resume(tmp_path, data, ranks=2, strategy=SHARDED)
    last = checkpoints / "last.ckpt"
    assert len(list(last.glob("*.distcp"))) == 2, "FSDP2 checkpoints are sharded directories"
    # `jpeglm consolidate` makes one file of it that torch.load reads and CodecLM loads strictly.
    single = consolidate(last, tmp_path / "model.ckpt")
    state = torch.load(single, map_location="cpu", weights_only=True)
    assert all(torch.equal(state["state_dict"][k], v) for k, v in weights(last).items())
    model = CodecLM(model_overrides=TINY, vocab_size=state["hyper_parameters"]["vocab_size"], seq_len=64)
    model.configure_model()
    model.load_state_dict(state["state_dict"], strict=True)


# ----------------------------------------------------------------------------------------------- without training


def _save(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    return path


def test_a_cut_file_or_an_unfinished_directory_is_not_complete(tmp_path):
    whole = _save(tmp_path / "whole.ckpt", 1)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:-30])
    assert is_complete(whole)
    assert not is_complete(cut)
    shards = tmp_path / "sharded.ckpt"
    shards.mkdir()
    (shards / "__0_0.distcp").write_bytes(b"x")
    (shards / ".metadata").write_bytes(b"x")
    assert not is_complete(shards)  # no meta.pt: its write was cut before the loop state
    _save(shards / "meta.pt", 1)
    assert is_complete(shards)


def test_last_is_the_newest_whole_checkpoint_and_skipped_ones_are_named(tmp_path):
    old = _save(tmp_path / "last.ckpt", 1)
    newer = _save(tmp_path / "last-v1.ckpt", 2)
    newer.write_bytes(newer.read_bytes()[:10])  # cut short (written before writes were atomic)
    partial = _save(tmp_path / WRITING / "last.ckpt", 3)
    os.utime(old, (time.time() - 60, time.time() - 60))
    path, warnings = newest_complete([tmp_path])
    assert path == old
    assert warnings == [
        f"skipping {partial}: the run stopped while writing it",
        f"skipping {newer}: it is not a whole checkpoint (cut short, or not a checkpoint)",
    ]
    assert newest_complete([tmp_path / "nothing"]) == (None, [])


def _sharded(path: Path, step: int) -> Path:
    """A directory with what a whole sharded checkpoint holds (stand-in shards and metadata, a real meta.pt)."""
    _save(path / "meta.pt", step)
    (path / "__0_0.distcp").write_bytes(b"shard")
    (path / ".metadata").write_bytes(b"metadata")
    return path


def test_a_directory_replaced_in_two_renames_is_never_lost(tmp_path):
    last = tmp_path / "last.ckpt"
    for step in (1, 2):
        commit(_sharded(tmp_path / WRITING / "last.ckpt", step), last)
        assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == step
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no scratch directory left

    # Killed between the two renames: the old directory waits in .replaced/, and `last` resumes from it.
    (tmp_path / REPLACED).mkdir()
    os.replace(last, tmp_path / REPLACED / "last.ckpt")
    _sharded(tmp_path / WRITING / "last.ckpt", 3)
    assert newest_complete([tmp_path])[0] == tmp_path / REPLACED / "last.ckpt"
    commit(tmp_path / WRITING / "last.ckpt", last)  # the resumed run's next save puts it right
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 3


class TwoRanks:
    """One rank of two whose checkpoint paths are ``paths`` (rank 0's first): the strategy's collectives."""

    def __init__(self, paths: list[str | None], rank: int) -> None:
        self.paths, self.global_rank = paths, rank
        self.broadcasts: list = []

    def broadcast(self, obj):
        self.broadcasts.append(obj)
        return self.paths[0]  # rank 0's object

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        assert not all  # any rank that differs stops every rank
        other = self.paths[1 - self.global_rank]
        return decision or other != self.paths[0]  # this rank's decision, or the other rank's


def test_ranks_that_would_resume_from_different_checkpoints_all_stop():
    for paths in (["a/last.ckpt", "a/last.ckpt"], [None, None]):
        for rank in (0, 1):
            check_same_checkpoint(ranks := TwoRanks(paths, rank), paths[rank])
            assert ranks.broadcasts == [paths[rank]]
    stale = ["a/epoch=0-step=8.ckpt", "a/epoch=0-step=6.ckpt"]  # rank 1's view of the directory is stale
    for rank in (0, 1):  # rank 0 agrees with itself, yet stops too: no rank is left waiting in a collective
        with pytest.raises(UserError, match=r"rank 0: a/epoch=0-step=8\.ckpt; rank \d: a/epoch=0-step=\d\.ckpt"):
            check_same_checkpoint(TwoRanks(stale, rank), stale[rank])
    with pytest.raises(UserError, match="rank 1: None"):  # rank 1 saw no checkpoint at all
        check_same_checkpoint(TwoRanks(["a/last.ckpt", None], 1), None)


@pytest.mark.filterwarnings("ignore:The `srun` command is available")
def test_the_ranks_compare_their_checkpoint_before_anything_is_loaded(tmp_path, monkeypatch):
    """The comparison runs in ``setup``, before Lightning loads the checkpoint (a sharded load needs every rank:
    a rank that skipped it would hang the others), with the path as given or as SLURM's requeue resolves it."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    import jpeglm.trainer

    seen = []

    def stop(strategy, path):
        seen.append(path)
        raise UserError("compared")

    monkeypatch.setattr(jpeglm.trainer, "check_same_checkpoint", stop)
    missing = tmp_path / "nowhere.ckpt"  # loading it would raise FileNotFoundError: the check comes first
    trainer = Trainer(logger=False, max_steps=1, enable_progress_bar=False, enable_model_summary=False)
    assert any(isinstance(c, SameCheckpointOnEveryRank) for c in trainer.callbacks)
    for call in (trainer.fit, trainer.validate, trainer.test):
        with pytest.raises(UserError, match="compared"):
            call(BoringModel(), ckpt_path=str(missing))
    assert seen == [str(missing)] * 3
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"")  # a SLURM requeue with no ckpt_path resumes from this
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    requeued = Trainer(logger=False, default_root_dir=tmp_path, max_steps=1, enable_progress_bar=False)
    with pytest.raises(UserError, match="compared"):
        requeued.fit(BoringModel())
    assert seen[-1] == str(tmp_path / "hpc_ckpt_3.ckpt")
