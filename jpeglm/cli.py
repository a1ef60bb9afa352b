"""The ``jpeglm`` command: one entry point, one subcommand per job.

``fit``, ``validate`` and ``test`` are Lightning's CLI: jpeglm/train.py parses their arguments itself.
Every other command is a typed Python function, as litgpt's commands are. :data:`COMMANDS` is the only
list of them: name (``tokenizer train`` is two words) -> module, function, one-line help, and optionally
the name of a *summary* function in the same module, which turns what the command function returns into
the lines printed at the end. Modules are imported only when their command runs, so ``jpeglm --help``
stays fast.

jsonargparse builds each command's parser from the function's signature and docstring: an option per
parameter, with its type, its default and the sentence of the docstring's ``Args:`` section as its help;
``--config FILE.yaml`` and ``--print_config`` on every command. The function is called with keyword
arguments only.

jsonargparse's own spellings work (``--val_fraction 0.1``, ``--inputs '[a, b]'``, ``--progress false``),
and so do the shorter ones people type, which :func:`translate` rewrites into those from the function's
signature alone (the parameters' types), without a table of options:

- dashes or underscores: ``--val-fraction`` is ``--val_fraction``;
- a unique prefix of a parameter's name, as argparse allows: ``--input`` is ``--inputs``, ``--codec`` is
  ``--codec_options``;
- a bool parameter X: ``--X`` alone means true, ``--no-X`` false (``--no-progress``), ``--X false`` works too;
- a list parameter: several values (``--input a b c``); a list of numbers also comma-separated
  (``--ratios 0.25,0.5,0.75``); lists of strings or paths are never cut at commas;
- a dict parameter: ``KEY=VALUE``, repeatable (``--codec size=64 --codec quality=30``); a value is a JSON
  scalar (``64``, ``0.5``, ``true``, ``null``) or else a string (``subsampling=4:4:4``);
- parameters that the table lists as ``positional`` may be given without their option, in order
  (``jpeglm consolidate CKPT_DIR --output model.ckpt``).

Mistakes end in one line on stderr, ``jpeglm <command>: error: <message>``, and exit code 2: arguments
jsonargparse refuses (an unknown option, a wrong type, a missing required one), and, from the command,
:class:`jpeglm.errors.UserError` and :class:`jpeglm.codecs.CodecError`. Any other exception is a bug and
keeps its traceback; ``JPEGLM_DEBUG=1`` shows the traceback of mistakes too.
"""

from __future__ import annotations

import argparse
import collections.abc
import importlib
import inspect
import json
import os
import re
import sys
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from types import UnionType
from typing import Any, NamedTuple

from jpeglm import __version__


class Command(NamedTuple):
    """One subcommand: where its function is and what it prints."""

    module: str
    function: str
    help: str
    summary: str | None = None
    """Name of a function of ``module``: the command's return value -> the lines printed at the end."""
    positional: tuple[str, ...] = ()
    """Parameters that may be given without their option, in this order."""


COMMANDS: dict[str, Command] = {
    "fit": Command("jpeglm.train", "main", "train a CodecLM from a recipe (LightningCLI: `jpeglm fit --help`)"),
    "validate": Command("jpeglm.train", "main", "evaluate a CodecLM on the validation split (LightningCLI)"),
    "test": Command("jpeglm.train", "main", "evaluate a CodecLM on the test data (LightningCLI)"),
    "generate": Command(
        "jpeglm.generate",
        "generate_samples",
        "sample images or videos from a checkpoint into files and a contact sheet",
        summary="summary",
    ),
    "evaluate": Command(
        "jpeglm.evaluate",
        "evaluate",
        "the paper's FID protocol: completions at several prompt ratios, top-k, top-p, seeds",
        summary="summary",
    ),
    "evaluate-captions": Command(
        "jpeglm.caption_eval",
        "evaluate_captions",
        "does a captioned model draw what it is told? colour agreement at several guidance scales",
        summary="summary",
    ),
    "consolidate": Command(
        "jpeglm.checkpoints",
        "consolidate",
        "turn an FSDP2 sharded checkpoint directory into a single file",
        summary="consolidate_summary",
        positional=("checkpoint",),
    ),
    "export": Command(
        "jpeglm.export",
        "export",
        "write a checkpoint as a Hugging Face Llama or litgpt checkpoint directory",
        summary="summary",
    ),
    "import": Command(
        "jpeglm.hf_import",
        "hf_import",
        "turn the released JPEG-LM weights (a Hugging Face Llama directory) into a jpeglm checkpoint",
        summary="summary",
    ),
    "prepare": Command(
        "jpeglm.prepare",
        "prepare",
        "turn images, videos or text into litdata token shards for training",
        summary="summary",
    ),
    "tokenizer train": Command(
        "jpeglm.train_tokenizer",
        "train_tokenizer",
        "train a codec-byte BPE tokenizer on your images, videos or text",
        summary="summary",
    ),
}
"""Subcommand name -> where its function is (see the module docstring)."""
LIGHTNING_COMMANDS = ("fit", "validate", "test")

