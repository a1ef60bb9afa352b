"""Every private name of a dependency (litdata, Lightning, torch) that jpeglm relies on, in one place.

Nothing else in jpeglm, ``data_modules/`` or ``callbacks/`` touches a dependency's private names (a name that
starts with ``_``, or an undocumented attribute of a private type); they call the small named functions here.
``tests/test_house.py`` enforces that, and ``tests/test_compat.py`` checks that each name below still exists
on the installed libraries, so an upgrade that removes or moves one fails a test that names it.

Each use records (in :data:`CHECKED` and in the comment above its function):

* the versions it was checked against: run-tested on lightning 2.6.6, litdata 0.2.76, torch 2.14.1 (with
  litgpt 0.5.11, whose public API is all jpeglm uses); the lower bounds were checked in the libraries' source
  at that release tag (litdata v0.2.50, lightning 2.5.0);
* what it does for jpeglm;
* the public API that would replace it, or that none exists yet (with the upstream issue where known).

:func:`check_versions` compares the installed versions with :data:`CHECKED`. When upgrading past a range:
read each function below against the new release, run ``pytest tests/test_compat.py tests/data_modules``,
then widen :data:`CHECKED` and the bounds in ``pyproject.toml`` together.

Dependencies are imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "CHECKED",
    "WRAPPED_PARAMETER_PARTS",
    "Checked",
    "ResumeAtWorkerCounts",
    "boto3_chunk_downloads",
    "check_versions",
    "checkpoint_wrapper",
    "combined_members",
    "combined_weights",
    "distributed_position",
    "epoch_plan",
    "first_loop_iter",
    "fsdp2_kept_unsharded",
    "hpc_resume_path",
    "installed_version",
    "load_distributed_checkpoint",
    "loader_workers",
    "local_dir",
    "padded_tokens_loader",
    "replay_counts",
    "samples_yielded",
    "set_first_loop_iter",
    "world_size",
]


class Checked(NamedTuple):
    """The versions of ``package`` a private use was checked on: ``lowest <= installed < below``."""

    package: str
    lowest: str
    below: str
    used_in: str
    replacement: str


_LITDATA = ("litdata", "0.2.50", "0.3")
_LIGHTNING = ("lightning", "2.5", "2.7")
_TORCH = ("torch", "2.4", "3")  # torch is never pinned in pyproject.toml; this only says what was checked

#: Each private name jpeglm relies on -> the version range it was checked on, where it is used, and what would
#: replace it. ``tests/test_compat.py`` checks that every one exists on the installed libraries.
CHECKED: dict[str, Checked] = {
    "litdata.streaming.dataset._replay_sampling": Checked(
        *_LITDATA,
        "data_modules/codec.py TokenBlocks (via ResumeAtWorkerCounts, replay_counts)",
        "none: a per-worker resume position for CombinedStreamingDataset members (litdata #694)",
    ),
    "litdata.StreamingDataset._resume": Checked(
        *_LITDATA,
        "data_modules/codec.py TokenBlocks (overridden by ResumeAtWorkerCounts)",
        "none: a per-worker resume position for CombinedStreamingDataset members (litdata #694)",
    ),
    "litdata.StreamingDataset.worker_env.world_size": Checked(
        *_LITDATA,
        "data_modules/codec.py TokenBlocks (via loader_workers)",
        "torch.utils.data.get_worker_info().num_workers inside a worker (1 outside one)",
    ),
    "litdata.StreamingDataset.distributed_env.world_size": Checked(
        *_LITDATA, "data_modules/mixed.py MixedDataModule._train_length (via world_size)", "trainer.world_size"
    ),
    "litdata.StreamingDataset.input_dir.path": Checked(
        *_LITDATA,
        "data_modules/mixed.py MixedDataModule._train_length (via local_dir)",
        "the directory the dataset was built from, kept by the caller",
    ),
    "litdata.streaming.downloader._OBSTORE_INIT_PID": Checked(
        *_LITDATA,
        "jpeglm/storage.py litdata_storage_options (via boto3_chunk_downloads)",
        "none: no switch between litdata's obstore and boto3 chunk downloads, and no way to pass allow_http to obstore",
    ),
    "litdata.CombinedStreamingDataset._datasets": Checked(
        *_LITDATA,
        "data_modules/mixed.py MixedBlocks.__iter__, MixedDataModule._train_length (via combined_members)",
        "none: keep the list passed to the constructor",
    ),
    "litdata.CombinedStreamingDataset._weights": Checked(
        *_LITDATA,
        "data_modules/mixed.py MixedDataModule._train_length (via combined_weights)",
        "none: normalise the weights passed to the constructor as litdata does",
    ),
    "litdata.CombinedStreamingDataset._num_samples_yielded": Checked(
        *_LITDATA,
        "data_modules/mixed.py MixedBlocks.__iter__ (via samples_yielded)",
        "none: the loaded state's per-worker counts are not exposed (litdata #694, #775)",
    ),
    "litdata.StreamingDataset.distributed_env.global_rank": Checked(
        *_LITDATA,
        "data_modules/codec.py ResumableLoader elastic resume (via distributed_position)",
        "trainer.global_rank, trainer.world_size, trainer.num_nodes",
    ),
    "litdata.utilities.env._DistributedEnv": Checked(
        *_LITDATA,
        "data_modules/elastic.py (via epoch_plan): the shuffler's assignment for a saved world size",
        "none: litdata's Shuffle classes take this private type (litdata's own elastic resume builds one too)",
    ),
    "litdata.streaming.item_loader.TokensLoader._chunks": Checked(
        *_LITDATA,
        "data_modules/codec.py validation blocks (via padded_tokens_loader)",
        "none: TokensLoader cuts every chunk into whole blocks and has no option to pad the rest",
    ),
    "litdata.streaming.item_loader.BaseItemLoader._wait_until_chunk_ready": Checked(
        *_LITDATA,
        "data_modules/codec.py validation blocks (via padded_tokens_loader)",
        "none: what TokensLoader.load_item_from_chunk runs before reading a chunk",
    ),
    "lightning.pytorch.Trainer._logger_connector._first_loop_iter": Checked(
        *_LIGHTNING,
        "callbacks/training.py InitialValidation (via first_loop_iter, set_first_loop_iter)",
        "none: no public way to validate at step 0 inside fit (Lightning #20985)",
    ),
    "lightning.pytorch.Trainer._checkpoint_connector._hpc_resume_path": Checked(
        *_LIGHTNING,
        "jpeglm/trainer.py Trainer.fit (via hpc_resume_path): the checkpoint every rank must agree on",
        "none: Lightning picks the SLURM checkpoint inside fit, after each rank resolved it on its own",
    ),
    "lightning.fabric.utilities.load._load_distributed_checkpoint": Checked(
        *_LIGHTNING,
        "jpeglm/checkpoints.py load_checkpoint (via load_distributed_checkpoint)",
        "torch.distributed.checkpoint.format_utils.dcp_to_torch_save (writes a file) + meta.pt",
    ),
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper": Checked(
        *_TORCH,
        "jpeglm/model.py checkpoint_blocks (via checkpoint_wrapper)",
        "none as a module wrapper; torch.utils.checkpoint.checkpoint in a hand-written one",
    ),
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper._CHECKPOINT_WRAPPED_MODULE": Checked(
        *_TORCH,
        "WRAPPED_PARAMETER_PARTS (parameter names jpeglm/checkpoints.py (unwrapped_name) strips)",
        "none: the name of the wrapped module in parameter names",
    ),
    "torch._dynamo.eval_frame.OptimizedModule._orig_mod": Checked(
        *_TORCH,
        "WRAPPED_PARAMETER_PARTS (parameter names jpeglm/checkpoints.py (unwrapped_name) strips)",
        "nn.Module.compile() (in place, adds nothing to names); torch.compile(module) wraps",
    ),
    "torch.distributed.fsdp.FSDPModule._get_fsdp_state": Checked(
        *_TORCH,
        "jpeglm/generation/sampling.py gathered (via fsdp2_kept_unsharded)",
        "none: FSDPModule.set_reshard_after_forward sets the setting but nothing reads it back",
    ),
    "torch.distributed.fsdp._fully_shard._fsdp_state.FSDPState._lazy_init": Checked(
        *_TORCH,
        "jpeglm/generation/sampling.py gathered (via fsdp2_kept_unsharded)",
        "none: the root's first forward runs it",
    ),
    "torch.distributed.fsdp._fully_shard._fsdp_state.FSDPState._fsdp_param_groups": Checked(
        *_TORCH,
        "jpeglm/generation/sampling.py gathered (via fsdp2_kept_unsharded)",
        "none: FSDPModule.set_reshard_after_forward sets the setting but nothing reads it back",
    ),
    "torch.distributed.fsdp._fully_shard._fsdp_param_group.FSDPParamGroup.post_forward_mesh_info": Checked(
        *_TORCH,
        "jpeglm/generation/sampling.py gathered (via fsdp2_kept_unsharded)",
        "none: FSDPModule.set_reshard_after_forward sets the setting but nothing reads it back",
    ),
}


# ----------------------------------------------------------------------------------------------- versions


def installed_version(package: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """``"2.14.1+cu128"`` -> ``(2, 14, 1)``; a pre-release of X counts as X (outside ``< X``)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def _within(version: str, lowest: str, below: str) -> bool:
    def padded(v: tuple[int, ...]) -> tuple[int, ...]:
        return v + (0,) * (4 - len(v))

    return padded(_release(lowest)) <= padded(_release(version)) < padded(_release(below))


