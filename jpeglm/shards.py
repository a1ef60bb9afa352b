"""The prepared-dataset format: what ``jpeglm prepare`` writes and training reads (the reader only).

A prepared directory describes itself::

    OUT/dataset.json          written last: a directory without it is never read as a dataset
    OUT/train/, OUT/val/      litdata shards (index.json + chunk-*.bin) in ``TokensLoader`` layout,
                              uint16 ids when the vocabulary fits (else int32)
    OUT/tokenizer/            the tokenizer (tokenizer.json, id_layout.json, codec_spec.json)
    OUT/caption_tokenizer/    captioned images only: the text tokenizer of the captions
    OUT/codec_spec.json       the codec's settings and checksums
    OUT/prepare_report.json   items seen / written / skipped by reason (with paths), token statistics, timing

Every sample is ``bos, modality tag, tokens..., eos`` (jpeglm/tokenizer.py). A dataset of captioned images
(``jpeglm prepare --captions``) holds ``bos, 5 (text), caption ids..., 3 (image), JPEG ids..., eos`` in one id
space: the JPEG tokenizer's ids as they are, the caption tokenizer's BPE ids (>= 8) moved up by
``captions["offset"] = tokenizer.num_ids - 8`` (specials stay), so ``num_ids = tokenizer.num_ids +
caption_tokenizer.num_ids - 8``; ``dataset.json``'s ``captions`` says so (absent for other datasets). The writer is
jpeglm/prepare.py; data modules and sampling import only this module, the way litdata keeps
``streaming/`` apart from ``processing/``. docs/architecture.md describes the format in full.

A dataset in object storage (``read_dataset("s3://bucket/prefix")``) is read the same way: its small files
(``dataset.json``, the tokenizers, ``codec_spec.json``, ``prepare_report.json``, each split's ``index.json``) are
fetched once into a local cache (:func:`jpeglm.storage.cache_root` ``/remote/<url>/<dataset.json version>``),
together with a note of each split's objects (``<split>/.objects.json``, so :func:`check_blocks` can tell a
missing chunk without a download); :meth:`PreparedDataset.stream_source` then points litdata at the URL, and litdata
downloads the chunks into its own cache as it streams them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jpeglm.errors import UserError
from jpeglm.storage import (
    S3Options,
    cache_root,
    fetch_dir,
    is_remote,
    litdata_storage_options,
    open_store,
    url_key,
)
from jpeglm.tokenizer import CodecTokenizer

FORMAT = 1
"""Version of the layout above; :func:`read_dataset` refuses any other."""
SPLITS = ("train", "val")
WORK_DIR = ".prepare"
"""Where an unfinished ``jpeglm prepare`` keeps its state and finished parts."""
METADATA = ("dataset.json", "codec_spec.json", "prepare_report.json", "tokenizer/", "caption_tokenizer/")
"""The files (and, ending in ``/``, directories) of a remote dataset fetched into the local cache (plus each
split's ``index.json``)."""
OBJECTS_NOTE = ".objects.json"
"""In a remote dataset's cached split directory: ``{"url": split URL, "objects": [names]}``, what the split held."""


@dataclass(frozen=True)
class PreparedDataset:
    """A complete prepared directory, as ``dataset.json`` describes it.

    Attributes:
        path: the directory (for a dataset in object storage: the local cache of its small files).
        modality: "jpeg", "avc" or "text".
        num_ids: ids of its tokenizer (the model's vocabulary size for this data alone).
        dtype: numpy dtype of the stored token ids.
        splits: ``{"train": {"items": n, "tokens": n}, "val": {...}}``.
        captions: for captioned images, ``{"modality": "text", "offset": o, "num_ids": n, "max_tokens": m}``:
            the caption tokenizer's BPE ids are stored plus ``o`` (its own ``num_ids`` is ``n``; captions were
            cut to ``m`` tokens); None for other datasets.
        url: the ``s3://`` URL of a dataset in object storage; None for a local directory.
        storage: how to reach ``url`` (None: the AWS environment variables).
    """

    path: Path
    modality: str
    num_ids: int
    dtype: str
    splits: dict[str, dict[str, int]]
    captions: dict[str, Any] | None = None
    url: str | None = None
    storage: S3Options | None = None

    @property
    def location(self) -> str:
        """Where the dataset is, for people: its URL, or its directory."""
        return self.url or str(self.path)

    @property
    def tokenizer(self) -> CodecTokenizer:
        """The tokenizer of the modality's streams (for captioned images: the JPEG one, its ids unshifted)."""
        return CodecTokenizer.load(self.path / "tokenizer")

    @property
    def caption_tokenizer(self) -> CodecTokenizer | None:
        """The text tokenizer of the captions (its ids unshifted: subtract ``captions["offset"]`` from BPE ids),
        or None for a dataset without captions."""
        return CodecTokenizer.load(self.path / "caption_tokenizer") if self.captions else None

    @property
    def codec(self) -> Any:
        """The codec the data was made with, checked against this installation (None for text)."""
        return self.tokenizer.codec

    def split_dir(self, split: str) -> Path | None:
        """The litdata directory of a split, or None when the split is empty."""
        return self.path / split if self.splits.get(split, {}).get("items") else None

    def stream_source(self, split: str) -> dict[str, Any]:
        """Where litdata streams a split from, as ``StreamingDataset`` keyword arguments.

        ``input_dir``: the split's directory, or its URL; for a dataset in object storage also ``cache_dir`` (where
        litdata keeps the chunks it downloads, one per version of ``dataset.json``) and ``storage_options``
        (endpoint and credentials, from :func:`jpeglm.storage.litdata_storage_options`).
        """
        if self.url is None:
            return {"input_dir": str(self.path / split)}
        return {
            "input_dir": f"{self.url}/{split}",
            # Beside this version's small files (the directory is named by dataset.json's hash): chunks of a
            # dataset re-prepared under the same URL, same names and new content, are never mixed with these.
            "cache_dir": str(self.path.parent / f"{self.path.name}-litdata"),
            "storage_options": litdata_storage_options(self.storage),
        }

    def samples(self, split: str = "val") -> Iterator[np.ndarray]:
        """Each sample of a split (bos, tag, tokens, eos) in the order written, read straight from the chunks.

        Training streams fixed-length blocks that cut across samples; this reads whole samples, e.g. to
        get the original images of validation items back for prompts and FID.
        """
        directory = self.split_dir(split)
        if directory is None:
            return
        store = open_store(self.url, self.storage) if self.url else None
        for chunk in json.loads((directory / "index.json").read_text())["chunks"]:
            local = directory / chunk["filename"]
            if store is not None and not local.is_file():
                store.get_file(f"{split}/{chunk['filename']}", local)
            yield from read_chunk(local, self.dtype)


def read_dataset(path: str | Path, storage: S3Options | None = None) -> PreparedDataset:
    """Open a prepared directory, or a prepared dataset in object storage (``s3://bucket/prefix``).

    Args:
        path: the directory, or the URL (its small files are fetched into a local cache; see the module docstring).
        storage: how to reach an ``s3://`` URL (None: the AWS environment variables).

    Raises:
        UserError: the directory (or URL) does not exist, is not a complete prepared dataset (for example a
            ``jpeglm prepare`` that was killed and not re-run), or the storage cannot be read (one line naming the
            URL: access denied, no such bucket, an endpoint that does not answer).
    """
    if is_remote(path):
        return _read_remote(str(path).rstrip("/"), storage)
    path = Path(path).expanduser()
    meta = path / "dataset.json"
    if not path.is_dir():
        raise UserError(
            f"{path} is not a complete prepared dataset: the directory does not exist; make it with "
            f"`jpeglm prepare --modality M --input FILES --output {path}`"
        )
    if not meta.is_file():
        state = _unfinished((path / WORK_DIR).exists())
        raise UserError(f"{path} is not a complete prepared dataset: no dataset.json{state}")
    return _dataset(path, meta.read_bytes(), str(path))


def _unfinished(unfinished: bool) -> str:
    if unfinished:
        return " (an unfinished `jpeglm prepare`: run it again to finish)"
    return "; give a directory written by `jpeglm prepare`"


def _dataset(path: Path, meta: bytes, where: str, **remote: Any) -> PreparedDataset:
    info = json.loads(meta)
    if info.get("format") != FORMAT:
        raise UserError(f"{where}: dataset format {info.get('format')!r}, this jpeglm reads format {FORMAT}")
    return PreparedDataset(
        path, info["modality"], info["num_ids"], info["dtype"], info["splits"], info.get("captions"), **remote
    )


def _read_remote(url: str, storage: S3Options | None) -> PreparedDataset:
    """A dataset in object storage, its small files fetched into the local cache once per version of dataset.json."""
    store = open_store(url, storage)
    try:
        meta = store.read_bytes("dataset.json")
    except FileNotFoundError:
        raise UserError(
            f"{url} is not a complete prepared dataset: no dataset.json{_unfinished(store.exists(WORK_DIR))}"
        ) from None
    dataset = _dataset(Path(), meta, url, url=url, storage=storage)  # checks the format before any download
    target = cache_root() / "remote" / url_key(url) / hashlib.sha256(meta).hexdigest()[:16]
    if not target.is_dir():
        objects = store.list()
        keys = [k for k in objects if k in METADATA or k.startswith(tuple(m for m in METADATA if m.endswith("/")))]
        notes = {}
        for split in SPLITS:
            if dataset.splits.get(split, {}).get("items"):
                names = [k.removeprefix(f"{split}/") for k in objects if k.startswith(f"{split}/")]
                keys += [f"{split}/index.json"] if "index.json" in names else []
                notes[f"{split}/{OBJECTS_NOTE}"] = json.dumps({"url": f"{url}/{split}", "objects": names}).encode()
        fetch_dir(store, keys, target, extra=notes)
    return _dataset(target, meta, url, url=url, storage=storage)


def read_chunk(path: Path, dtype: str) -> Iterator[np.ndarray]:
    """Each item of one litdata chunk file, as ids of ``dtype``, in the order written.

    litdata's chunk layout: uint32 item count N, uint32 offsets[N + 1] (from the file start), item bytes.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    count = int(raw[:4].view(np.uint32)[0])
    offsets = raw[4 : 4 * (count + 2)].view(np.uint32)
    for begin, end in zip(offsets[:-1], offsets[1:], strict=True):
        yield raw[begin:end].view(dtype)


def count_blocks(split_dir: Path, block_size: int) -> int:
    """Blocks of ``block_size`` ids in a split: litdata cuts blocks inside chunks, the rest of a chunk is dropped."""
    index = json.loads((split_dir / "index.json").read_text())
    return sum(chunk["dim"] // block_size for chunk in index["chunks"])


def check_blocks(split_dir: Path, seq_len: int) -> int:
    """The number of blocks of ``seq_len + 1`` ids, or a clear error when there are none or shards are missing.

    For a dataset in object storage, ``split_dir`` is the split's local cache: its :data:`OBJECTS_NOTE` says which
    chunks the storage holds, and errors name the split's URL.
    """
    note = split_dir / OBJECTS_NOTE
    remote = json.loads(note.read_text()) if note.is_file() else None
    where = remote["url"] if remote else str(split_dir)
    index = split_dir / "index.json"
    chunks = json.loads(index.read_text())["chunks"] if index.is_file() else None

    def present(name: str) -> bool:
        return name in remote["objects"] if remote else (split_dir / name).is_file()

    missing = [chunk["filename"] for chunk in chunks or [] if not present(chunk["filename"])]
    if chunks is None or missing:
        more = ", ..." if len(missing) > 1 else ""
        what = f"{len(missing)} of its {len(chunks)} chunk files ({missing[0]}{more})" if missing else "index.json"
        raise UserError(
            f"{where} lacks {what}: copy the whole directory `jpeglm prepare` wrote, or prepare the data again"
        )
    blocks = count_blocks(split_dir, seq_len + 1)
    if blocks == 0:
        largest = max((chunk["dim"] for chunk in chunks), default=0)
        raise UserError(
            f"seq_len={seq_len} is too large for {where}: a block of seq_len + 1 = {seq_len + 1} ids must fit "
            f"in one shard chunk, and the largest chunk holds {largest} ids"
        )
    return blocks
