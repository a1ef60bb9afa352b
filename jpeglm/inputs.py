"""Finding a user's inputs and reading them as byte streams, one bad input never stopping the rest.

Inputs are directories (searched recursively), glob patterns, files, list files that name one path
per line (``.lst`` / ``.list``, and ``.txt`` for the media modalities; relative paths are read from
the list file's directory), and webdataset-style ``.tar`` shards (their members with the modality's
extensions are inputs). For text, a ``.txt`` file is one item and each line of a ``.jsonl`` file is
one item (its ``text`` field).

Every item is a :class:`InputItem`: a byte range of a file plus a stable ``key`` (the path relative to
the directory it was found in, ``shard.tar/member`` for tar members, ``file.jsonl:LINE`` for lines)
that names it in reports and decides its train/val split, so moving a dataset directory changes nothing.

Captioned images (``jpeglm prepare --captions``, :func:`find_captioned`) pair each image with a :class:`Caption`:
in a tar shard, the member with the same webdataset key (``key.txt``, else the ``caption`` field of
``key.json``: img2dataset's layout); in a folder, the sidecar of the same directory and stem (``photo.txt``,
else ``photo.json``); in a ``.jsonl`` manifest, each line's ``{"image": path, "caption": text}`` (relative
paths from the manifest's directory). Pairs that cannot be made are *rejected* with a reason
(:data:`NO_CAPTION`, :data:`NO_IMAGE`, ``corrupt`` for a manifest line that is not such an object);
:func:`read_caption` reads a caption, or says why it cannot (:data:`EMPTY_CAPTION`, ``unreadable``, ...).
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import tarfile
from collections import Counter
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
NO_CAPTION = "no_caption"
"""The reason a captioned job skips an image without a caption: no ``.txt``/``.json`` of its key or stem, a
``.json`` without a string ``caption`` field, or a manifest line without one."""
NO_IMAGE = "no_image"
"""The reason a captioned job skips a caption without an image: a ``.txt`` (in a tar, also a ``.json``) whose key
or stem no image shares, or a manifest line naming a file that does not exist."""
EMPTY_CAPTION = "empty_caption"
"""The reason a captioned job skips an image whose caption is empty once surrounding whitespace is stripped."""
CAPTION_TRUNCATED = "caption_truncated"
"""Not a skip: a caption longer than ``--max-caption-tokens`` is cut to that many tokens and written, and counted
under this reason in prepare_report.json's ``changed_by_reason``."""
_CAPTION_FILES = (".txt", ".json")  # sidecar captions, in order of preference


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
        caption: where the image's caption is (captioned jobs only).
    """

    path: Path
    key: str
    offset: int = 0
    size: int = -1
    line: bool = False
    caption: Caption | None = None

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


@dataclass(frozen=True)
class Caption:
    """Where an image's caption is: ``size`` bytes at ``offset`` of ``path`` (``size < 0``: the whole file).

    Attributes:
        path: the file that holds the caption (a ``.txt``, a ``.json``, a tar shard or a manifest).
        name: where to find it, for people (``shard.tar/key.txt``, ``manifest.jsonl:LINE``).
        offset: where the caption's bytes start in the file.
        size: their length, or -1 for the whole file.
        field: the JSON field of those bytes that holds the caption; None: the bytes are the caption.
    """

    path: Path
    name: str
    offset: int = 0
    size: int = -1
    field: str | None = None

    def read(self) -> bytes:
        """The raw bytes (a whole ``.txt``, a JSON object, a manifest line)."""
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class Inputs:
    """Items to read, and files found that the modality does not read (by their path; skipped, with the reason
    :data:`WRONG_EXTENSION`).

    ``rejected``: what a captioned search could not pair (:data:`NO_CAPTION`, :data:`NO_IMAGE`, ``corrupt``),
    each as ``{"source", "reason", "error"}``, the shape of prepare_report.json's ``skipped`` entries.
    """

    items: list[InputItem] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)

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


def _expand(item: str, key: str | None, modality: str, found: Inputs, captioned: bool = False) -> None:
    path = Path(item).expanduser()
    if path.is_dir() and captioned:
        _captioned_directory(path, found)
    elif path.is_dir():
        # Dangling symlinks are kept (and reported unreadable), never silently dropped.
        for p in _files_under(path):
            _add_file(p, p.relative_to(path).as_posix(), modality, found, from_directory=True)
    elif path.is_file() and _is_list_file(path, modality):
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                entry = Path(line.strip()).expanduser()
                target = str(entry if entry.is_absolute() else path.parent / entry)
                _expand(target, line.strip(), modality, found, captioned)
    elif path.is_file() and captioned:
        _captioned_file(path, key or str(path), found, None)
    elif path.is_file():
        _add_file(path, key or str(path), modality, found, from_directory=False)
    elif glob.has_magic(item):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise InputError(f"no file matches {item!r}")
        for match in matches:
            _expand(match, None, modality, found, captioned)
    else:
        raise InputError(f"input not found: {item}")


def _files_under(directory: Path) -> list[Path]:
    """Every file under ``directory``, sorted; dangling symlinks are kept (reported unreadable, never dropped)."""
    return sorted(q for q in directory.rglob("*") if q.is_file() or q.is_symlink())


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


def _tar_members(path: Path) -> list[tarfile.TarInfo]:
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed: members are byte ranges of the file
            return [m for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"{path}: cannot read tar shard ({e})") from e


def _add_tar(path: Path, key: str, modality: str, found: Inputs) -> None:
    for m in _tar_members(path):
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


# ---------------------------------------------------------------------- captioned images


def find_captioned(inputs: Sequence[str | Path]) -> Inputs:
    """Expand inputs into images paired with captions (see the module docstring), in a deterministic order.

    Every item has its :attr:`InputItem.caption`; what cannot be paired is in :attr:`Inputs.rejected`. Directories
    are searched recursively; list files name images, directories, tar shards or manifests; an image named
    explicitly (in a list file or on the command line) has its sidecar looked up beside it.

    Raises:
        InputError: an input does not exist, a glob matches nothing, or no image with a caption is found.
    """
    found = Inputs()
    for item in inputs:
        _expand(str(item), None, "jpeg", found, captioned=True)
    # An image listed with several captions (a manifest's lines) stays once per caption.
    found.items = list({(s.path, s.offset, s.size, s.caption): s for s in found.items}.values())
    if not found.items:
        reasons = Counter(r["reason"] for r in found.rejected) + Counter({WRONG_EXTENSION: len(found.skipped)})
        hint = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common() if n)
        raise InputError(
            f"no images with captions in {list(map(str, inputs))}{f' ({hint})' if hint else ''}: give images with "
            'a .txt or .json sidecar of the same name, webdataset .tar shards, or a .jsonl manifest of {"image": '
            'path, "caption": text} lines'
        )
    return found


def _captioned_directory(root: Path, found: Inputs) -> None:
    """Pair each image under ``root`` with the sidecar of its directory and stem; a lone ``.txt`` has no image."""
    files = _files_under(root)
    images = {(p.parent, p.stem) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    sidecars: dict[tuple[Path, str], dict[str, Path]] = {}
    for p in files:
        if p.suffix.lower() in _CAPTION_FILES:
            sidecars.setdefault((p.parent, p.stem), {}).setdefault(p.suffix.lower(), p)
    for p in files:
        if p.suffix.lower() in _CAPTION_FILES and (p.parent, p.stem) in images:
            continue  # a sidecar: read with its image
        if p.suffix.lower() == ".txt":
            found.rejected.append(_reject(str(p), NO_IMAGE, f"no image named {p.stem}.* beside this caption"))
        else:
            _captioned_file(p, p.relative_to(root).as_posix(), found, sidecars)


def _captioned_file(path: Path, key: str, found: Inputs, sidecars: dict | None) -> None:
    """One file of a captioned search: a tar shard, a manifest or an image; ``sidecars`` is None for a file named
    explicitly (tried whatever its extension, its sidecar looked up on disk)."""
    suffix = path.suffix.lower()
    if suffix == ".tar":
        _captioned_tar(path, key, found)
    elif suffix == ".jsonl":
        _manifest(path, found)
    elif suffix in IMAGE_EXTENSIONS or sidecars is None:
        caption = _sidecar(path, sidecars)
        if caption is None:
            found.rejected.append(_reject(str(path), NO_CAPTION, f"no {path.stem}.txt or {path.stem}.json beside it"))
        else:
            found.items.append(InputItem(path, key, caption=caption))
    else:
        found.skipped.append(path)


def _sidecar(image: Path, sidecars: dict | None) -> Caption | None:
    """The image's ``.txt`` sidecar, else its ``.json`` one (its ``caption`` field), else None."""
    if sidecars is None:
        candidates = {suffix: image.with_suffix(suffix) for suffix in _CAPTION_FILES}
        options = {suffix: p for suffix, p in candidates.items() if p.is_file()}
    else:
        options = sidecars.get((image.parent, image.stem), {})
    for suffix in _CAPTION_FILES:
        if suffix in options:
            return Caption(options[suffix], str(options[suffix]), field="caption" if suffix == ".json" else None)
    return None