def check_versions() -> list[str]:
    """Problems with the installed dependencies: one message per package outside the range :data:`CHECKED` says.

    An empty list means every private name jpeglm relies on was checked on the installed versions.
    """
    problems = []
    for package in sorted({checked.package for checked in CHECKED.values()}):
        uses = [name for name, checked in CHECKED.items() if checked.package == package]
        lowest = max((CHECKED[name].lowest for name in uses), key=_release)
        below = min((CHECKED[name].below for name in uses), key=_release)
        version = installed_version(package)
        if version is not None and _within(version, lowest, below):
            continue
        found = "is not installed" if version is None else f"{version} is installed"
        problems.append(
            f"{package} {found}, but jpeglm's uses of its private names ({', '.join(uses)}) were checked on "
            f"{package}>={lowest},<{below} only. Install a checked version (pip install '{package}>={lowest},"
            f"<{below}'), or read each of these names in jpeglm/_compat.py against {package} {version}, run "
            f"pytest tests/test_compat.py tests/data_modules, then widen CHECKED and pyproject.toml."
        )
    return problems


# ----------------------------------------------------------------------------------------------- litdata
# Checked on litdata 0.2.76 (run) and v0.2.50 (source).


def combined_members(dataset: Any) -> list[Any]:
    """The member datasets of a ``CombinedStreamingDataset``, in order.

    ``CombinedStreamingDataset._datasets``: the list given to the constructor. No public accessor (keep the
    list yourself, which MixedDataModule could do).
    """
    return dataset._datasets


