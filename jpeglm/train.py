"""``jpeglm fit|validate|test``: Lightning's CLI around CodecLM and the jpeglm data modules.

The data module decides what the model must match: its sequence length is linked to
``model.seq_len`` when the config is parsed, and its vocabulary size to ``model.vocab_size`` once it
is built (it reads the prepared directory's ``dataset.json``). Recipes in ``recipes/`` are configs for
this CLI; ``jpeglm fit --config recipes/jpeg_tiny.yaml --print_config`` shows every setting.

Mistakes get one line on stderr, ``jpeglm fit: error: ...``, and no traceback (``JPEGLM_DEBUG=1`` shows
it): exit code 2 for a mistake in the command, the config or the data (an unknown key, a missing data
directory, a GPU recipe on a machine without one), 1 for running out of memory, with what to change.
Errors raised inside the training or validation loops (steps, callbacks) keep their traceback, except
out-of-memory: there they are more likely bugs than mistakes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

import jpeglm.callbacks  # noqa: F401 - known subclasses: `--data.help CodecDataModule`, `--trainer.callbacks.help LogLines`
import jpeglm.data_modules  # noqa: F401
from jpeglm.codecs import CodecError
from jpeglm.errors import UserError
from jpeglm.model import CodecLM
from jpeglm.trainer import Trainer, resolve_last

SUBCOMMANDS = ("fit", "validate", "test")
USER_ERRORS = (UserError, CodecError, MisconfigurationException)
"""Exceptions that mean the command, config or data is wrong; anything else is a bug and keeps its traceback."""


class JpeglmCLI(LightningCLI):
    """LightningCLI with the data -> model links that keep a recipe from disagreeing with its data,
    everything a run writes under ``trainer.default_root_dir`` (:func:`under_root_dir`), and checkpoints that are
    never half written nor resumed from (:class:`jpeglm.trainer.Trainer`, :meth:`resolve_ckpt_path`)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.seq_len", "model.seq_len")
        parser.link_arguments("data", "model.vocab_size", compute_fn=_vocab_size, apply_on="instantiate")

    def instantiate_classes(self) -> None:
        trainer = self._get(self.config, "trainer", {})
        check_accelerator(trainer.get("accelerator"))  # before the data and model
        under_root_dir(trainer)
        super().instantiate_classes()

    def before_fit(self) -> None:
        self.resolve_ckpt_path()

    def before_validate(self) -> None:
        self.resolve_ckpt_path()

    def before_test(self) -> None:
        self.resolve_ckpt_path()

    def resolve_ckpt_path(self) -> None:
        """``--ckpt_path last``: the newest *whole* checkpoint, never a half-written one (:func:`.resolve_last`)."""
        arguments = self.config_init[self.subcommand]
        if arguments.get("ckpt_path") == "last":
            arguments["ckpt_path"] = resolve_last(self.trainer, self.subcommand)


def under_root_dir(trainer: Any) -> None:
    """Put the run's files under ``trainer.default_root_dir`` wherever a recipe does not name a place itself.

    Lightning's default logger (a recipe that names none: TensorBoard in ``<root>/lightning_logs``) is there
    already; a logger with an empty ``save_dir`` is put there too, and a ``ModelCheckpoint`` without ``dirpath``
    writes into ``<root>/checkpoints``. So a recipe names its run directory once (``default_root_dir``), and a run
    derived from it with ``--trainer.default_root_dir runs/mine`` writes everything there.
    """
    root = trainer.get("default_root_dir") or os.getcwd()
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        args = getattr(logger, "init_args", None)
        if args is not None and "save_dir" in args and not args.save_dir:
            args.save_dir = root
    for callback in trainer.get("callbacks") or []:
        args = getattr(callback, "init_args", None)
        if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and args.get("dirpath") is None:
            args.dirpath = os.path.join(root, "checkpoints")


def _vocab_size(data: LightningDataModule) -> int:
    return data.vocab_size


def check_accelerator(accelerator: object) -> None:
    """Refuse a config that asks for a GPU on a machine without one, before anything is built.

    Raises:
        UserError: ``trainer.accelerator`` is gpu or cuda and no CUDA device is visible (nor, for gpu, MPS).
    """
    name = accelerator if isinstance(accelerator, str) else str(getattr(accelerator, "class_path", ""))
    if name not in ("gpu", "cuda") and not name.endswith("CUDAAccelerator"):
        return
    if CUDAAccelerator.is_available() or (name == "gpu" and MPSAccelerator.is_available()):
        return
    raise UserError(
        f"this recipe needs a GPU (trainer.accelerator={name}) but no CUDA device is visible; "
        "on a CPU machine try `jpeglm fit --config recipes/jpeg_tiny.yaml`"
    )


