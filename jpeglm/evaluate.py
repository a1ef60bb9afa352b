"""``jpeglm evaluate``: the paper's protocol (Tables 1-3) on a folder of images.

For every prompt ratio r, top-k and top-p, and each of ``--seeds`` seeds: every image is encoded with
the checkpoint's codec, cut after its k-th FFD7 marker (k = int(32 r)), completed by the model, decoded
(undecodable completions enter as decoded, grey where they broke) and compared with the originals by
FID. Unconditional FID compares as many unconditional samples with the same originals. The originals
are the images as the codec prepares them (center crop, resize), before JPEG compression.

Written to ``--output``: ``results.json`` and ``results.md`` (one row per setting: FID mean and std over
seeds, share of complete streams, tokens/s).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from jpeglm.callbacks.fid import fid_metric, to_batch
from jpeglm.callbacks.samples import cut
from jpeglm.checkpoints import load_model
from jpeglm.generation import generate_source, make_prompt, sequence_bytes
from jpeglm.inputs import find_inputs
from jpeglm.sample import pick_source


@dataclass
class Row:
    """One setting's result over seeds."""

    ratio: float | None  # None: unconditional
    top_k: int | None
    top_p: float
    fid_mean: float
    fid_std: float
    complete_share: float
    tokens_per_s: float
    seeds: int
    images: int


def evaluate(
    checkpoint: str,
    images: list[str],
    output: str,
    ratios: list[float] = (0.25, 0.5, 0.75),
    seeds: int = 3,
    top_ks: list[int | None] = (40, 80),
    top_ps: list[float] = (0.9, 1.0),
    num_images: int | None = None,
    unconditional: bool = True,
    feature_extractor: str = "inception",
    inception_weights: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    max_new_tokens: int | None = None,
) -> list[Row]:
    """Run the protocol and write the tables (see the module docstring)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    metric = fid_metric(feature_extractor, inception_weights)  # a missing weights file fails before any work
    model, sources = load_model(checkpoint, device)
    source = pick_source(sources, "jpeg")
    codec, tok = source.codec, source.tokenizer
    streams, reals = _originals(codec, images, num_images)
    metric.update(to_batch(reals), real=True)
    settings = [(r, k, p) for r in ratios for k, p in product(top_ks, top_ps)]
    if unconditional:
        settings += [(None, k, p) for k, p in product(top_ks, top_ps)]
    longest = max(len(tok.encode(s)) for s in streams)
    max_new = max_new_tokens or int(1.5 * longest) + 2  # enough to finish any image, bounded by the context below
    bar = tqdm(total=len(settings) * seeds * len(streams), desc="evaluate", unit="sample", disable=not progress)
    rows = []
    for ratio, top_k, top_p in settings:
        fids, complete, rates = [], [], []
        for seed in range(seeds):
            prompts = [make_prompt(tok, cut(codec, s, ratio) if ratio else b"", source.offset) for s in streams]
            began, produced, fakes, done = time.perf_counter(), 0, [], []
            for i in range(0, len(prompts), batch_size):
                outputs = generate_source(
                    model,
                    source,
                    prompts[i : i + batch_size],
                    max_new,
                    top_k=top_k,
                    top_p=top_p,
                    seed=seed * 100_003 + i,
                )
                for prompt, ids in zip(prompts[i : i + batch_size], outputs, strict=True):
                    decoded = codec.decode(sequence_bytes(ids, tok, source.offset, codec))
                    fakes.append(np.asarray(decoded.image))
                    done.append(decoded.complete)
                    produced += len(ids) - len(prompt)
                bar.update(len(outputs))
            metric.reset()  # keeps the real statistics (reset_real_features=False)
            metric.update(to_batch(fakes), real=False)
            fids.append(float(metric.compute()))
            complete.append(float(np.mean(done)))
            rates.append(produced / (time.perf_counter() - began))
        rows.append(
            Row(
                ratio,
                top_k,
                top_p,
                float(np.mean(fids)),
                float(np.std(fids)),
                float(np.mean(complete)),
                float(np.mean(rates)),
                seeds,
                len(streams),
            )
        )
    bar.close()
    _write(Path(output), rows, {"checkpoint": str(checkpoint), "feature_extractor": feature_extractor})
    return rows


def _originals(codec: Any, inputs: list[str], limit: int | None) -> tuple[list[bytes], list[np.ndarray]]:
    streams, reals = [], []
    for item in find_inputs(inputs, "jpeg").items:
        try:
            data = item.path if item.size < 0 else item.read()
            reals.append(np.asarray(codec.prepare(data)))
            streams.append(codec.encode(data))
        except Exception as e:  # one bad file is reported, not fatal
            print(f"skipped {item.name}: {e}")
        if limit and len(streams) == limit:
            break
    if len(streams) < 2:
        raise ValueError(f"FID needs at least 2 readable images, found {len(streams)} in {inputs}")
    return streams, reals


def _write(out: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    lines = [
        f"# jpeglm evaluate: {meta['checkpoint']}",
        "",
        f"FID ({meta['feature_extractor']} features), mean ± std over seeds.",
        "",
        "| prompt ratio | top-k | top-p | FID | complete | tokens/s | images x seeds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = "unconditional" if r.ratio is None else f"{r.ratio:g}"
        lines.append(
            f"| {ratio} | {r.top_k or 'all'} | {r.top_p:g} | {r.fid_mean:.2f} ± {r.fid_std:.2f} | "
            f"{r.complete_share:.0%} | {r.tokens_per_s:.0f} | {r.images} x {r.seeds} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _top_ks(text: str) -> list[int | None]:
    return [int(x) or None for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a jpeglm checkpoint (file or FSDP2 sharded directory).")
    parser.add_argument("--images", required=True, nargs="+", help="evaluation images: directories, globs, files.")
    parser.add_argument("--output", required=True, help="directory for results.json and results.md.")
    parser.add_argument(
        "--ratios",
        type=_floats,
        default=[0.25, 0.5, 0.75],
        help="shares of each image kept as the prompt, comma separated.",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (mean and std are reported).")
    parser.add_argument(
        "--top-k", type=_top_ks, default=[40, 80], help="top-k values to sample with, comma separated (0: all ids)."
    )
    parser.add_argument(
        "--top-p", type=_floats, default=[0.9, 1.0], help="nucleus sampling thresholds, comma separated (1.0: off)."
    )
    parser.add_argument("--num-images", type=int, default=None, help="use only the first N images.")
    parser.add_argument("--no-unconditional", action="store_true", help="skip unconditional FID.")
    parser.add_argument(
        "--feature-extractor",
        choices=["inception", "small"],
        default="inception",
        help="FID features: the standard Inception (needs --inception-weights) or 'small' (no weights).",
    )
    parser.add_argument("--inception-weights", default=None, help="local path of the FID Inception weights file.")
    parser.add_argument("--batch-size", type=int, default=16, help="completions sampled at once.")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="new tokens per completion (default: 1.5x the longest image, within the context).",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar.")


def run(args: argparse.Namespace) -> int:
    rows = evaluate(
        args.checkpoint,
        args.images,
        args.output,
        args.ratios,
        args.seeds,
        args.top_k,
        args.top_p,
        args.num_images,
        not args.no_unconditional,
        args.feature_extractor,
        args.inception_weights,
        args.batch_size,
        args.device,
        progress=not args.no_progress,
        max_new_tokens=args.max_new_tokens,
    )
    print((Path(args.output) / "results.md").read_text())
    print(f"{len(rows)} settings written to {args.output}")
    return 0