def combined_weights(dataset: Any) -> list[float]:
    """The normalised member weights of a ``CombinedStreamingDataset`` (what its iterator draws with).

    ``CombinedStreamingDataset._weights``: the constructor's weights divided by their sum (or the members'
    lengths, when none are given). No public accessor.
    """
    return dataset._weights


def samples_yielded(dataset: Any) -> dict[int, list[int]] | None:
    """``{worker: [samples drawn from each member]}`` of a state loaded into a ``CombinedStreamingDataset``, else None.

    ``CombinedStreamingDataset._num_samples_yielded``: set by ``load_state_dict`` (the loader passes each
    worker's counts); litdata uses only their sum per member. No public accessor (litdata #694, #775).
    """
    return dataset._num_samples_yielded


def world_size(dataset: Any) -> int:
    """Processes (ranks) a ``StreamingDataset`` splits its data over, as litdata detected them.

    ``StreamingDataset.distributed_env`` is an undocumented attribute of the private type ``_DistributedEnv``.
    Public near-equivalent: ``trainer.world_size`` (from the same environment, once the trainer is set up).
    """
    return dataset.distributed_env.world_size


def loader_workers(dataset: Any) -> int:
    """DataLoader workers of this process, as the ``StreamingDataset`` saw them when its iteration began.

    ``StreamingDataset.worker_env`` (private type ``_WorkerEnv``), set in ``__iter__``. Public near-equivalent:
    ``torch.utils.data.get_worker_info().num_workers`` inside a worker (1 outside one).
    """
    return dataset.worker_env.world_size


def local_dir(dataset: Any) -> Path:
    """The local directory a ``StreamingDataset`` reads (``index.json`` and chunks).

    ``StreamingDataset.input_dir`` is a ``litdata.streaming.resolver.Dir``; its ``path`` is the resolved local
    directory. Public replacement: keep the directory passed to the constructor.
    """
    return Path(dataset.input_dir.path)


