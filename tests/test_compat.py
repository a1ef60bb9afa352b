"""jpeglm/_compat.py: the installed libraries still have every private name jpeglm relies on, in a checked version.

When a test here fails after an upgrade, its id names the private name that moved or the package whose version
left the checked range; jpeglm/_compat.py says what each name does and what would replace it.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from jpeglm import _compat
from jpeglm._compat import CHECKED, check_versions

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ versions


def test_installed_versions_are_the_checked_ones():
    problems = check_versions()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("package", "version"),
    [
        ("litdata", "0.3.0"),
        ("litdata", "0.2.49"),
        ("lightning", "2.7.0rc1"),
        ("lightning", "2.4.3"),
        ("torch", "3.0.0"),
    ],
)
def test_a_version_outside_the_checked_range_is_reported(monkeypatch, package, version):
    real = _compat.installed_version
    monkeypatch.setattr(_compat, "installed_version", lambda p: version if p == package else real(p))
    (problem,) = check_versions()
    (checked,) = {(c.lowest, c.below) for c in CHECKED.values() if c.package == package}
    assert problem.startswith(f"{package} {version} is installed")
    assert f"{package}>={checked[0]},<{checked[1]}" in problem  # the range, and what to install
    assert "pip install" in problem  # what to do
    assert "jpeglm/_compat.py" in problem
    assert next(name for name, c in CHECKED.items() if c.package == package) in problem  # which names


def test_a_missing_package_is_reported(monkeypatch):
    real = _compat.installed_version
    monkeypatch.setattr(_compat, "installed_version", lambda p: None if p == "litdata" else real(p))
    (problem,) = check_versions()
    assert problem.startswith("litdata is not installed")


@pytest.mark.parametrize(
    ("version", "inside"),
    [
        ("0.2.50", True),
        ("0.2.76", True),
        ("0.2.76.post1", True),
        ("0.2.49", False),
        ("0.3", False),
        ("0.3.0.dev1", False),
    ],
)
def test_version_ranges(version, inside):
    assert _compat._within(version, "0.2.50", "0.3") is inside


def test_local_builds_count_as_their_release():
    assert _compat._within("2.14.1+cu128", "2.4", "3")


def test_pyproject_bounds_are_the_checked_ranges():
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("litdata", "lightning"):
        (checked,) = {(c.lowest, c.below) for c in CHECKED.values() if c.package == package}
        assert f"{package}>={checked[0]},<{checked[1]}" in dependencies, (
            f"pyproject.toml and CHECKED disagree on {package}"
        )
    torch_spec = next(d for d in dependencies if re.match(r"torch\b", d))
    assert not re.search(r"<|==|~=", torch_spec), "torch is never pinned"


# ------------------------------------------------------------------------------------------------ names still exist


def write_blocks(path: Path, seed: int = 0) -> Path:
    """A litdata dataset of 8 items of 40 uint16 ids (TokensLoader layout)."""
    from litdata.streaming.item_loader import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(path), chunk_bytes=256, item_loader=TokensLoader())
    rng = np.random.default_rng(seed)
    for i in range(8):
        writer.add_item(i, rng.integers(8, 300, 40).astype(np.uint16))
    writer.done()
    writer.merge()
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two iterated TokenBlocks (their worker_env is set) and their weighted mixture."""
    from litdata import CombinedStreamingDataset

    from jpeglm.data_modules.codec import TokenBlocks

    root = tmp_path_factory.mktemp("compat")
    members = [TokenBlocks(write_blocks(root / f"d{i}", i), block_size=16, modality_id=3) for i in range(2)]
    for member in members:
        next(iter(member))
    return members, CombinedStreamingDataset(members, weights=[3.0, 1.0], seed=0, iterate_over_all=False)


def _module_attribute(module: str, name: str):
    import importlib

    return hasattr(importlib.import_module(module), name)


