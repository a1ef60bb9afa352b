"""Training checkpoints that are never half written, and ``--ckpt_path last`` that never picks one.

A process killed while it writes a checkpoint (``kill -9``, a SLURM time limit, a node lost) must not leave a
checkpoint that the next ``--ckpt_path last`` resumes from. Lightning writes a single file through fsspec (a
temporary file, then ``shutil.move``: a copy when the temporary directory is on another file system, as on
most clusters), and ``ModelParallelStrategy`` writes an FSDP2 checkpoint straight into its directory, so
replacing ``last.ckpt`` overwrites the previous shards in place. :class:`Trainer` writes every checkpoint
(``ModelCheckpoint``'s, ``SlurmRequeue``'s, Lightning's own) to ``DIR/.writing/NAME`` instead, on every rank;
after the write's closing barrier, rank 0 flushes it to disk and renames it to ``DIR/NAME`` (:func:`commit`); the
shards of a sharded checkpoint were flushed by the ranks that wrote them (on a shared file system only the
writing client can), as ``torch.distributed.checkpoint`` does.
A checkpoint under its own name is therefore always whole, and a ``.writing`` one never is.

A directory cannot replace another in one rename: the old one is first renamed to ``DIR/.replaced/NAME``,
the new one into place, and the old one deleted. A process killed between the two renames leaves no
``DIR/NAME`` but a whole ``DIR/.replaced/NAME``, which :func:`newest_complete` resumes from.

The temporary names live in subdirectories because Lightning's SLURM resume takes the highest number in any
name of the run directory that contains ``hpc_ckpt_`` (``hpc_ckpt_3.ckpt.tmp`` would count as a checkpoint 3).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_warn

from jpeglm._compat import hpc_resume_path
from jpeglm.errors import UserError

WRITING = ".writing"
"""Subdirectory of a checkpoint's directory that holds checkpoints while they are written."""
REPLACED = ".replaced"
"""Subdirectory that holds a directory checkpoint between its replacement's two renames."""
LAST = re.compile(r"last.*\.ckpt")
"""Names ``ModelCheckpoint(save_last=True)`` writes (``last.ckpt``, ``last-v1.ckpt``), matched as Lightning's
``ckpt_path="last"`` matches them: a ``.ckpt`` name that starts with ``last``."""


class Trainer(L.Trainer):
    """Lightning's Trainer whose checkpoints appear under their name only once they are whole (module docstring),
    and which refuses to resume ranks from different checkpoints (:class:`SameCheckpointOnEveryRank`)."""

    resume_from: str | None = None
    """The checkpoint the running ``fit``/``validate``/``test`` loads, as this rank resolved it (None: none)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = kwargs.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        kwargs["callbacks"] = [*callbacks, SameCheckpointOnEveryRank()]
        super().__init__(*args, **kwargs)

    # Lightning's signatures and docs (functools.wraps): LightningCLI reads a subcommand's options from them.
    @functools.wraps(L.Trainer.fit)
    def fit(self, *args: Any, **kwargs: Any) -> None:
        return self._resolved(L.Trainer.fit, args, kwargs)

    @functools.wraps(L.Trainer.validate)
    def validate(self, *args: Any, **kwargs: Any) -> Any:
        return self._resolved(L.Trainer.validate, args, kwargs)

    @functools.wraps(L.Trainer.test)
    def test(self, *args: Any, **kwargs: Any) -> Any:
        return self._resolved(L.Trainer.test, args, kwargs)

    def _resolved(self, method: Any, args: tuple, kwargs: dict) -> Any:
        """Call Lightning's ``method`` with its ``ckpt_path`` resolved here where that depends on what this rank
        sees of the file system: SLURM's ``hpc_ckpt_N`` (given no path under SLURM, or ``"hpc"``), passed on as
        that path, so the one compared (:attr:`resume_from`) is the one loaded. ``"last"`` is resolved by the CLI
        beforehand (:func:`resolve_last`); other values are passed on as given."""
        call = inspect.signature(method).bind(self, *args, **kwargs)
        path = call.arguments.get("ckpt_path")
        if path == "hpc" or (path is None and SLURMEnvironment.detect()):
            path = call.arguments["ckpt_path"] = hpc_resume_path(self) or path
        self.resume_from = None if path is None else os.fspath(path)
        return method(*call.args, **call.kwargs)

    def save_checkpoint(
        self, filepath: str | os.PathLike, weights_only: bool | None = None, storage_options: Any = None
    ) -> None:
        """Write the checkpoint to ``.writing/`` next to ``filepath`` on every rank, then rename it to ``filepath``.

        Like Lightning's, it must be called on every rank. A URL (``s3://...``) is written as Lightning does: an
        object store shows an object only once its upload is whole.
        """
        if "://" in str(filepath):
            return super().save_checkpoint(filepath, weights_only, storage_options)
        final = Path(self.strategy.broadcast(os.fspath(filepath)))  # one name on every rank, as rank 0 chose it
        partial = final.parent / WRITING / final.name
        if self.is_global_zero:
            remove(partial)  # left by a process killed while writing it
            partial.parent.mkdir(parents=True, exist_ok=True)
        self.strategy.barrier("jpeglm: checkpoint write begins")
        # Ends with a barrier: every rank wrote. A sharded checkpoint's shards are flushed by the rank that wrote
        # each (torch.distributed.checkpoint's FileSystemWriter fsyncs them: on a shared file system only the
        # writing client can).
        super().save_checkpoint(partial, weights_only, storage_options)
        if self.is_global_zero:
            commit(partial, final)
        self.strategy.barrier("jpeglm: checkpoint committed")


class SameCheckpointOnEveryRank(Callback):
    """Stop a run whose ranks are about to load different checkpoints.

    ``--ckpt_path last`` and SLURM's ``hpc_ckpt_N`` are resolved on every rank before the process group exists
    (by Lightning too), from what each node's view of a shared file system shows; a stale view (NFS attribute
    caching) could resume ranks from different steps, or leave one rank out of a sharded load that every rank
    must join (a hang). In ``setup``, once the group exists and before anything is loaded, rank 0's path
    (:attr:`Trainer.resume_from`) is sent to every rank and any difference is an error on all of them: one
    broadcast and one all-reduce per call.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_same_checkpoint(trainer.strategy, getattr(trainer, "resume_from", None))