def boto3_chunk_downloads() -> None:
    """From now on litdata downloads S3 chunks with its boto3 client, in this process and the workers it forks.

    litdata 0.2.76 GETs ``index.json`` with a boto3 client made from ``storage_options`` but whole chunks through
    obstore when it is installed (``litdata.streaming.downloader.obstore_usable()``), with the endpoint copied from
    that client and no ``allow_http``: obstore then refuses a plain ``http://`` endpoint (MinIO, rclone, a local
    gateway). ``obstore_usable()`` is true only while ``downloader._OBSTORE_INIT_PID`` (the process that started
    obstore's runtime, which a forked worker must not reuse) is None or this process; setting it to -1 makes it
    false everywhere, so litdata takes its own boto3 fallback for chunks (sync and async prefetch alike). Without
    the name (a litdata without obstore) there is nothing to switch. No public replacement.
    """
    from litdata.streaming import downloader

    if hasattr(downloader, "_OBSTORE_INIT_PID"):
        downloader._OBSTORE_INIT_PID = -1


@contextmanager
def replay_counts(counts: dict[int, int]) -> Iterator[None]:
    """Within the block, litdata's resume puts worker ``w`` at ``counts[w]`` samples instead of its own split.

    ``litdata.streaming.dataset._replay_sampling(num_samples_yielded, batch_size, num_workers)`` is the module
    function ``StreamingDataset._resume`` calls to split one dataset's count over the workers, as if each took
    whole batches in turn. It is replaced (module global, restored on exit) by one returning ``counts``.
    No public replacement (litdata #694).
    """
    from litdata.streaming import dataset as litdata_dataset

    replay = litdata_dataset._replay_sampling
    litdata_dataset._replay_sampling = lambda *_: counts
    try:
        yield
    finally:
        litdata_dataset._replay_sampling = replay


class ResumeAtWorkerCounts:
    """Mixin for a litdata ``StreamingDataset``: each worker resumes at the count in ``samples_per_worker``.

    Put it before ``StreamingDataset`` in the bases. It overrides the private method
    ``StreamingDataset._resume(workers_chunks, workers_intervals)``, which litdata's ``__iter__`` calls when a
    state was loaded (same topology). litdata stores one count per dataset and splits it over the workers as if
    every worker took whole batches in turn; a worker of a ``CombinedStreamingDataset`` draws a varying share
    of each member, so that split is wrong (blocks are skipped or repeated after a resume). With
    ``samples_per_worker`` set (``{worker: samples}``, by the mixture), it replaces the split for the length of
    litdata's own ``_resume`` (:func:`replay_counts`); None keeps litdata's behaviour. No public replacement
    (litdata #694).
    """

    samples_per_worker: dict[int, int] | None = None

    def _resume(self, workers_chunks: list[list[int]], workers_intervals: list[Any]) -> None:
        if self.samples_per_worker is None:
            return super()._resume(workers_chunks, workers_intervals)
        counts = {w: self.samples_per_worker.get(w, 0) for w in range(loader_workers(self))}
        with replay_counts(counts):
            return super()._resume(workers_chunks, workers_intervals)


def distributed_position(dataset: Any) -> tuple[int, int, int]:
    """``(global rank, world size, nodes)`` of this process, as a ``StreamingDataset`` detected them.

    ``StreamingDataset.distributed_env`` (private type ``_DistributedEnv``): torch.distributed when initialised,
    else the ``WORLD_SIZE``, ``GLOBAL_RANK`` and ``NNODES`` environment variables (what the tests set). Public
    near-equivalent: ``trainer.global_rank``, ``trainer.world_size``, ``trainer.num_nodes``.
    """
    env = dataset.distributed_env
    return env.global_rank, env.world_size, env.num_nodes


