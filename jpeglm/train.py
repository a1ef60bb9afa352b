"""``jpeglm fit|validate|test``: Lightning's CLI around CodecLM and the jpeglm data modules.

The data module decides what the model must match: its sequence length is linked to
``model.seq_len`` when the config is parsed, and its vocabulary size to ``model.vocab_size`` once it
is built (it reads the prepared directory's ``dataset.json``). Recipes in ``recipes/`` are configs for
this CLI; ``jpeglm fit --config recipes/jpeg_tiny.yaml --print_config`` shows every setting.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from jpeglm.model import CodecLM

SUBCOMMANDS = ("fit", "validate", "test")


class JpeglmCLI(LightningCLI):
    """LightningCLI with the data -> model links that keep a recipe from disagreeing with its data."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.seq_len", "model.seq_len")
        parser.link_arguments("data", "model.vocab_size", compute_fn=_vocab_size, apply_on="instantiate")


def _vocab_size(data: LightningDataModule) -> int:
    return data.vocab_size


def cli(args: list[str] | None = None, run: bool = True) -> JpeglmCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line after ``jpeglm``."""
    return JpeglmCLI(
        CodecLM,
        LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "jpeglm"} if run else {"prog": "jpeglm", "exit_on_error": False},
    )


def main(argv: list[str]) -> int:
    cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
