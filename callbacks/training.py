"""Training-time callbacks that are not about samples: throughput, plain-text progress, step-0 validation, SLURM
requeue.

Step numbers. Lightning's loggers (TensorBoard, CSV) record what ``self.log`` logs during training at the
*logger step*: the number of optimizer steps done *before* the batch, so the k-th optimizer step's metrics are at
step k - 1, while ``trainer.global_step`` is already k when that batch ends. A validation that runs after the k-th
step is recorded at k - 1 too (Lightning counts the step only after its in-loop validation); the validation
:class:`InitialValidation` runs before any step is at 0. Everything these callbacks print or log uses the logger
step, so a number on the console is the x of the same point in TensorBoard.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from jpeglm._compat import first_loop_iter, set_first_loop_iter


def _batch_size(batch: dict[str, Any]) -> int:
    return batch["input_ids"].size(0)


def _tokens(batch: dict[str, Any]) -> int:
    return batch["input_ids"].size(0) * (batch["input_ids"].size(1) - 1)  # predicted tokens


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for jpeglm batches: tokens/s, samples/s and MFU.

    Logs ``train/device/items_per_sec`` (predicted tokens per second per device), ``train/device/samples_per_sec``,
    ``train/device/batches_per_sec``, ``train/device/flops_per_sec`` and ``train/device/mfu``, plus the totals
    without ``device/`` when there is more than one device, once ``window_size`` batches have been seen (and
    ``train/time``, ``train/batches``, ``train/samples``, ``train/lengths`` from the start). ``train/device/mfu``
    only on devices whose peak FLOP/s Lightning knows (NVIDIA GPUs it lists, TPUs): not on CPU, nor on an unlisted
    GPU (Lightning warns "FLOPs not found"). The ``train/`` scalars are at the logger step of the batch that ends
    the window (see the module docstring: k - 1 after k optimizer steps). The ``validate/`` ones Lightning logs
    during validation are at the count of validation batches run so far, *not* a training step.

    Args:
        window_size: batches averaged over.
    """

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=_tokens, window_size=window_size)


class InitialValidation(Callback):
    """Validate once before the first training step, so the curves start at the untrained model.

    Lightning first validates after ``val_check_interval`` steps; this adds the step-0 point (litgpt's
    pretraining script does the same with ``initial_validation``), the baseline every "did it learn?"
    plot needs. It runs the fit loop's own validation loop, so metrics, loggers and callbacks see an
    ordinary validation at ``global_step`` 0, recorded by the loggers at step 0 (and printed by
    :class:`LogLines` as "validation at step 0"); the validation after the k-th optimizer step is at k - 1
    (see the module docstring). Skipped when resuming (``global_step > 0``) and when validation is off
    (``limit_val_batches=0``).
    """

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # At the first batch rather than in on_train_start: every callback's on_train_start has run by then.
        if trainer.global_step > 0 or batch_idx > 0 or trainer.limit_val_batches == 0:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        first_iter = first_loop_iter(trainer)  # saved and restored as Lightning's own in-loop validation does
        trainer.validating = True
        epoch_loop.val_loop.run()
        trainer.training = True
        set_first_loop_iter(trainer, first_iter)