def epoch_plan(
    dataset: Any, world_size: int, num_nodes: int, num_workers: int, batch_size: int, epoch: int
) -> list[list[int]]:
    """The global item (block) indices each worker of each rank yields in ``epoch``, in order, for that topology.

    Index ``rank * num_workers + worker``. This replays what ``StreamingDataset.__iter__`` and ``__next__`` do
    without a loaded state: the shuffler's ``get_chunks_and_intervals_per_workers(env, num_workers, batch_size,
    epoch)`` gives each worker its chunks and item ranges, and the shuffler itself (``shuffler(items,
    num_chunks, epoch, chunk_index)``) orders the items of each. ``env`` is a ``litdata.utilities.env.
    _DistributedEnv(world_size, 0, num_nodes)`` (a private type; the assignment of all ranks does not depend on
    the rank). The dataset's ``shuffler`` (made by ``get_len``, a public method, with the dataset's own
    settings) is an undocumented attribute. No public replacement: litdata 0.2.76's own elastic resume
    (``_canonical_plans``) does the same, privately.
    """
    import numpy as np
    from litdata.utilities.env import _DistributedEnv

    if dataset.shuffler is None:
        dataset.get_len(dataset.num_workers, dataset.batch_size)  # makes the shuffler; same settings, no change
    shuffler = dataset.shuffler
    env = _DistributedEnv(world_size, 0, num_nodes)
    chunks, intervals = shuffler.get_chunks_and_intervals_per_workers(env, num_workers, batch_size, epoch)
    num_chunks = len(shuffler.cache.get_chunk_intervals())
    plans = []
    for worker_chunks, worker_intervals in zip(chunks, intervals, strict=True):
        items: list[int] = []
        for chunk_index, interval in zip(worker_chunks, worker_intervals, strict=True):
            ranged = np.arange(interval[1], interval[2])
            items.extend(int(i) for i in shuffler(ranged, num_chunks, epoch, int(chunk_index)))
        plans.append(items)
    return plans


