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
from jpeglm.inputs import encode_inputs, find_inputs
from jpeglm.tokenizer import CodecTokenizer

ModalityName = Literal["jpeg", "avc", "text"]
"""The modalities a command reads (the keys of :data:`jpeglm.tokenizer.MODALITIES`)."""
CODEC_FOR_MODALITY = {"jpeg": JpegCodec, "avc": AvcCodec}
"""Codec class that makes each media modality's streams (text has none: its stream is UTF-8)."""


@dataclass
class TrainReport:
    """What a tokenizer training run read and produced."""

    items: int = 0
    ignored: int = 0  # files in input directories with extensions this modality does not read
    skipped: Counter = field(default_factory=Counter)
    skipped_paths: list[str] = field(default_factory=list)
    total_bytes: int = 0
    total_tokens: int = 0
    seconds: float = 0.0
    output: str = ""  # where the tokenizer was saved

    def summary(self, tokenizer: CodecTokenizer, output: Path) -> str:
        n = max(self.items, 1)
        lines = [
            f"trained {tokenizer.modality} tokenizer: {tokenizer.vocab_size} BPE symbols ({tokenizer.num_ids} ids)",
            f"streams read: {self.items}, skipped: {sum(self.skipped.values())}, "
            f"ignored (other file types): {self.ignored}"
            + "".join(f"\n  {reason}: {count}" for reason, count in self.skipped.most_common()),
            f"mean bytes per item: {self.total_bytes / n:.1f}, mean tokens per item: {self.total_tokens / n:.1f} "
            f"({self.total_tokens / max(self.total_bytes, 1):.3f} tokens per byte)",
            f"saved to {output} in {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


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
    Inputs that cannot be encoded are skipped and counted by reason.

    Args:
        modality: what the inputs are: images (jpeg), videos (avc) or text.
        inputs: directories (recursive), globs, files, or list files (.lst/.list; .txt for media) of inputs;
            for text: .txt files and .jsonl files (a "text" field per line).
        output: the directory to write the tokenizer to.
        vocab_size: BPE symbols including the 256 bytes (none: 320 for jpeg, 1024 for avc, 32000 for text).
        max_items: train on at most this many inputs, a seeded sample of them (the paper: 10K).
        num_workers: processes that encode media (none: all cores).
        seed: seed of the sample taken when there are more inputs than max_items.
        progress: show progress bars.
        codec_options: codec settings other than the paper's, e.g. {"size": 64} for small JPEGs
            (`--codec size=64`, repeatable; JpegCodec's or AvcCodec's arguments).

    Raises:
        UserError: missing inputs, nothing readable, or codec options the codec refuses.
    """
    start = time.perf_counter()
    report = TrainReport(output=str(output))
    codec = make_codec(modality, codec_options)  # before the inputs are read: a typo fails at once
    found = find_inputs(inputs, modality)
    items, report.ignored = found.items, len(found.ignored)
    if len(items) > max_items:  # a deterministic sample, like the paper's 10K images / 10K videos
        chosen = set(random.Random(seed).sample(range(len(items)), max_items))
        items = [s for i, s in enumerate(items) if i in chosen]
    streams = _read_streams(codec, items, modality, num_workers or os.cpu_count() or 1, report, progress)
    if not streams:
        raise UserError(f"none of the {len(items)} inputs could be read; nothing to train on")
    tokenizer = CodecTokenizer.train(
        streams, modality, vocab_size, codec.spec if codec else None, show_progress=progress
    )
    report.total_tokens = sum(len(ids) for ids in tokenizer.encode_batch(streams))
    output = tokenizer.save(output)
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