SPELLINGS = (
    "Options may be spelt with dashes or underscores (--val-fraction), or as a unique prefix (--input for "
    "--inputs); a bool X is set with --X or --no-X; a list takes several values (--input a b) or, for "
    "numbers, a,b,c; a dict takes KEY=VALUE, repeatable (--codec size=64 --codec quality=30)."
)


# ---------------------------------------------------------------------- the entry point


def main(argv: list[str] | None = None) -> int:
    """Run ``jpeglm ARGV``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = command_name(argv)
    if name is None:
        top_parser().parse_args(argv)  # --help, --version, or a usage error: exits
        return 2
    command = COMMANDS[name]
    args = argv[len(name.split()) :]
    if name in LIGHTNING_COMMANDS:
        return getattr(importlib.import_module(command.module), command.function)(argv)
    return run_command(name, command, args)


def command_name(argv: list[str]) -> str | None:
    """The command that ``argv`` starts with (two words or one), or None."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name
    return None


def top_parser() -> argparse.ArgumentParser:
    """``jpeglm --help``: the commands and their one-line help, without importing any of them."""
    parser = argparse.ArgumentParser(
        prog="jpeglm",
        description="Pretrain LLMs that generate images and videos by writing JPEG and H.264 bytes.",
        epilog="`jpeglm COMMAND --help` lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"jpeglm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help)
    return parser


def run_command(name: str, command: Command, args: list[str]) -> int:
    """Parse ``args`` for the command's function, call it by keyword, print its summary; returns the exit code."""
    from argparse import ArgumentError

    from jpeglm.codecs import CodecError
    from jpeglm.errors import UserError

    module = importlib.import_module(command.module)
    function = getattr(module, command.function)
    summary = getattr(module, command.summary) if command.summary else None
    parser = command_parser(name, command, function)
    types = parameter_types(function)
    try:
        config = parser.parse_args(translate(args, types, command.positional))
    except ArgumentError as e:
        return _error(name, _short(str(e)), e)
    kwargs = {key: value for key, value in config.as_dict().items() if key in types}
    try:
        result = function(**kwargs)
    except (UserError, CodecError) as e:
        return _error(name, command_line_spelling(str(e), types), e)
    if summary is not None:
        print(summary(result))
    return 0