def _has_path(obj, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _resume_calls_replay_sampling() -> bool:
    from litdata import StreamingDataset

    # replay_counts patches the module global; it works only while _resume looks it up there.
    return hasattr(StreamingDataset, "_resume") and "_replay_sampling(" in inspect.getsource(StreamingDataset._resume)


def _tokens_loader_reads(name: str) -> bool:
    from litdata.streaming.item_loader import BaseItemLoader, TokensLoader

    # padded_tokens_loader reads the chunks' dims as TokensLoader does, and waits for a chunk as it does.
    if name == "_chunks":
        return "self._chunks" in inspect.getsource(TokensLoader.generate_intervals)
    source = inspect.getsource(TokensLoader.load_item_from_chunk)
    return hasattr(BaseItemLoader, name) and f"self.{name}(" in source


def _distributed_env_type() -> bool:
    from litdata.utilities import env

    parameters = list(inspect.signature(env._DistributedEnv).parameters) if hasattr(env, "_DistributedEnv") else []
    return parameters == ["world_size", "global_rank", "num_nodes"]


def _obstore_switch() -> bool:
    from litdata.streaming import downloader

    # boto3_chunk_downloads works while obstore_usable() reads the module global it sets.
    reads_it = "_OBSTORE_INIT_PID" in inspect.getsource(downloader.obstore_usable)
    return hasattr(downloader, "_OBSTORE_INIT_PID") and reads_it


def _trainer_flag() -> bool:
    import lightning as L
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # InitialValidation copies what Lightning's own in-loop validation does around val_loop.run().
    mirrored = "_first_loop_iter" in inspect.getsource(_TrainingEpochLoop.on_advance_end)
    return _has_path(trainer, "_logger_connector._first_loop_iter") and mirrored


def _hpc_resume_path() -> bool:
    import lightning as L
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # What Trainer.fit loads under SLURM when given no ckpt_path, and for ckpt_path="hpc".
    used = "self._hpc_resume_path" in inspect.getsource(_CheckpointConnector._parse_ckpt_path)
    return _has_path(trainer, "_checkpoint_connector._hpc_resume_path") and used


def _compiled_prefix() -> bool:
    return all(k.startswith("_orig_mod.") for k in torch.compile(nn.Linear(2, 2)).state_dict())


def _checkpoint_prefix() -> bool:
    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as module

    wrapped_part = module._CHECKPOINT_WRAPPED_MODULE
    return wrapped_part == _compat.WRAPPED_PARAMETER_PARTS[0]


def _fsdp2_state(name: str) -> bool:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    if name == "_get_fsdp_state":
        return hasattr(FSDPModule, name)
    if name == "_fsdp_param_groups":  # an instance attribute, set in __init__
        return "self._fsdp_param_groups" in inspect.getsource(FSDPState.__init__)
    return hasattr(FSDPState, name)


def _fsdp2_reshard_setting() -> bool:
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    # FSDP2 frees a group's gathered parameters after a forward exactly when post_forward_mesh_info is set.
    setting = inspect.getattr_static(FSDPParamGroup, "_reshard_after_forward", None)
    return isinstance(setting, property) and "post_forward_mesh_info is not None" in inspect.getsource(setting.fget)


EXISTS = {
    "litdata.StreamingDataset.distributed_env.global_rank": lambda d: _has_path(d[0][0], "distributed_env.global_rank"),
    "litdata.utilities.env._DistributedEnv": lambda d: _distributed_env_type(),
    "litdata.streaming.item_loader.TokensLoader._chunks": lambda d: _tokens_loader_reads("_chunks"),
    "litdata.streaming.item_loader.BaseItemLoader._wait_until_chunk_ready": lambda d: _tokens_loader_reads(
        "_wait_until_chunk_ready"
    ),
    "litdata.streaming.dataset._replay_sampling": lambda d: _module_attribute(
        "litdata.streaming.dataset", "_replay_sampling"
    ),
    "litdata.StreamingDataset._resume": lambda d: _resume_calls_replay_sampling(),
    "litdata.StreamingDataset.worker_env.world_size": lambda d: _has_path(d[0][0], "worker_env.world_size"),
    "litdata.StreamingDataset.distributed_env.world_size": lambda d: _has_path(d[0][0], "distributed_env.world_size"),
    "litdata.StreamingDataset.input_dir.path": lambda d: _has_path(d[0][0], "input_dir.path"),
    "litdata.streaming.downloader._OBSTORE_INIT_PID": lambda d: _obstore_switch(),
    "litdata.CombinedStreamingDataset._datasets": lambda d: _has_path(d[1], "_datasets"),
    "litdata.CombinedStreamingDataset._weights": lambda d: _has_path(d[1], "_weights"),
    "litdata.CombinedStreamingDataset._num_samples_yielded": lambda d: _has_path(d[1], "_num_samples_yielded"),
    "lightning.pytorch.Trainer._logger_connector._first_loop_iter": lambda d: _trainer_flag(),
    "lightning.pytorch.Trainer._checkpoint_connector._hpc_resume_path": lambda d: _hpc_resume_path(),
    "lightning.fabric.utilities.load._load_distributed_checkpoint": lambda d: _module_attribute(
        "lightning.fabric.utilities.load", "_load_distributed_checkpoint"
    ),
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper": lambda d: _module_attribute(
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "checkpoint_wrapper"
    ),
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper._CHECKPOINT_WRAPPED_MODULE": lambda d: (
        _checkpoint_prefix()
    ),
    "torch._dynamo.eval_frame.OptimizedModule._orig_mod": lambda d: _compiled_prefix(),
    "torch.distributed.fsdp.FSDPModule._get_fsdp_state": lambda d: _fsdp2_state("_get_fsdp_state"),
    "torch.distributed.fsdp._fully_shard._fsdp_state.FSDPState._lazy_init": lambda d: _fsdp2_state("_lazy_init"),
    "torch.distributed.fsdp._fully_shard._fsdp_state.FSDPState._fsdp_param_groups": lambda d: _fsdp2_state(
        "_fsdp_param_groups"
    ),
    "torch.distributed.fsdp._fully_shard._fsdp_param_group.FSDPParamGroup.post_forward_mesh_info": lambda d: (
        _fsdp2_reshard_setting()
    ),
}


