"""``jpeglm tokenizer train``: train a codec-byte BPE tokenizer on a user's files."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from jpeglm.codecs import AvcCodec, Codec, JpegCodec
from jpeglm.errors import UserError
from jpeglm.inputs import WRONG_EXTENSION, WRONG_EXTENSION_ERROR, Inputs, encode_inputs, find_inputs
from jpeglm.tokenizer import DEFAULT_VOCAB_SIZE, CodecTokenizer

ModalityName = Literal["jpeg", "avc", "text"]
"""The modalities a command reads (the keys of :data:`jpeglm.tokenizer.MODALITIES`)."""
CODEC_FOR_MODALITY = {"jpeg": JpegCodec, "avc": AvcCodec}
"""Codec class that makes each media modality's streams (text has none: its stream is UTF-8)."""


SHORT_VOCABULARY = (
    "BPE stops when no pair of adjacent symbols occurs at least twice in the training streams (merges never cross a "
    "JPEG restart marker, an H.264 start code or a word boundary); more, or more varied, training data gives more"
)
"""Why a tokenizer can have fewer BPE symbols than asked (see :attr:`TrainReport.short_vocabulary`)."""


@dataclass
class TrainReport:
    """What a tokenizer training run read and produced."""

    items: int = 0  # streams the tokenizer was trained on
    skipped: Counter = field(default_factory=Counter)  # inputs not used, by reason (WRONG_EXTENSION: not media)
    skipped_paths: list[str] = field(default_factory=list)
    total_bytes: int = 0
    total_tokens: int = 0
    seconds: float = 0.0
    output: str = ""  # where the tokenizer was saved
    vocab_size_asked: int = 0  # BPE symbols asked for (the modality's default when none was given)
    vocab_size: int = 0  # BPE symbols learned: fewer than asked when the data runs out of repeated pairs

    @property
    def ignored(self) -> int:
        """Files of other types (the old name of ``skipped[WRONG_EXTENSION]``)."""
        return self.skipped[WRONG_EXTENSION]

    @property
    def short_vocabulary(self) -> str | None:
        """Why the tokenizer has fewer BPE symbols than asked (a sentence), or None when it has them all."""
        if self.vocab_size >= self.vocab_size_asked:
            return None
        return (
            f"asked for {self.vocab_size_asked} BPE symbols, learned {self.vocab_size} from {self.items} streams "
            f"({self.total_bytes} bytes): {SHORT_VOCABULARY}"
        )

    def summary(self, tokenizer: CodecTokenizer, output: Path) -> str:
        n = max(self.items, 1)
        lines = [
            f"trained {tokenizer.modality} tokenizer: {tokenizer.vocab_size} BPE symbols ({tokenizer.num_ids} ids)",
            f"streams read: {self.items}, skipped: {sum(self.skipped.values())}"
            + "".join(f"\n  {reason}: {count}" for reason, count in self.skipped.most_common()),
            f"mean bytes per item: {self.total_bytes / n:.1f}, mean tokens per item: {self.total_tokens / n:.1f} "
            f"({self.total_tokens / max(self.total_bytes, 1):.3f} tokens per byte)",
            f"saved to {output} in {self.seconds:.1f} s",
        ]
        if self.short_vocabulary:
            lines.insert(1, f"warning: {self.short_vocabulary}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON data (``prepare_report.json`` holds it under ``"tokenizer"``)."""
        return {
            "trained_on_items": self.items,
            "trained_on_bytes": self.total_bytes,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped.most_common()),
            "vocab_size_asked": self.vocab_size_asked,
            "vocab_size": self.vocab_size,
            "short_vocabulary": self.short_vocabulary,
        }