def _captioned_tar(path: Path, key: str, found: Inputs) -> None:
    """Pair the members of a webdataset shard by key (the member's name up to the first dot of its base name)."""
    samples: dict[str, list[tarfile.TarInfo]] = {}
    for m in _tar_members(path):
        directory, _, base = m.name.rpartition("/")
        samples.setdefault(f"{directory}/{base.split('.', 1)[0]}", []).append(m)
    for members in samples.values():
        caption = _tar_caption(path, members)
        images = [m for m in members if Path(m.name).suffix.lower() in IMAGE_EXTENSIONS]
        for m in images:
            if caption is None:
                found.rejected.append(_reject(f"{path}/{m.name}", NO_CAPTION, "no .txt or .json member of its key"))
            else:
                found.items.append(InputItem(path, f"{key}/{m.name}", m.offset_data, m.size, caption=caption))
        if caption is not None and not images:
            found.rejected.append(_reject(caption.name, NO_IMAGE, "no image member of its key"))
        known = IMAGE_EXTENSIONS | set(_CAPTION_FILES)
        found.skipped += [path / m.name for m in members if Path(m.name).suffix.lower() not in known]


def _tar_caption(path: Path, members: list[tarfile.TarInfo]) -> Caption | None:
    """The caption among one key's members: its ``.txt``, else its ``.json`` (the ``caption`` field), else None."""
    for suffix in _CAPTION_FILES:
        for m in members:
            if Path(m.name).suffix.lower() == suffix:
                field = "caption" if suffix == ".json" else None
                return Caption(path, f"{path}/{m.name}", m.offset_data, m.size, field)
    return None