def command_parser(name: str, command: Command, function: Callable) -> Any:
    """The jsonargparse parser of a command: ``--config``, ``--print_config`` and one option per parameter."""
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    epilog = SPELLINGS
    if command.positional:
        given = " ".join(p.upper() for p in command.positional)
        epilog += f" {', '.join(command.positional)} may also be given without the option: jpeglm {name} {given} ..."
    parser = ArgumentParser(
        prog=f"jpeglm {name}",
        description=command.help,
        epilog=epilog,
        formatter_class=DefaultHelpFormatter,
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of options (see --print_config).")
    parser.add_function_arguments(inspect.unwrap(function), as_group=False)
    return parser


def _error(name: str, message: str, error: BaseException) -> int:
    if os.environ.get("JPEGLM_DEBUG"):
        raise error
    print(f"jpeglm {name}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def command_line_spelling(message: str, parameters: Iterable[str]) -> str:
    """``message`` with the command's parameter names as a user types them: ``feature_extractor='small'`` becomes
    ``--feature-extractor small`` and ``top_k`` becomes ``--top-k`` (messages are written for Python callers too).

    A bare name is rewritten only when it has an underscore: ``ratio`` or ``checkpoint`` are also plain words.
    """
    for parameter in sorted(parameters, key=len, reverse=True):
        option = "--" + parameter.replace("_", "-")
        message = re.sub(rf"(?<![\w.-]){parameter}=(['\"]?)([^'\"\s,;)]*)\1", rf"{option} \2", message)
        if "_" in parameter:
            message = re.sub(rf"(?<![\w.-]){parameter}(?![\w=])", option, message)
    return message


def _short(message: str) -> str:
    """jsonargparse's nested error without the lines that restate the types it tried."""
    noise = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:")
    lines = (line.strip().removeprefix("- ") for line in message.splitlines())
    return " ".join(line for line in lines if line and not line.startswith(noise) and "'NoneType'" not in line)


# ---------------------------------------------------------------------- argv as people type it


def parameter_types(function: Callable) -> dict[str, Any]:
    """Each keyword parameter's type (the annotation, resolved), in the signature's order."""
    function = inspect.unwrap(function)
    hints = typing.get_type_hints(function)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(function).parameters.values()
    return {p.name: hints.get(p.name, Any) for p in parameters if p.kind in kinds}


def translate(argv: list[str], types: dict[str, Any], positional: tuple[str, ...] = ()) -> list[str]:
    """``argv`` as people type it -> as jsonargparse reads it, driven by the parameters' ``types`` (see the
    module docstring). Options it cannot resolve are left as they are, for jsonargparse to refuse.

    Raises:
        argparse.ArgumentError: a dict option's value is not ``KEY=VALUE``.
    """
    out: list[str] = []
    dicts: dict[str, dict[str, Any]] = {}  # the KEY=VALUE pairs of each dict option so far
    positional = [p for p in positional if p in types]
    rest = list(argv)
    while rest:
        token = rest.pop(0)
        if not token.startswith("--") or token == "--":
            bare = positional and token != "--" and not token.startswith("-")
            out.append(f"--{positional.pop(0)}={token}" if bare else token)
            continue
        option, eq, value = token[2:].partition("=")
        key = option.replace("-", "_")
        if key in ("config", "print_config", "help"):
            out.append(f"--{key}{eq}{value}")
            if key == "config" and not eq and rest:
                out.append(rest.pop(0))
            continue
        resolved = _resolve(key, types)
        if resolved is None:  # unknown: jsonargparse names it, with the values that follow it
            out.append(token)
            while rest and not rest[0].startswith("--"):
                out.append(rest.pop(0))
            continue
        name, negated = resolved
        out += _option(name, types[name], negated, [value] if eq else None, rest, dicts, f"--{option}")
    return out


def _resolve(key: str, types: dict[str, Any]) -> tuple[str, bool] | None:
    """(parameter, negated) that ``--key`` means: the exact name, ``no_`` + a bool's name, or a unique prefix."""
    if key in types:
        return key, False
    if key.startswith("no_"):
        target = _resolve(key[3:], types)
        if target is not None and not target[1] and _kind(types[target[0]]) == "bool":
            return target[0], True
    matches = [name for name in types if name.startswith(key)]
    return (matches[0], False) if len(matches) == 1 else None


def _option(
    name: str, annotation: Any, negated: bool, given: list[str] | None, rest: list[str], dicts, typed: str
) -> list[str]:
    """The jsonargparse arguments of one option (``typed`` as the user spelt it); takes the values it consumes
    from the front of ``rest``."""
    kind = _kind(annotation)
    if negated:
        return [f"--no_{name}={given[0]}"] if given else [f"--{name}=false"]  # --no-X=... is refused
    if kind == "bool":
        if given is None and rest and rest[0].lower() in ("true", "false"):
            given = [rest.pop(0)]
        return [f"--{name}={given[0] if given else 'true'}"]
    if given is None:
        count, given = (len(rest) if kind == "list" else 1), []
        while rest and len(given) < count and not rest[0].startswith("--"):
            given.append(rest.pop(0))
        if not given:
            return [f"--{name}"]  # jsonargparse: expected one argument
    if kind == "list" and not (len(given) == 1 and given[0].lstrip().startswith("[")):
        if not _holds_strings(annotation):  # numbers: also a,b,c
            given = [_scalar(part) for value in given for part in value.split(",") if part]
        return [f"--{name}={json.dumps(given)}"]
    if kind == "dict" and not given[0].lstrip().startswith("{"):
        key, sep, value = given[0].partition("=")
        if not sep or not key:
            raise argparse.ArgumentError(None, f"{typed} takes KEY=VALUE, got {given[0]!r}")
        dicts.setdefault(name, {})[key] = _scalar(value)
        return [f"--{name}={json.dumps(dicts[name])}"]  # all pairs so far: the last one given wins
    return [f"--{name}={given[0]}"]


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _kind(annotation: Any) -> str:
    """ "bool", "list", "dict" or "other": what an option of this type takes on the command line."""
    annotation = _without_none(annotation)
    if annotation is bool:
        return "bool"
    origin = typing.get_origin(annotation) or annotation
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable):
        return "list"
    if origin in (dict, collections.abc.Mapping):
        return "dict"
    return "other"


def _holds_strings(annotation: Any) -> bool:
    """Whether a list type's items are strings or paths (which may hold commas)."""
    items = typing.get_args(_without_none(annotation))
    item = _without_none(items[0]) if items else str
    options = typing.get_args(item) if typing.get_origin(item) in (typing.Union, UnionType) else (item,)
    return any(isinstance(o, type) and issubclass(o, (str, os.PathLike, Path)) for o in options)


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


if __name__ == "__main__":
    sys.exit(main())