def check_same_checkpoint(strategy: Any, path: str | os.PathLike | None) -> None:
    """Raise on every rank when ``path`` (this rank's checkpoint to load) is not rank 0's."""
    mine = None if path is None else os.fspath(path)
    first = strategy.broadcast(mine)
    if strategy.reduce_boolean_decision(mine != first, all=False):
        raise UserError(
            f"the ranks would resume from different checkpoints (rank 0: {first}; rank {strategy.global_rank}: "
            f"{mine}): their views of the checkpoint directory differ; give --ckpt_path PATH explicitly"
        )


def commit(partial: Path, final: Path) -> None:
    """Flush the whole checkpoint ``partial`` (a file or directory) to disk and rename it to ``final``.

    A file replaces ``final`` in one rename. A directory, or a file replacing a directory, moves ``final`` to
    ``.replaced/`` first and deletes it once the new checkpoint is in place.
    """
    _fsync_tree(partial)
    aside = final.parent / REPLACED / final.name
    if final.is_dir() and not final.is_symlink() or (final.exists() and partial.is_dir()):
        remove(aside)
        aside.parent.mkdir(exist_ok=True)
        os.replace(final, aside)
    os.replace(partial, final)
    _fsync(final.parent)
    remove(aside)  # also one left by a process killed between the two renames: `final` is newer
    for scratch in (partial.parent, aside.parent):
        with contextlib.suppress(OSError):
            scratch.rmdir()  # only when empty


def remove(path: Path) -> None:
    """Delete a file, link or directory tree at ``path``, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a directory and the directory: the data is on disk before the rename."""
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            _fsync(file)
    if path.is_dir():
        _fsync(path)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a directory on a file system that cannot sync one
        pass
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a whole checkpoint: a file that is a whole zip archive (torch.save's format: a cut
    file has no central directory at its end), or a sharded directory with its metadata and ``meta.pt``."""
    if path.is_dir():
        return (path / ".metadata").is_file() and _whole_zip(path / "meta.pt") and any(path.glob("*.distcp"))
    return _whole_zip(path)


def _whole_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_complete(directories: Iterable[Path], others: Iterable[Path] = ()) -> tuple[Path | None, list[str]]:
    """The newest whole checkpoint that ``ckpt_path="last"`` means, and a warning for each checkpoint passed over.

    The candidates are Lightning's: the ``last*.ckpt`` in ``directories`` (each ``ModelCheckpoint``'s) and
    ``others`` (``OnExceptionCheckpoint`` files), newest first by modification time, plus a ``.replaced/`` one
    whose replacement was never renamed into place. A candidate that is not whole (:func:`is_complete`) is
    skipped, and every checkpoint left in ``.writing/`` is named: it was being written when its process stopped.
    """
    candidates, warnings = set(), []
    for directory in map(Path, directories):
        names = {p.name for p in _entries(directory) if LAST.fullmatch(p.name)}
        candidates |= {directory / name for name in names}
        candidates |= {p for p in _entries(directory / REPLACED) if LAST.fullmatch(p.name) and p.name not in names}
        warnings += [f"skipping {p}: the run stopped while writing it" for p in sorted(_entries(directory / WRITING))]
    candidates |= {Path(p) for p in others if Path(p).exists()}
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if is_complete(path):
            return path, warnings
        warnings.append(f"skipping {path}: it is not a whole checkpoint (cut short, or not a checkpoint)")
    return None, warnings


def _entries(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []


def resolve_last(trainer: L.Trainer, command: str = "fit") -> Path | None | str:
    """What ``ckpt_path="last"`` means for ``trainer``: the newest whole checkpoint (:func:`newest_complete`),
    None when there is none (training starts from the beginning, with a warning, as in Lightning), or ``"last"``
    unchanged when a ``ModelCheckpoint`` has no ``dirpath`` yet (Lightning then resolves it, after setup)."""
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    if any(c.dirpath is None for c in callbacks):
        return "last"
    others = [c.ckpt_path for c in trainer.callbacks if isinstance(c, OnExceptionCheckpoint)]
    path, warnings = newest_complete([Path(c.dirpath) for c in callbacks], others)
    for warning in warnings:
        rank_zero_warn(f"{command} --ckpt_path last: {warning}")
    if path is None:
        dirs = ", ".join(str(c.dirpath) for c in callbacks) or "no ModelCheckpoint directory"
        rank_zero_warn(f"{command} --ckpt_path last: no whole checkpoint in {dirs}; none is loaded")
    elif warnings:
        rank_zero_warn(f"{command} --ckpt_path last: resuming from {path}")
    return path
