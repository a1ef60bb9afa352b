"""Finding a user's inputs and reading them as byte streams, one bad input never stopping the rest.

Inputs are directories (searched recursively), glob patterns, files, list files that name one path
per line (``.lst`` / ``.list``, and ``.txt`` for the media modalities; relative paths are read from
the list file's directory), and webdataset-style ``.tar`` shards (their members with the modality's
extensions are inputs). For text, a ``.txt`` file is one item and each line of a ``.jsonl`` file is
one item (its ``text`` field).

Every item is a :class:`InputItem`: a byte range of a file plus a stable ``key`` (the path relative to
the directory it was found in, ``shard.tar/member`` for tar members, ``file.jsonl:LINE`` for lines)
that names it in reports and decides its train/val split, so moving a dataset directory changes nothing.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jpeglm.errors import UserError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".tga"}
)
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".3gp"})
TEXT_EXTENSIONS = frozenset({".txt", ".jsonl"})
EXTENSIONS = {"jpeg": IMAGE_EXTENSIONS, "avc": VIDEO_EXTENSIONS, "text": TEXT_EXTENSIONS}
"""File extensions read for each modality (plus ``.tar`` shards, whose members are filtered the same way)."""
_LIST_EXTENSIONS = frozenset({".lst", ".list"})
WRONG_EXTENSION = "wrong_extension"
"""The reason a file that is not a file type of the modality (a ``.svg`` among images, a ``.json`` sidecar in a
tar shard) is *skipped*: ``jpeglm tokenizer train`` and ``jpeglm prepare`` count it with the inputs skipped for
other reasons, under this one."""
WRONG_EXTENSION_ERROR = "not a file type this modality reads"


class InputError(UserError):
    """The inputs themselves are wrong (missing path, nothing to read): the job cannot start."""


@dataclass(frozen=True)
class InputItem:
    """One input item: ``size`` bytes at ``offset`` of ``path`` (``size < 0``: the whole file).

    Attributes:
        path: the file that holds the item.
        key: stable name of the item (see the module docstring).
        offset: where the item starts in the file (tar members, jsonl lines).
        size: the item's length in bytes, or -1 for the whole file.
        line: the item is one JSON line whose ``text`` field is the item.
    """

    path: Path
    key: str
    offset: int = 0
    size: int = -1
    line: bool = False

    @property
    def name(self) -> str:
        """Where to find the item, for people: the path, plus the member or line."""
        if self.line:
            return f"{self.path}:{self.key.rsplit(':', 1)[1]}"
        return f"{self.path}/{self.key.rsplit('/', 1)[-1]}" if self.size >= 0 else str(self.path)

    def read(self) -> bytes:
        """The item's bytes (for a JSON line: its ``text`` field as UTF-8)."""
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if not self.line:
            return data
        try:
            return str(json.loads(data)["text"]).encode("utf-8")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a JSON object with a 'text' field ({e})") from e


@dataclass
class Inputs:
    """Items to read, and files found that the modality does not read (by their path; skipped, with the reason
    :data:`WRONG_EXTENSION`)."""

    items: list[InputItem] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    @property
    def ignored(self) -> list[Path]:
        """The old name of :attr:`skipped`."""
        return self.skipped


def find_inputs(inputs: Sequence[str | Path], modality: str) -> Inputs:
    """Expand directories, globs, list files, tar shards and jsonl files into a deterministic list of items.

    Raises:
        InputError: an input does not exist, a glob matches nothing, or nothing readable is found at all.
    """
    if modality not in EXTENSIONS:
        raise InputError(f"unknown modality {modality!r}; choose one of {sorted(EXTENSIONS)}")
    found = Inputs()
    for item in inputs:
        _expand(str(item), None, modality, found)
    found.items = list({(s.path, s.offset, s.size): s for s in found.items}.values())  # drop repeats, keep order
    if not found.items:
        hint = f" ({len(found.skipped)} files of other types skipped)" if found.skipped else ""
        extensions = ", ".join(sorted(EXTENSIONS[modality] | {".tar"}))
        raise InputError(f"no {modality} inputs ({extensions}) in {list(map(str, inputs))}{hint}")
    return found