def test_every_private_name_in_compat_has_an_existence_check():
    assert set(EXISTS) == set(CHECKED), "add a check to EXISTS for each name in _compat.CHECKED (and back)"


@pytest.mark.parametrize("name", sorted(CHECKED))
def test_private_name_still_exists(name, datasets):
    checked = CHECKED[name]
    version = _compat.installed_version(checked.package)
    assert EXISTS[name](datasets), (
        f"{name} is gone from {checked.package} {version} (checked on >={checked.lowest},<{checked.below}); "
        f"used in {checked.used_in}; replacement: {checked.replacement}. See jpeglm/_compat.py."
    )


def test_a_removed_private_name_fails_its_check(monkeypatch, datasets):
    from litdata.streaming import dataset as litdata_dataset

    monkeypatch.delattr(litdata_dataset, "_replay_sampling")
    assert not EXISTS["litdata.streaming.dataset._replay_sampling"](datasets)
    monkeypatch.delattr(datasets[1], "_weights")
    assert not EXISTS["litdata.CombinedStreamingDataset._weights"](datasets)
    assert EXISTS["litdata.CombinedStreamingDataset._datasets"](datasets)


# ------------------------------------------------------------------------------------------------ the helpers


def test_litdata_helpers_read_what_litdata_holds(datasets):
    members, mixture = datasets
    assert _compat.combined_members(mixture) == members
    assert _compat.combined_weights(mixture) == pytest.approx([0.75, 0.25])
    assert _compat.samples_yielded(mixture) is None  # no state loaded
    assert _compat.world_size(members[0]) == 1
    assert _compat.loader_workers(members[0]) == 1  # iterated in this process
    assert _compat.local_dir(members[1]).name == "d1"


def test_replay_counts_replaces_the_split_and_restores_it():
    from litdata.streaming import dataset as litdata_dataset

    original = litdata_dataset._replay_sampling
    assert original(10, 2, 2) == {0: 6, 1: 4}
    with _compat.replay_counts({0: 3, 1: 7}):
        assert litdata_dataset._replay_sampling(10, 2, 2) == {0: 3, 1: 7}
    assert litdata_dataset._replay_sampling is original
    with pytest.raises(RuntimeError), _compat.replay_counts({0: 1}):
        raise RuntimeError
    assert litdata_dataset._replay_sampling is original


