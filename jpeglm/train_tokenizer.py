"""``jpeglm tokenizer train``: train a codec-byte BPE tokenizer on a user's files."""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jpeglm.codecs import AvcCodec, JpegCodec
from jpeglm.inputs import encode_inputs, find_inputs
from jpeglm.tokenizer import DEFAULT_VOCAB_SIZE, MODALITIES, CodecTokenizer

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
    modality: str,
    inputs: list[str],
    output: str | Path,
    vocab_size: int | None = None,
    max_items: int = 10_000,
    num_workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
    codec_options: dict[str, Any] | None = None,
) -> tuple[CodecTokenizer, TrainReport]:
    """Encode up to ``max_items`` inputs with the modality's codec, train BPE on them, save it.

    ``codec_options`` are the codec's constructor arguments (default: the paper's settings), e.g.
    ``{"size": 64}`` for small JPEGs; the codec's spec is saved with the tokenizer, and ``jpeglm prepare``
    encodes with exactly that codec. Inputs that cannot be encoded are skipped and counted by reason.
    """
    start = time.perf_counter()
    report = TrainReport()
    found = find_inputs(inputs, modality)
    items, report.ignored = found.items, len(found.ignored)
    if len(items) > max_items:  # a deterministic sample, like the paper's 10K images / 10K videos
        chosen = set(random.Random(seed).sample(range(len(items)), max_items))
        items = [s for i, s in enumerate(items) if i in chosen]
    if modality == "text" and codec_options:
        raise ValueError("text has no codec: codec options do not apply")
    codec = CODEC_FOR_MODALITY[modality](**(codec_options or {})) if modality != "text" else None
    streams = _read_streams(codec, items, modality, num_workers or os.cpu_count() or 1, report, progress)
    if not streams:
        raise ValueError(f"none of the {len(items)} inputs could be read; nothing to train on")
    tokenizer = CodecTokenizer.train(
        streams, modality, vocab_size, codec.spec if codec else None, show_progress=progress
    )
    report.total_tokens = sum(len(ids) for ids in tokenizer.encode_batch(streams))
    output = tokenizer.save(output)
    report.seconds = time.perf_counter() - start
    return tokenizer, report


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    about = "train a byte-level BPE on codec streams of your files"
    train = commands.add_parser("train", help=about, description=about)
    train.add_argument(
        "--modality",
        required=True,
        choices=sorted(MODALITIES),
        help="what the inputs are: images (jpeg), videos (avc) or text.",
    )
    train.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="DIR_OR_GLOB",
        help="directories (recursive), globs, files, or list files (.lst/.list; .txt for media) of inputs.",
    )
    train.add_argument("--output", required=True, help="directory to write the tokenizer to.")
    train.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="BPE symbols including the 256 bytes (default: "
        + ", ".join(f"{n} for {m}" for m, n in DEFAULT_VOCAB_SIZE.items())
        + ").",
    )
    train.add_argument("--max-items", type=int, default=10_000, help="train on at most this many items (paper: 10K).")
    train.add_argument(
        "--num-workers", type=int, default=None, help="processes that encode media (default: all cores)."
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the sample taken when there are more inputs.")
    add_codec_argument(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bars.")


def add_codec_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--codec",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_codec_option,
        help="a codec setting other than the paper's, repeatable: e.g. --codec size=64 (JpegCodec), "
        "--codec fps=2 (AvcCodec).",
    )


def _codec_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a plain string such as subsampling=4:4:4


def run(args: argparse.Namespace) -> int:
    tokenizer, report = train_tokenizer(
        args.modality,
        args.input,
        args.output,
        args.vocab_size,
        args.max_items,
        args.num_workers,
        args.seed,
        progress=not args.no_progress,
        codec_options=dict(args.codec),
    )
    print(report.summary(tokenizer, Path(args.output)))
    for line in report.skipped_paths[:20]:
        print(f"  skipped {line}")
    return 0