def padded_tokens_loader(block_size: int, pad_id: int, dtype: str) -> Any:
    """A ``litdata.TokensLoader`` that also yields each chunk's last, partial block, filled up with ``pad_id``.

    ``TokensLoader`` cuts every chunk into ``dim // block_size`` whole blocks and never reads the rest of a chunk
    (up to ``block_size - 1`` ids per chunk); validation must see every id. This subclass counts
    ``ceil(dim / block_size)`` blocks per chunk (``generate_intervals``) and reads the last one of a chunk from the
    chunk file itself (ids of ``dtype``, the prepared dataset's): the private ``TokensLoader._chunks`` (the
    chunks' ``dim`` and ``chunk_size`` from index.json) and ``BaseItemLoader._wait_until_chunk_ready`` (what
    ``TokensLoader.load_item_from_chunk`` runs first; for remote data, until the chunk is downloaded). The chunk
    layout (uint32 count, count + 1 uint32 offsets, ids) is litdata's, documented in docs/architecture.md. Whole
    blocks are read by ``TokensLoader`` itself. The class is named ``TokensLoader``: litdata compares a loader's class
    name with the one index.json records. No public replacement.
    """
    import numpy as np
    from litdata import TokensLoader
    from litdata.streaming.item_loader import Interval

    class PaddedTokensLoader(TokensLoader):
        """``TokensLoader`` padding each chunk's last block; named ``TokensLoader`` (below) as index.json says."""

        def generate_intervals(self) -> list[Any]:
            intervals, begin = [], 0
            for chunk in self._chunks:
                end = begin + -(-chunk["dim"] // block_size)
                intervals.append(Interval(begin, begin, end, end))
                begin = end
            return intervals

        def load_item_from_chunk(
            self, index: int, chunk_index: int, chunk_filepath: str, begin: int, filesize_bytes: int
        ) -> Any:
            chunk = self._chunks[chunk_index]
            start = (index - begin) * block_size
            if start + block_size <= chunk["dim"]:
                return super().load_item_from_chunk(index, chunk_index, chunk_filepath, begin, filesize_bytes)
            self._wait_until_chunk_ready(chunk_index, chunk_filepath, filesize_bytes)
            header = (1 + chunk["chunk_size"] + 1) * 4
            ids_dtype = np.dtype(dtype)
            ids = np.fromfile(
                chunk_filepath, dtype=ids_dtype, count=chunk["dim"] - start, offset=header + start * ids_dtype.itemsize
            )
            return np.concatenate([ids, np.full(block_size - len(ids), pad_id, dtype=ids_dtype)])

    PaddedTokensLoader.__name__ = "TokensLoader"  # litdata checks the loader's class name against index.json's
    return PaddedTokensLoader(block_size=block_size)


# ----------------------------------------------------------------------------------------------- Lightning
# Checked on lightning 2.6.6 (run) and 2.5.0 (source).


def first_loop_iter(trainer: Any) -> bool | None:
    """The logger connector's "first loop iteration" flag, which a validation run inside fit resets.

    ``trainer._logger_connector._first_loop_iter``: Lightning's own in-loop validation
    (``_TrainingEpochLoop.on_advance_end``) saves it before ``val_loop.run()`` and restores it after, so the
    training step's logging is not treated as a fresh epoch; jpeglm's step-0 validation does the same.
    No public API to validate at step 0 within fit (Lightning #20985).
    """
    return trainer._logger_connector._first_loop_iter


def set_first_loop_iter(trainer: Any, value: bool | None) -> None:
    """Restore the flag :func:`first_loop_iter` read (see there)."""
    trainer._logger_connector._first_loop_iter = value


def hpc_resume_path(trainer: Any) -> str | None:
    """The ``hpc_ckpt_N.ckpt`` a SLURM requeue resumes from (the highest N in ``default_root_dir``), or None.

    ``trainer._checkpoint_connector._hpc_resume_path``: what ``Trainer.fit(ckpt_path=None)`` under SLURM and
    ``ckpt_path="hpc"`` load (``_CheckpointConnector._parse_ckpt_path``). No public way to ask which checkpoint
    a call will load before it loads it.
    """
    return trainer._checkpoint_connector._hpc_resume_path


def load_distributed_checkpoint(path: str | Path) -> dict[str, Any]:
    """A ``torch.distributed.checkpoint`` directory (FSDP2 shards + Lightning's ``meta.pt``) as one dictionary.

    ``lightning.fabric.utilities.load._load_distributed_checkpoint``: what Lightning's ``consolidate_checkpoint``
    module runs; it loads every shard on the CPU without a process group and merges ``meta.pt``. Public
    replacement: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` (to a file, then
    ``torch.load``) plus merging ``meta.pt`` by hand.
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(Path(path))


# ----------------------------------------------------------------------------------------------- torch
# Checked on torch 2.14.1 (run); the module has been in torch since 1.12.


def checkpoint_wrapper(module: Any, *args: Any, **kwargs: Any) -> Any:
    """``module`` recomputed in the backward pass instead of storing its activations (non-reentrant).

    ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper``: the wrapper FSDP and
    Lightning use for activation checkpointing; its parameters gain a ``_checkpoint_wrapped_module.`` part
    (see :data:`WRAPPED_PARAMETER_PARTS`). No public module wrapper yet: the replacement is a hand-written
    ``nn.Module`` calling ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrap

    return wrap(module, *args, **kwargs)


@contextmanager
def fsdp2_kept_unsharded(modules: list[Any]) -> Iterator[None]:
    """While inside, the FSDP2 modules ``modules`` (the outermost first) keep their parameters gathered after
    each forward; at exit each gets back its own ``reshard_after_forward`` setting.

    FSDP2 decides after each forward whether to free a module's gathered parameters from its parameter groups'
    ``post_forward_mesh_info`` (``FSDPParamGroup._reshard_after_forward`` is ``post_forward_mesh_info is not
    None``; the root's is set to None by ``FSDPState._lazy_init`` when ``reshard_after_forward`` was left to
    FSDP). This saves each group's value (read through ``FSDPModule._get_fsdp_state()._fsdp_param_groups``),
    sets it to None and puts it back. ``FSDPState._lazy_init`` runs first, on the outermost module, as its first
    forward would (a no-op once any forward ran), so the root's own value is the one saved.
    ``FSDPModule.set_reshard_after_forward(False)`` would do the setting, but nothing public reads the previous
    setting back, so it could not be restored (and it also turns off the root's automatic setting).
    """
    states = [module._get_fsdp_state() for module in modules]
    if states:
        states[0]._lazy_init()
    groups = [group for state in states for group in state._fsdp_param_groups]
    saved = [group.post_forward_mesh_info for group in groups]
    for group in groups:
        group.post_forward_mesh_info = None
    try:
        yield
    finally:
        for group, info in zip(groups, saved, strict=True):
            group.post_forward_mesh_info = info


#: Parts that training wrappers add to parameter names: torch's checkpoint wrapper (``_CHECKPOINT_WRAPPED_MODULE``)
#: and ``torch.compile(module)``'s ``OptimizedModule._orig_mod``; jpeglm/checkpoints.py (unwrapped_name) strips them.
WRAPPED_PARAMETER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod")
