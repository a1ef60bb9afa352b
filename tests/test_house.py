"""House rules, checked over the code (jpeglm/, data_modules/, callbacks/) with ``ast`` and text scans.

(a) No private name of litdata, Lightning, torch or litgpt outside jpeglm/_compat.py (which documents each).
(b) No function over 60 lines, docstring included.
(c) Only jpeglm/codecs/ compares a codec's name: elsewhere ask the codec (its methods and attributes).
(d) No reference to design notes that live outside the repository (they are in docs/architecture.md).

Each failure lists ``file:line: what`` for every offence; each checker is also run on a small sample that holds
a violation, so a checker that stops catching anything fails too.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from jpeglm._compat import CHECKED

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("jpeglm", "data_modules", "callbacks")
COMPAT = ROOT / "jpeglm" / "_compat.py"
DEPENDENCIES = (
    "litdata",
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "lightning_utilities",
    "torch",
    "litgpt",
)
MAX_FUNCTION_LINES = 60


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


#: Private names jpeglm/_compat.py wraps (every private part of its CHECKED names): nowhere else, in any form.
WRAPPED = {part for name in CHECKED for part in name.split(".") if _private(part)}
#: Undocumented litdata attributes of private types that _compat wraps too (``dataset.worker_env`` is a ``_WorkerEnv``).
UNDOCUMENTED = {"distributed_env", "worker_env"}


def code_files() -> Iterator[Path]:
    for directory in CODE_DIRS:
        yield from sorted((ROOT / directory).rglob("*.py"))


def _where(path: Path, line: int) -> str:
    try:
        return f"{path.relative_to(ROOT)}:{line}"
    except ValueError:
        return f"{path}:{line}"


def _is_dependency(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in DEPENDENCIES


def _names_private_module(text: object) -> bool:
    """A string such as ``"torch.distributed._composable"``: a dotted name into a dependency's private part."""
    return (
        isinstance(text, str)
        and re.fullmatch(r"[\w.]+", text) is not None
        and _is_dependency(text)
        and any(_private(p) for p in text.split("."))
    )


def _dotted(node: ast.AST) -> tuple[str, list[str]] | None:
    """``a.b.c`` -> ``("a", ["b", "c"])`` for an attribute chain rooted at a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return (node.id, parts[::-1]) if isinstance(node, ast.Name) else None


# ------------------------------------------------------------------------------------------------ (a) private names


def private_dependency_names(path: Path, source: str) -> list[str]:
    """``file:line`` of each private name of a dependency that ``source`` uses.

    Flags: importing a private module or name of a dependency; ``<dependency object>._x`` (any name imported
    from a dependency, followed by a private attribute); a string naming a private dependency module; and the
    private names jpeglm/_compat.py wraps (:data:`WRAPPED`), as attributes, names, definitions or strings.
    """
    found = []
    tree = ast.parse(source)
    from_dependency = set()  # local names bound to a dependency's modules, classes or functions
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_dependency(alias.name):
                    from_dependency.add((alias.asname or alias.name).split(".")[0])
                    if any(_private(p) for p in alias.name.split(".")):
                        found.append(f"{_where(path, node.lineno)}: imports private module {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_dependency(node.module):
            if any(_private(p) for p in node.module.split(".")):
                found.append(f"{_where(path, node.lineno)}: imports from private module {node.module}")
            for alias in node.names:
                from_dependency.add(alias.asname or alias.name)
                if _private(alias.name):
                    found.append(f"{_where(path, node.lineno)}: imports private {node.module}.{alias.name}")
    for node in ast.walk(tree):
        chain = _dotted(node) if isinstance(node, ast.Attribute) else None
        if chain and chain[0] in from_dependency and _private(node.attr):  # flagged once, at the private part
            found.append(f"{_where(path, node.lineno)}: uses private {'.'.join([chain[0], *chain[1]])}")
            continue
        name = {
            ast.Attribute: lambda n: n.attr,
            ast.Name: lambda n: n.id,
            ast.FunctionDef: lambda n: n.name,
            ast.AsyncFunctionDef: lambda n: n.name,
            ast.Constant: lambda n: n.value if isinstance(n.value, str) else None,
        }.get(type(node), lambda n: None)(node)
        if name in WRAPPED:
            found.append(f"{_where(path, node.lineno)}: {name} is a private dependency name: use jpeglm._compat")
        elif isinstance(node, ast.Attribute) and (
            node.attr in UNDOCUMENTED
            or (node.attr == "path" and isinstance(node.value, ast.Attribute) and node.value.attr == "input_dir")
        ):
            found.append(f"{_where(path, node.lineno)}: .{node.attr} is undocumented litdata state: use jpeglm._compat")
        elif isinstance(node, ast.Constant) and _names_private_module(name):
            found.append(f"{_where(path, node.lineno)}: names private {name}")
    return sorted(set(found), key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


def test_no_private_dependency_names_outside_compat():
    found = [hit for path in code_files() if path != COMPAT for hit in private_dependency_names(path, path.read_text())]
    assert not found, "private names of dependencies outside jpeglm/_compat.py:\n" + "\n".join(found)


PRIVATE_SAMPLE = """\
import torch
import lightning as L
from litdata.streaming import dataset as litdata_dataset
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from lightning.fabric.utilities.load import _load_distributed_checkpoint
litdata_dataset._replay_sampling = None
first = trainer._logger_connector._first_loop_iter
class Blocks:
    def _resume(self, chunks, intervals):
        return self._datasets, getattr(self, "_weights")