def train_tokenizer(
    modality: ModalityName,
    inputs: list[str],
    output: str | Path,
    vocab_size: int | None = None,
    max_items: int = 10_000,
    num_workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
    codec_options: dict | None = None,
) -> tuple[CodecTokenizer, TrainReport]:
    """Encode up to ``max_items`` inputs with the modality's codec, train BPE on them, save it.

    The codec's spec is saved with the tokenizer, and ``jpeglm prepare`` encodes with exactly that codec.
    Inputs that cannot be encoded, and files of other types, are skipped and counted by reason.

    Args:
        modality: what the inputs are: images (jpeg), videos (avc) or text.
        inputs: directories (recursive), globs, files, or list files (.lst/.list; .txt for media) of inputs;
            for text: .txt files and .jsonl files (a "text" field per line).
        output: the directory to write the tokenizer to.
        vocab_size: BPE symbols including the 256 bytes (none: 320 for jpeg, 1024 for avc, 32000 for text);
            fewer are learned, with a warning, when the data has too few repeated byte pairs.
        max_items: train on at most this many inputs, a seeded sample of them (the paper: 10K).
        num_workers: processes that encode media (none: all cores).
        seed: seed of the sample taken when there are more inputs than max_items.
        progress: show progress bars.
        codec_options: codec settings other than the paper's, e.g. {"size": 64} for small JPEGs
            (`--codec size=64`, repeatable; JpegCodec's or AvcCodec's arguments).

    Raises:
        UserError: missing inputs, nothing readable, or codec options the codec refuses.
    """
    codec = make_codec(modality, codec_options)  # before the inputs are read: a typo fails at once
    found = find_inputs(inputs, modality)
    return train_on_inputs(modality, found, output, codec, vocab_size, max_items, num_workers, seed, progress)


def train_on_inputs(
    modality: str,
    found: Inputs,
    output: str | Path,
    codec: Codec | None,
    vocab_size: int | None = None,
    max_items: int = 10_000,
    num_workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[CodecTokenizer, TrainReport]:
    """:func:`train_tokenizer` on inputs already found (``jpeglm prepare`` gives its training split only).

    Raises:
        UserError: nothing readable.
    """
    start = time.perf_counter()
    report = TrainReport(output=str(output))
    items = found.items
    report.skipped[WRONG_EXTENSION] += len(found.skipped)
    report.skipped_paths += [f"{p}: {WRONG_EXTENSION_ERROR}" for p in found.skipped]
    if len(items) > max_items:  # a deterministic sample, like the paper's 10K images / 10K videos
        chosen = set(random.Random(seed).sample(range(len(items)), max_items))
        items = [s for i, s in enumerate(items) if i in chosen]
    streams = _read_streams(codec, items, modality, num_workers or os.cpu_count() or 1, report, progress)
    if not streams:
        raise UserError(f"none of the {len(items)} inputs could be read; nothing to train on")
    tokenizer = CodecTokenizer.train(
        streams, modality, vocab_size, codec.spec if codec else None, show_progress=progress
    )
    report.vocab_size_asked = DEFAULT_VOCAB_SIZE[modality] if vocab_size is None else vocab_size
    report.vocab_size = tokenizer.vocab_size
    report.total_tokens = sum(len(ids) for ids in tokenizer.encode_batch(streams))
    tokenizer.save(output)
    report.seconds = time.perf_counter() - start
    return tokenizer, report


def make_codec(modality: str, codec_options: dict[str, Any] | None) -> Codec | None:
    """The modality's codec with these settings (None for text, which has no codec).

    Raises:
        UserError: options for text, or options the codec class refuses (an unknown name, a bad value).
    """
    if modality == "text":
        if codec_options:
            raise UserError("text has no codec: codec options do not apply")
        return None
    cls = CODEC_FOR_MODALITY.get(modality)
    if cls is None:
        raise UserError(f"unknown modality {modality!r}; choose one of {['text', *CODEC_FOR_MODALITY]}")
    try:
        return cls(**(codec_options or {}))
    except (TypeError, ValueError) as e:
        raise UserError(f"codec options {codec_options} are not valid for {cls.__name__}: {e}") from e


def _read_streams(codec, items, modality, num_workers, report, progress) -> list[bytes]:
    streams: list[bytes] = []
    results = encode_inputs(codec, items, num_workers if codec is not None else 1)
    bar = tqdm(results, total=len(items), desc=f"reading {modality}", unit="item", disable=not progress)
    for result in bar:
        if result.stream is None:
            report.skipped[result.reason] += 1
            report.skipped_paths.append(f"{result.item.name}: {result.error}")
        else:
            streams.append(result.stream)
            report.items += 1
            report.total_bytes += len(result.stream)
        bar.set_postfix(skipped=sum(report.skipped.values()), refresh=False)
    return streams


def summary(result: tuple[CodecTokenizer, TrainReport]) -> str:
    """What `jpeglm tokenizer train` prints at the end: the tokenizer, what was read, the first inputs skipped."""
    tokenizer, report = result
    skipped = [f"  skipped {line}" for line in report.skipped_paths[:20]]
    return "\n".join([report.summary(tokenizer, Path(report.output)), *skipped])