SECRET_FIELDS = frozenset({"secret_access_key"})
"""Option names whose values ``config.yaml`` does not keep (:class:`SaveConfigWithoutSecrets`)."""


class SaveConfigWithoutSecrets(SaveConfigCallback):
    """Lightning's ``config.yaml`` of the run with every secret (:data:`SECRET_FIELDS`, e.g. an S3 secret key given
    as ``--data.init_args.storage.secret_access_key``) left unset (null): the run directory is often shared, and
    copied with the checkpoints. A run started again from that file (``--config .../config.yaml``, as a requeue
    does) takes the secret from the environment (``AWS_SECRET_ACCESS_KEY``), or from the command line again."""

    def __init__(self, parser: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        masked = config.clone()
        for key in masked.keys():  # noqa: SIM118 - the nested, dotted keys (iterating gives the top level)
            if key.rsplit(".", 1)[-1] in SECRET_FIELDS and masked[key] is not None:
                masked[key] = None
        super().__init__(parser, masked, *args, **kwargs)


def cli(args: list[str] | None = None, run: bool = True) -> JpeglmCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line after ``jpeglm``.

    Parse errors raise ``argparse.ArgumentError`` (:func:`main` prints them as one line).
    """
    return JpeglmCLI(
        CodecLM,
        LightningDataModule,
        trainer_class=Trainer,  # checkpoints written whole or not at all (jpeglm/trainer.py)
        subclass_mode_data=True,
        args=args,
        run=run,
        seed_everything_default=42,
        save_config_callback=SaveConfigWithoutSecrets,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "jpeglm", "exit_on_error": False},
    )


def main(argv: list[str]) -> int:
    """Run ``jpeglm fit|validate|test``; returns the exit code (see the module docstring)."""
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "fit"
    try:
        cli(None if argv == sys.argv[1:] else argv)  # None: Lightning reads sys.argv itself, without a warning
    except argparse.ArgumentError as e:
        return _error(e, command, f"{_short(str(e))} (`jpeglm {command} --help` lists the options)")
    except (*USER_ERRORS, ValueError) as e:
        # jsonargparse wraps errors of link functions (the data's vocabulary size): report the data's own error
        cause = e.__cause__ if "compute_fn of link" in str(e) and e.__cause__ is not None else e
        if not isinstance(cause, USER_ERRORS) or _raised_in_a_loop(e):  # a bug to debug, not a typo
            raise
        return _error(e, command, str(cause))
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)):
            raise
        return _error(e, command, f"out of memory ({_gist(e)}). {OUT_OF_MEMORY_ADVICE}", code=1)
    return 0


OUT_OF_MEMORY_ADVICE = (
    "To use less memory: set --model.activation_checkpointing true; lower the micro-batch "
    "--data.init_args.batch_size and raise --trainer.accumulate_grad_batches by the same factor to keep the global "
    "batch; or shard the model over more GPUs (--trainer.devices, --trainer.num_nodes with ModelParallelStrategy)."
)


def _raised_in_a_loop(e: BaseException) -> bool:
    """Whether ``e`` came out of Lightning's fit/validation loops (steps, callbacks) rather than from parsing
    the config or setting up the data: there a ValueError is far more likely a bug, and keeps its traceback."""
    return any(
        "/lightning/pytorch/loops/" in frame.filename.replace("\\", "/")
        for frame in traceback.extract_tb(e.__traceback__)
    )


def _gist(e: BaseException) -> str:
    """The first two sentences of an error's first line, e.g. "CUDA out of memory. Tried to allocate 2.00 GiB"."""
    lines = str(e).strip().splitlines()
    sentences = re.split(r"(?<=\.)\s", lines[0]) if lines else []
    return " ".join(sentences[:2]).rstrip(".") or type(e).__name__


def _error(e: BaseException, command: str, message: str, code: int = 2) -> int:
    if os.environ.get("JPEGLM_DEBUG"):
        raise e
    print(f"jpeglm {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


_NOISE = re.compile(
    r"Does not validate against any of the Union subtypes|Subtypes: |Errors:$|- Expected a <class 'NoneType'>|"
    r"Given value type: |Given value: "
)


def _short(message: str) -> str:
    """jsonargparse's nested errors without the lines that restate the types tried."""
    return " ".join(line.strip(" -") for line in message.splitlines() if not _NOISE.search(line.strip()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