x = torch._dynamo.config
y = L.pytorch._own_thing
importlib.import_module("torch.distributed._composable")
ranks, workers = datasets[0].distributed_env.world_size, self.worker_env.world_size
directory = Path(dataset.input_dir.path)
"""


def test_private_name_check_catches_every_form():
    found = private_dependency_names(Path("sample.py"), PRIVATE_SAMPLE)
    assert {int(hit.split(":")[1]) for hit in found} == {4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15}, "\n".join(found)
    assert all(hit.startswith("sample.py:") for hit in found)


def test_private_name_check_leaves_own_and_public_names_alone():
    source = (
        "import torch\nfrom jpeglm import _compat\nfrom jpeglm._compat import combined_members\n"
        "class A:\n    def _own(self, input_dir):\n"
        "        return self._cache, torch.nn.Linear, _compat.world_size, input_dir, p.path\n"
        "__all__ = ['A']\nprint(torch.__version__)\n"
    )
    assert private_dependency_names(Path("ok.py"), source) == []


# ------------------------------------------------------------------------------------------------ (b) function length


def long_functions(path: Path, source: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line`` of each function (or method) longer than ``limit`` lines, from ``def`` to its end."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{_where(path, node.lineno)}: {node.name} is {lines} lines (limit {limit})")
    return found


def test_no_function_over_60_lines():
    found = [hit for path in code_files() for hit in long_functions(path, path.read_text())]
    assert not found, "functions to split:\n" + "\n".join(found)


def test_function_length_check_catches_a_long_function():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 2))
    fits = f'def fits():\n    """Doc."""\n{body}'  # exactly the limit
    too_long = (
        f'class C:\n    def too_long(self):\n        """Doc."""\n{body.replace("    ", "        ")}        pass\n'
    )
    assert long_functions(Path("s.py"), fits) == []
    assert long_functions(Path("s.py"), too_long) == [f"s.py:2: too_long is {MAX_FUNCTION_LINES + 1} lines (limit 60)"]


# ------------------------------------------------------------------------------------------------ (c) codec names

CODEC_NAME = re.compile(
    r"""\.name\s*[!=]=\s*["'](?:avc|jpeg)["']"""  # x.name == "avc"
    r"""|["'](?:avc|jpeg)["']\s*[!=]=\s*[\w.\[\]]+\.name\b"""  # "avc" == x.name
    r"""|\.name\s+(?:not\s+)?in\s*[(\[{][^)\]}]*["'](?:avc|jpeg)["']"""  # x.name in ("jpeg", ...)
    r"""|\bcodec\.name\b"""  # any use of codec.name
)


def codec_name_comparisons(path: Path, source: str) -> list[str]:
    """``file:line`` of each comparison of a codec's name (or any ``codec.name``)."""
    return [
        f"{_where(path, number)}: compares a codec's name ({line.strip()}): ask the codec instead"
        for number, line in enumerate(source.splitlines(), 1)
        if CODEC_NAME.search(line)
    ]


def test_only_codecs_compare_codec_names():
    found = [
        hit
        for path in code_files()
        if (ROOT / "jpeglm" / "codecs") not in path.parents
        for hit in codec_name_comparisons(path, path.read_text())
    ]
    assert not found, "codec names compared outside jpeglm/codecs/:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        'if codec.name == "avc":',
        "if source.codec.name != 'jpeg':",
        'keep = [s for s in sources if s.name == "jpeg"]',
        'if "avc" == spec.name:',
        'if codec.name in ("jpeg", "avc"):',
        "label = codec.name",
    ],
)
def test_codec_name_check_catches_a_comparison(line):
    assert codec_name_comparisons(Path("s.py"), f"x = 1\n{line}\n") == [
        f"s.py:2: compares a codec's name ({line}): ask the codec instead"
    ]


def test_codec_name_check_leaves_other_names_alone():
    source = 'if path.name == "index.json":\n    print(item.name)\nif modality == "jpeg":\n    pass\n'
    assert codec_name_comparisons(Path("s.py"), source) == []


# ------------------------------------------------------------------------------------------------ (d) outside notes

# Built from parts so this file does not name them itself.
OUTSIDE_NOTES = re.compile(r"\b(?:" + "|".join(("DESIGN", "SLURM" + "_NOTES")) + r")\.md\b")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sbatch", ".sh", ".txt", ".rst", ".cfg", ".ini", ""}
SKIPPED_DIRS = {".git", ".venv", "__pycache__", "build", "dist", "runs", "lightning_logs", "fixtures"}


def repository_text_files() -> Iterator[Path]:
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = sorted(
            d for d in subdirectories if d not in SKIPPED_DIRS and not d.endswith((".egg-info", "_cache"))
        )
        for name in sorted(files):
            path = Path(directory) / name
            if path.suffix in TEXT_SUFFIXES and path.stat().st_size < 1_000_000:
                yield path


def outside_note_references(path: Path, text: str) -> list[str]:
    """``file:line`` of each reference to design notes kept outside the repository."""
    return [
        f"{_where(path, number)}: refers to {match.group(0)}, which is not in the repository: "
        f"point at docs/architecture.md"
        for number, line in enumerate(text.splitlines(), 1)
        for match in OUTSIDE_NOTES.finditer(line)
    ]


def test_no_references_to_notes_outside_the_repository():
    found = []
    for path in repository_text_files():
        try:
            found += outside_note_references(path, path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    assert not found, "\n".join(found)


def test_outside_note_check_catches_a_reference(tmp_path):
    sample = tmp_path / "notes.yaml"
    sample.write_text("# fine\n# see " + "SLURM" + "_NOTES.md and " + "DESIGN" + ".md\n")
    found = outside_note_references(sample, sample.read_text())
    assert [hit.split(": ")[0] for hit in found] == [f"{sample}:2", f"{sample}:2"]
    assert outside_note_references(sample, "see docs/architecture.md, SLURM\n") == []