class LogLines(Callback):
    """One plain line of progress every ``every_n_steps`` steps (rank 0), for logs that are not terminals.

    Rich's and tqdm's bars redraw one line in place; under SLURM or CI that shows as nothing (Rich) or one
    huge line (tqdm). After the k-th optimizer step this prints ``step 119 (120/1000 done, 12%) | train/loss
    3.1234 | val/bits_per_byte 4.37 @99 | ... | 5432 tok/s | 00:01:02 elapsed, ETA 00:07:35``, and after each
    validation ``validation at step 99 | val/bits_per_byte 4.37 | ...``.

    Steps are the loggers' (see the module docstring): the line after the k-th optimizer step says ``step k - 1``,
    where TensorBoard puts its ``train/`` values, then how many steps are done; validation values on a training
    line are those of the last validation, with ``@S``, the step it was recorded at. The ETA is from this run's
    pace so far.

    Args:
        every_n_steps: print after every this many optimizer steps.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = every_n_steps
        self._start = 0.0
        self._tokens = 0
        self._first_step = 0  # where this run started (a resumed run's ETA counts only its own steps)
        self._printed = -1  # with gradient accumulation a step ends after several batches: print it once
        self._batch_start_step = 0  # global_step when the current batch started
        self._stepped = False  # whether the current batch made an optimizer step (until the next batch starts)
        self._validation: tuple[int, dict[str, float]] | None = None  # the last one: (logger step, metrics)

    def logger_step(self, trainer: L.Trainer) -> int:
        """The step at which Lightning's loggers record what is logged now (see the module docstring).

        ``trainer.global_step`` less one between the end of a batch that made an optimizer step and the start
        of the next batch (its in-loop validation included): Lightning counts the step for its loggers then.
        """
        return trainer.global_step - int(self._stepped)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._tokens, self._first_step = time.perf_counter(), 0, trainer.global_step
        self._printed = trainer.global_step  # nothing to report before this run's first optimizer step
        self._stepped, self._validation = False, None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_start_step, self._stepped = trainer.global_step, False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self._validation = (self.logger_step(trainer), metrics)
        print(f"validation at step {self._validation[0]} | {_values(metrics)}", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._tokens += _tokens(batch)
        self._stepped = trainer.global_step > self._batch_start_step
        step = trainer.global_step
        if step % self.every_n_steps or step == self._printed or not trainer.is_global_zero:
            return
        self._printed = step
        elapsed = time.perf_counter() - self._start
        shown = _values({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        if self._validation is not None:
            shown += " | " + _values(self._validation[1], at=self._validation[0])
        rate = self._tokens * trainer.world_size / max(elapsed, 1e-9)
        progress, eta = f"{step} done", ""
        if trainer.max_steps and trainer.max_steps > 0:
            progress = f"{step}/{trainer.max_steps} done, {100 * step // trainer.max_steps}%"
            done = step - self._first_step
            if done > 0:
                eta = f", ETA {_clock(elapsed / done * max(trainer.max_steps - step, 0))}"
        line = f"step {self.logger_step(trainer)} ({progress}) | {shown} | {rate:.0f} tok/s | {_clock(elapsed)} elapsed"
        print(line + eta, flush=True)


def _values(metrics: dict[str, float], at: int | None = None) -> str:
    """``name value`` for each metric, by name; with ``at``: ``name value @at`` (the step it was measured at)."""
    suffix = "" if at is None else f" @{at}"
    return " | ".join(f"{k} {v:.4g}{suffix}" for k, v in sorted(metrics.items()))


def _clock(seconds: float) -> str:
    """``HH:MM:SS`` (hours past 24 keep counting)."""
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class SlurmRequeue(Callback):
    """Checkpoint and requeue a SLURM job when it is signalled before its time limit runs out.

    Submit with ``#SBATCH --signal=USR1@90`` (see recipes/slurm/). Lightning's own handler saves the
    checkpoint inside the signal handler, across ranks, which deadlocked 1 run in 3 here and crashed
    ranks whose DataLoader workers got the signal too (docs/architecture.md, section "SLURM"). This one
    only sets a flag; at the next batch end all ranks agree on it, every rank saves the same
    ``hpc_ckpt_N.ckpt`` in ``trainer.default_root_dir``, rank 0 runs ``scontrol requeue``, and training
    stops. When the job restarts, Lightning resumes from the newest ``hpc_ckpt_N`` by itself.

    Installing the handler in ``setup`` keeps Lightning from installing its own (it only does so when no
    handler is set); use ``SLURMEnvironment(auto_requeue=False)`` in the trainer's plugins as well.

    Args:
        signal_name: the signal SLURM sends (``--signal=USR1@N``).
    """

    def __init__(self, signal_name: str = "SIGUSR1") -> None:
        self.signum = getattr(signal, signal_name)
        self.requested = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True  # nothing else: the real work happens between batches, on every rank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = hpc_checkpoint_path(trainer.default_root_dir)
        path = trainer.strategy.broadcast(path)  # every rank writes its part of the same checkpoint
        rank_zero_info(f"signal {self.signum} received: saving {path} and requeueing the job")
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            requeue()
        trainer.should_stop = True


def hpc_checkpoint_path(root: str | os.PathLike) -> str:
    """``root/hpc_ckpt_{N+1}.ckpt`` after the newest existing one: the name Lightning resumes from on SLURM."""
    numbers = [
        int(m.group(1)) for p in Path(root).glob("hpc_ckpt_*") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return str(Path(root) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def requeue() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        rank_zero_warn("SlurmRequeue: not in a SLURM job (no SLURM_JOB_ID): checkpoint saved, nothing requeued")
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode:
        rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")
    else:
        rank_zero_info(f"requeued SLURM job {job}")
