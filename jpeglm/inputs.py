"""Finding a user's input files and turning them into byte streams, one bad file never stopping the rest.

Inputs are directories (searched recursively), glob patterns, files, or list files that name one path
per line (``.lst`` / ``.list``, and ``.txt`` for the media modalities; relative paths are read from
the list file's directory).
"""

from __future__ import annotations

import glob
import json
import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".tga"}
)
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".3gp"})
TEXT_EXTENSIONS = frozenset({".txt", ".jsonl"})
EXTENSIONS = {"jpeg": IMAGE_EXTENSIONS, "avc": VIDEO_EXTENSIONS, "text": TEXT_EXTENSIONS}
"""File extensions read for each modality."""
_LIST_EXTENSIONS = frozenset({".lst", ".list"})


class InputError(ValueError):
    """The inputs themselves are wrong (missing path, nothing to read): the job cannot start."""


@dataclass
class InputFiles:
    """Files to read, and files found in directories that the modality does not read."""

    files: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def find_inputs(inputs: Sequence[str | Path], modality: str) -> InputFiles:
    """Expand directories, globs and list files into a de-duplicated, deterministic list of files.

    Raises:
        InputError: an input does not exist, a glob matches nothing, or no file is found at all.
    """
    extensions = EXTENSIONS[modality]
    found = InputFiles()
    for item in inputs:
        _expand(str(item), modality, extensions, found)
    found.files = list(dict.fromkeys(found.files))
    if not found.files:
        hint = f" ({len(found.ignored)} files with other extensions)" if found.ignored else ""
        raise InputError(f"no {modality} input files ({', '.join(sorted(extensions))}) in {list(inputs)}{hint}")
    return found


def _expand(item: str, modality: str, extensions: frozenset[str], found: InputFiles) -> None:
    path = Path(item).expanduser()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            (found.files if p.suffix.lower() in extensions else found.ignored).append(p)
    elif path.is_file() and _is_list_file(path, modality):
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                entry = Path(line.strip()).expanduser()
                _expand(str(entry if entry.is_absolute() else path.parent / entry), modality, extensions, found)
    elif path.is_file():
        found.files.append(path)
    elif glob.has_magic(item):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        if not matches:
            raise InputError(f"no file matches {item!r}")
        for p in matches:
            _expand(str(p), modality, extensions, found)
    else:
        raise InputError(f"input not found: {item}")


def _is_list_file(path: Path, modality: str) -> bool:
    suffix = path.suffix.lower()
    return suffix in _LIST_EXTENSIONS or (suffix == ".txt" and modality != "text")


def read_text_items(path: Path) -> Iterator[bytes]:
    """UTF-8 items of a text file: a ``.txt`` file is one item; a ``.jsonl`` line is one (its ``text`` field)."""
    if path.suffix.lower() != ".jsonl":
        yield path.read_bytes()
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a JSON object with a 'text' field ({e})") from e
            yield str(text).encode("utf-8")


@dataclass(frozen=True)
class Encoded:
    """One input turned into a stream, or the reason it could not be."""

    path: Path
    stream: bytes | None
    error: str | None = None


def _encode_one(codec: Any, path: Path) -> Encoded:
    try:
        return Encoded(path, codec.encode(path))
    except Exception as e:  # one bad file is reported and skipped, never stops the job
        return Encoded(path, None, f"{type(e).__name__}: {e}")


def encode_files(codec: Any, files: Sequence[Path], num_workers: int) -> Iterator[Encoded]:
    """Encode media files with ``codec`` on ``num_workers`` processes, yielding results in input order."""
    if num_workers <= 1:
        for path in files:
            yield _encode_one(codec, path)
        return
    # spawn, not fork: the parent may already run threads (tokenizers, torch) that fork would copy half-way.
    with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_encode_one, [codec] * len(files), files, chunksize=8)
