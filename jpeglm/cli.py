"""The ``jpeglm`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> exit code``,
except the Lightning ones (fit, validate, test), whose module parses its own arguments with LightningCLI
(``main(argv) -> exit code``). :data:`COMMANDS` is the only list of them. Modules are imported only
when their command runs, so ``jpeglm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from jpeglm import __version__

COMMANDS = {
    "fit": ("jpeglm.train", "train a CodecLM from a recipe (LightningCLI: `jpeglm fit --help`)"),
    "validate": ("jpeglm.train", "evaluate a CodecLM on the validation split (LightningCLI)"),
    "test": ("jpeglm.train", "evaluate a CodecLM on the test data (LightningCLI)"),
    "generate": ("jpeglm.sample", "sample images or videos from a checkpoint into files and a contact sheet"),
    "evaluate": (
        "jpeglm.evaluate",
        "the paper's FID protocol: completions at several prompt ratios, top-k, top-p, seeds",
    ),
    "consolidate": ("jpeglm.checkpoints", "turn an FSDP2 sharded checkpoint directory into a single file"),
    "export": ("jpeglm.export", "write a checkpoint as a Hugging Face Llama or litgpt checkpoint directory"),
    "prepare": ("jpeglm.prepare", "turn images, videos or text into litdata token shards for training"),
    "tokenizer": ("jpeglm.train_tokenizer", "train a codec-byte BPE tokenizer (`jpeglm tokenizer train --help`)"),
}
"""Subcommand name -> (module, one-line help)."""
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jpeglm", description="Pretrain LLMs that generate images and videos by writing JPEG and H.264 bytes."
    )
    parser.add_argument("--version", action="version", version=f"jpeglm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command and name not in LIGHTNING_COMMANDS:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]][0]).main(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    from jpeglm.codecs import CodecError
    from jpeglm.inputs import InputError

    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except (InputError, CodecError, FileNotFoundError, FileExistsError, ValueError) as e:
        # Mistakes in what the user asked for get one clear line, not a traceback (JPEGLM_DEBUG=1 shows it).
        if os.environ.get("JPEGLM_DEBUG"):
            raise
        print(f"jpeglm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