def _expand(item: str, key: str | None, modality: str, found: Inputs) -> None:
    path = Path(item).expanduser()
    if path.is_dir():
        # Dangling symlinks are kept (and reported unreadable), never silently dropped.
        for p in sorted(q for q in path.rglob("*") if q.is_file() or q.is_symlink()):
            _add_file(p, p.relative_to(path).as_posix(), modality, found, from_directory=True)
    elif path.is_file() and _is_list_file(path, modality):
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                entry = Path(line.strip()).expanduser()
                _expand(str(entry if entry.is_absolute() else path.parent / entry), line.strip(), modality, found)
    elif path.is_file():
        _add_file(path, key or str(path), modality, found, from_directory=False)
    elif glob.has_magic(item):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise InputError(f"no file matches {item!r}")
        for match in matches:
            _expand(match, None, modality, found)
    else:
        raise InputError(f"input not found: {item}")


def _add_file(path: Path, key: str, modality: str, found: Inputs, from_directory: bool) -> None:
    suffix = path.suffix.lower()
    if suffix == ".tar":
        _add_tar(path, key, modality, found)
    elif suffix == ".jsonl" and modality == "text":
        found.items += _jsonl_lines(path, key)
    elif suffix in EXTENSIONS[modality] or not from_directory:
        found.items.append(InputItem(path, key))  # a file named explicitly is tried whatever its extension
    else:
        found.skipped.append(path)


def _add_tar(path: Path, key: str, modality: str, found: Inputs) -> None:
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed: members are byte ranges of the file
            members = [m for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"{path}: cannot read tar shard ({e})") from e
    for m in members:
        if Path(m.name).suffix.lower() in EXTENSIONS[modality] and Path(m.name).suffix.lower() != ".jsonl":
            found.items.append(InputItem(path, f"{key}/{m.name}", m.offset_data, m.size))
        else:
            found.skipped.append(path / m.name)


def _jsonl_lines(path: Path, key: str) -> list[InputItem]:
    items, offset = [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                items.append(InputItem(path, f"{key}:{number}", offset, len(line), line=True))
            offset += len(line)
    return items


def _is_list_file(path: Path, modality: str) -> bool:
    suffix = path.suffix.lower()
    return suffix in _LIST_EXTENSIONS or (suffix == ".txt" and modality != "text")


# ---------------------------------------------------------------------- reading items


@dataclass(frozen=True)
class Encoded:
    """One input turned into a stream, or the reason it could not be.

    Attributes:
        item: the input.
        stream: the codec's byte stream (UTF-8 bytes for text), or None when the input was skipped.
        reason: why it was skipped: "empty", "unreadable", "not_utf8", or a ``CodecError.reason``
            ("corrupt", "truncated", "too_large", "no_video", ...).
        error: the message that explains the skip.
    """

    item: InputItem
    stream: bytes | None
    reason: str | None = None
    error: str | None = None


def encode_input(codec: Any, item: InputItem) -> Encoded:
    """Read one input and encode it with ``codec`` (None for text); every failure becomes a counted skip."""
    from jpeglm.codecs import CodecError

    try:
        # Whole media files go to the codec by path (its errors then name the file); the rest as bytes.
        whole_file = codec is not None and item.size < 0
        data = None if whole_file else item.read()
        if not (item.path.stat().st_size if whole_file else len(data)):
            return Encoded(item, None, "empty", "no bytes")
    except OSError as e:
        return Encoded(item, None, "unreadable", f"{type(e).__name__}: {e}")
    except ValueError as e:  # a jsonl line without a text field
        return Encoded(item, None, "corrupt", str(e))
    if codec is None:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            return Encoded(item, None, "not_utf8", str(e))
        return Encoded(item, data)
    try:
        return Encoded(item, codec.encode(item.path if whole_file else data))
    except CodecError as e:
        return Encoded(item, None, e.reason, str(e) if whole_file else f"{item.name}: {e}")
    except Exception as e:  # a codec bug on one input must not stop a million-item job: skip, report it
        return Encoded(item, None, "error", f"{type(e).__name__}: {e}")


def encode_inputs(codec: Any, items: Sequence[InputItem], num_workers: int) -> Iterator[Encoded]:
    """Encode inputs on ``num_workers`` processes, yielding results in input order."""
    if num_workers <= 1:
        for item in items:
            yield encode_input(codec, item)
        return
    # spawn, not fork: the parent may already run threads (tokenizers, torch) that fork would copy half-way.
    with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(encode_input, [codec] * len(items), items, chunksize=8)
