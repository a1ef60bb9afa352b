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
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jpeglm.errors import UserError
from jpeglm.tokenizer import CodecTokenizer

FORMAT = 1
"""Version of the layout above; :func:`read_dataset` refuses any other."""
SPLITS = ("train", "val")
WORK_DIR = ".prepare"
"""Where an unfinished ``jpeglm prepare`` keeps its state and finished parts."""


@dataclass(frozen=True)
class PreparedDataset:
    """A complete prepared directory, as ``dataset.json`` describes it.

    Attributes:
        path: the directory.
        modality: "jpeg", "avc" or "text".
        num_ids: ids of its tokenizer (the model's vocabulary size for this data alone).
        dtype: numpy dtype of the stored token ids.
        splits: ``{"train": {"items": n, "tokens": n}, "val": {...}}``.
        captions: for captioned images, ``{"modality": "text", "offset": o, "num_ids": n, "max_tokens": m}``:
            the caption tokenizer's BPE ids are stored plus ``o`` (its own ``num_ids`` is ``n``; captions were
            cut to ``m`` tokens); None for other datasets.
    """

    path: Path
    modality: str
    num_ids: int
    dtype: str
    splits: dict[str, dict[str, int]]
    captions: dict[str, Any] | None = None

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

    def samples(self, split: str = "val") -> Iterator[np.ndarray]:
        """Each sample of a split (bos, tag, tokens, eos) in the order written, read straight from the chunks.

        Training streams fixed-length blocks that cut across samples; this reads whole samples, e.g. to
        get the original images of validation items back for prompts and FID.
        """
        directory = self.split_dir(split)
        if directory is None:
            return
        for chunk in json.loads((directory / "index.json").read_text())["chunks"]:
            yield from read_chunk(directory / chunk["filename"], self.dtype)


def read_dataset(path: str | Path) -> PreparedDataset:
    """Open a prepared directory.

    Raises:
        UserError: the directory does not exist, or is not a complete prepared dataset (for example a
            ``jpeglm prepare`` that was killed and not re-run).
    """
    path = Path(path)
    meta = path / "dataset.json"
    if not path.is_dir():
        raise UserError(
            f"{path} is not a complete prepared dataset: the directory does not exist; make it with "
            f"`jpeglm prepare --modality M --input FILES --output {path}`"
        )
    if not meta.is_file():
        if (path / WORK_DIR).exists():
            state = " (an unfinished `jpeglm prepare`: run it again to finish)"
        else:
            state = "; give a directory written by `jpeglm prepare`"
        raise UserError(f"{path} is not a complete prepared dataset: no dataset.json{state}")
    info = json.loads(meta.read_text())
    if info.get("format") != FORMAT:
        raise UserError(f"{path}: dataset format {info.get('format')!r}, this jpeglm reads format {FORMAT}")
    return PreparedDataset(path, info["modality"], info["num_ids"], info["dtype"], info["splits"], info.get("captions"))


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
    """The number of blocks of ``seq_len + 1`` ids, or a clear error when there are none or shards are missing."""
    index = split_dir / "index.json"
    chunks = json.loads(index.read_text())["chunks"] if index.is_file() else None
    missing = [chunk["filename"] for chunk in chunks or [] if not (split_dir / chunk["filename"]).is_file()]
    if chunks is None or missing:
        more = ", ..." if len(missing) > 1 else ""
        what = f"{len(missing)} of its {len(chunks)} chunk files ({missing[0]}{more})" if missing else "index.json"
        raise UserError(
            f"{split_dir} lacks {what}: copy the whole directory `jpeglm prepare` wrote, or prepare the data again"
        )
    blocks = count_blocks(split_dir, seq_len + 1)
    if blocks == 0:
        largest = max((chunk["dim"] for chunk in chunks), default=0)
        raise UserError(
            f"seq_len={seq_len} is too large for {split_dir}: a block of seq_len + 1 = {seq_len + 1} ids must fit "
            f"in one shard chunk, and the largest chunk holds {largest} ids"
        )
    return blocks