def test_token_blocks_override_litdata_resume_through_compat():
    from litdata import StreamingDataset

    from jpeglm.data_modules.codec import TokenBlocks

    assert TokenBlocks._resume is _compat.ResumeAtWorkerCounts._resume
    assert TokenBlocks.__mro__.index(_compat.ResumeAtWorkerCounts) < TokenBlocks.__mro__.index(StreamingDataset)


def test_token_blocks_resume_at_the_count_a_mixture_gives(tmp_path):
    """litdata's own split of one count (4 blocks) versus a mixture's per-worker count (2 blocks)."""
    from jpeglm.data_modules.codec import TokenBlocks

    directory = write_blocks(tmp_path / "d")

    def blocks(samples_per_worker=None, state=None):
        dataset = TokenBlocks(directory, block_size=16, modality_id=3, shuffle=True, seed=1)
        if state is not None:
            dataset.load_state_dict(state)
        dataset.samples_per_worker = samples_per_worker
        return [item["input_ids"].tolist() for item in dataset]

    uninterrupted = blocks()
    state = TokenBlocks(directory, 16, 3, shuffle=True, seed=1).state_dict(4, num_workers=1, batch_size=1)
    assert blocks(None, state) == uninterrupted[4:]
    assert blocks({0: 2}, state) == uninterrupted[2:]


def test_first_loop_iter_round_trip():
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    before = _compat.first_loop_iter(trainer)
    _compat.set_first_loop_iter(trainer, True)
    assert _compat.first_loop_iter(trainer) is True
    _compat.set_first_loop_iter(trainer, before)
    assert _compat.first_loop_iter(trainer) is before


def test_checkpoint_wrapper_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    wrapped = nn.Sequential(_compat.checkpoint_wrapper(plain[0]), plain[1], plain[2])
    x = torch.randn(3, 4)
    plain(x).sum().backward()
    expected = [p.grad.clone() for p in plain.parameters()]
    plain.zero_grad()
    torch.testing.assert_close(wrapped(x), plain(x))
    wrapped(x).sum().backward()
    torch.testing.assert_close([p.grad for p in plain.parameters()], expected)
    assert any(_compat.WRAPPED_PARAMETER_PARTS[0] in name for name, _ in wrapped.named_parameters())


def test_epoch_plan_is_what_litdata_yields(tmp_path):
    """The replayed assignment of an epoch (shuffled, 2 workers) is the blocks litdata's workers yield, in order."""
    from litdata import StreamingDataLoader

    from jpeglm.data_modules.codec import TokenBlocks

    blocks = TokenBlocks(write_blocks(tmp_path / "d", 3), block_size=16, modality_id=3, shuffle=True, seed=5)
    loader = StreamingDataLoader(blocks, batch_size=2, num_workers=2)
    epochs = [[row.tolist() for batch in loader for row in batch["input_ids"]] for _ in range(2)]
    for epoch, seen in enumerate(epochs, start=1):
        plan = _compat.epoch_plan(blocks, 1, 1, 2, 2, epoch)  # worker 0's batches, then worker 1's, in turn
        batches = [[plan[w][i : i + 2] for i in range(0, len(plan[w]), 2)] for w in range(2)]
        order = [i for j in range(len(batches[0])) for w in range(2) if j < len(batches[w]) for i in batches[w][j]]
        assert [blocks[i]["input_ids"].tolist() for i in order] == seen
    assert epochs[0] != epochs[1]


def test_padded_tokens_loader_reads_every_id(tmp_path):
    """Every chunk's ids in blocks of 16, its last block filled up with pad (40-id items in 256-byte chunks)."""
    from litdata import StreamingDataset

    from jpeglm.shards import read_chunk

    directory = write_blocks(tmp_path / "d")
    dataset = StreamingDataset(str(directory), item_loader=_compat.padded_tokens_loader(16, 0, "uint16"))
    got = np.concatenate([dataset[i] for i in range(len(dataset))])
    expected = []
    for chunk in json.loads((directory / "index.json").read_text())["chunks"]:
        ids = np.concatenate(list(read_chunk(directory / chunk["filename"], "uint16")))
        expected += [ids, np.zeros(-len(ids) % 16, dtype=np.uint16)]
    assert np.array_equal(got, np.concatenate(expected))