def _manifest(path: Path, found: Inputs) -> None:
    """The lines of a ``.jsonl`` manifest, ``{"image": path, "caption": text}`` each."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                _manifest_line(path, number, offset, line, found)
            offset += len(line)


def _manifest_line(path: Path, number: int, offset: int, line: bytes, found: Inputs) -> None:
    where = f"{path}:{number}"
    try:
        entry = json.loads(line)
        image = entry["image"]
        if not isinstance(image, str) or not image.strip():
            raise ValueError("its image is not a path")
    except (ValueError, KeyError, TypeError) as e:
        found.rejected.append(_reject(where, "corrupt", f'not a JSON object with an "image" path ({e})'))
        return
    file = Path(image.strip()).expanduser()
    file = file if file.is_absolute() else path.parent / file
    if entry.get("caption") is None:
        found.rejected.append(_reject(where, NO_CAPTION, f'no "caption" for {file}'))
    elif not file.exists() and not file.is_symlink():  # a dangling symlink is tried, and reported unreadable
        found.rejected.append(_reject(where, NO_IMAGE, f"{file} does not exist"))
    else:  # the key: the image's path as the manifest writes it (all captions of an image in one split)
        found.items.append(InputItem(file, image.strip(), caption=Caption(path, where, offset, len(line), "caption")))


def _reject(source: str, reason: str, error: str) -> dict[str, str]:
    return {"source": source, "reason": reason, "error": error}


def read_caption(caption: Caption | None) -> tuple[bytes | None, str | None, str | None]:
    """A caption's UTF-8 text stripped of surrounding whitespace: ``(bytes, None, None)``, or ``(None, reason,
    error)`` when it cannot be read: ``unreadable``, ``not_utf8``, :data:`NO_CAPTION` (a JSON without a string
    ``caption`` field), :data:`EMPTY_CAPTION`."""
    if caption is None:
        return None, NO_CAPTION, "no caption"
    try:
        text = caption.read().decode("utf-8-sig")
    except OSError as e:
        return None, "unreadable", f"caption {caption.name}: {type(e).__name__}: {e}"
    except UnicodeDecodeError as e:
        return None, "not_utf8", f"caption {caption.name}: {e}"
    if caption.field is not None:
        try:
            text = json.loads(text)[caption.field]
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return None, NO_CAPTION, f"{caption.name}: not a JSON object with a {caption.field!r} field ({e})"
        if not isinstance(text, str):
            return None, NO_CAPTION, f"{caption.name}: its {caption.field!r} is not a string"
    text = text.strip()
    if not text:
        return None, EMPTY_CAPTION, f"caption {caption.name} is empty"
    try:
        return text.encode("utf-8"), None, None
    except UnicodeEncodeError as e:  # a lone surrogate from a JSON escape
        return None, "not_utf8", f"caption {caption.name}: {e}"


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
