"""``jpeglm evaluate``: the paper's protocol (Tables 1-3) on a folder of images.

For every prompt ratio r, top-k and top-p, and each of ``seeds`` seeds: every image is encoded with the
checkpoint's codec, cut after its k-th FFD7 marker (k = int(32 r)), completed by the model and decoded
(undecodable completions enter as decoded, grey where they broke), all through
:func:`jpeglm.generation.complete`, and compared with the originals by FID (:mod:`jpeglm.fid`).
Unconditional FID compares as many unconditional samples with the same originals. The FID definition is
:mod:`jpeglm.fid`'s, with the protocol's reals: the images as the codec prepares them (center crop, resize),
before JPEG compression (``codec.reference``); results.json records it as ``fid_definition``.

Written to ``output``: ``results.json`` and ``results.md`` (one row per setting: FID mean and std over seeds,
the paper's FID for the same ratio (``paper``), share of complete streams, tokens/s).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from jpeglm.checkpoints import Precision, load_model, precision_of
from jpeglm.codecs import Codec
from jpeglm.errors import UserError
from jpeglm.fid import PAPER_FID, add_pictures, fake_picture, fid_definition, fid_metric, real_picture
from jpeglm.generation import item_budget, iter_complete
from jpeglm.inputs import EXTENSIONS, encode_input, find_inputs
from jpeglm.storage import fetch_inputs
from jpeglm.vocabulary import Modality, pick_modality


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
    images: int  # completions per seed
    kept: float | None = None  # share of each image the prompt really kept (codec.prompt_share); None: unconditional
    skipped: int = 0  # prompts left out: too long for the model's context
    paper_fid: float | None = None  # the paper's FID for this ratio on the dataset named by ``paper``, if it has one


@dataclass
class _Run:
    """What every setting of one evaluation shares."""

    model: Any
    modality: Modality
    metric: Any  # holds the originals' features
    streams: list[bytes]
    seeds: int
    batch_size: int
    feature_batch_size: int
    max_new_tokens: int | None
    sampling: dict[str, Any]  # temperature, constrain
    bar: tqdm


def evaluate(
    checkpoint: str,
    images: list[str],
    output: str,
    ratios: list[float] = [0.25, 0.5, 0.75],  # noqa: B006 (never mutated; a list shows as one in --help)
    seeds: int = 3,
    top_k: list[int | None] = [40, 80],  # noqa: B006
    top_p: list[float] = [0.9, 1.0],  # noqa: B006
    temperature: float = 1.0,
    constrain: bool = True,
    num_images: int | None = None,
    unconditional: bool = True,
    paper: Literal["imagenet", "ffhq", "none"] = "imagenet",
    feature_extractor: str = "inception",
    inception_weights: str | None = None,
    batch_size: int = 16,
    feature_batch_size: int = 64,
    max_new_tokens: int | None = None,
    device: str | None = None,
    precision: Precision | None = None,
    progress: bool = True,
) -> list[Row]:
    """Run the paper's FID protocol on a folder of images, write results.json and results.md; one row per setting.

    Args:
        checkpoint: A jpeglm checkpoint (a file, or an FSDP2 sharded directory) trained on JPEG.
        images: Evaluation images: directories, globs, files, or s3:// URLs (an object, or every image under a prefix).
        output: Directory for results.json and results.md.
        ratios: Shares of each image kept as the prompt, one setting each.
        seeds: Seeds per setting (the tables report mean and std over them).
        top_k: Top-k values to sample with, one setting each (0: all ids).
        top_p: Nucleus sampling thresholds, one setting each (1.0: off).
        temperature: Sampling temperature (the paper: 1.0; 0: greedy).
        constrain: Sample under the JPEG grammar, so every completion is a whole valid image (--no-constrain: the
            paper's unconstrained protocol). Recorded in results.json.
        num_images: Use only the first N readable images.
        unconditional: Also compute the FID of as many unconditional samples.
        paper: Whose published FIDs to show beside these, row by row where the paper has the same ratio: imagenet
            (its ratios 0.25, 0.5, 0.75 and unconditional are the defaults here), ffhq (0.375, 0.4375, 0.5) or none.
        feature_extractor: FID features: inception (the standard, needs inception_weights) or small (no weights).
        inception_weights: Local path of the FID Inception weights file.
        batch_size: Completions sampled at once.
        feature_batch_size: Pictures per batch through the FID feature network (on the model's device).
        max_new_tokens: New tokens per completion (default: 1.5x the longest image, within the context).
        device: Where to run: cpu, cuda, cuda:1 ... (default: cuda if available).
        precision: The model's weights in bf16 or fp32 (default: bf16 on a CUDA device, fp32 on CPU).
        progress: Show a progress bar.
    """
    model, modality, metric = _load(checkpoint, device, precision, feature_extractor, inception_weights, seeds, paper)
    ratios = [*_distinct(modality.codec, ratios), *([None] if unconditional else [])]  # None: unconditional
    streams = _add_originals(metric, modality, images, num_images, feature_batch_size)
    settings = list(product(ratios, [k or None for k in top_k], top_p))
    sampling = {"temperature": temperature, "constrain": constrain}
    budget = max_new_tokens or item_budget(modality, streams)  # enough to finish any image, within the context
    with tqdm(total=len(settings) * seeds * len(streams), desc="evaluate", unit="sample", disable=not progress) as bar:
        run = _Run(model, modality, metric, streams, seeds, batch_size, feature_batch_size, budget, sampling, bar)
        rows = [_with_paper(_evaluate_setting(run, *setting), paper) for setting in settings]
    _write(Path(output), rows, {**_meta(checkpoint, run, feature_extractor, paper), **sampling})
    return rows


def _meta(checkpoint: str, run: _Run, feature_extractor: str, paper: str) -> dict[str, Any]:
    """What results.json says beside the rows: the checkpoint, the FID definition used, the codec."""
    count = len(run.streams)  # reals; fakes: as many per setting and seed (a row's ``images``: those that fitted)
    return {
        "checkpoint": str(checkpoint),
        "feature_extractor": feature_extractor,
        "fid_definition": fid_definition(run.metric, feature_extractor, "reference", count, count),
        "paper": paper,
        "precision": precision_of(run.model),
        "codec": run.modality.codec.spec,
    }


def _with_paper(row: Row, paper: str) -> Row:
    """``row`` with the paper's FID for its ratio (unconditional: ratio None) on ``paper``'s dataset, if known."""
    row.paper_fid = PAPER_FID.get(paper, {}).get(row.ratio)
    return row


def _load(
    checkpoint: str,
    device: str | None,
    precision: Precision | None,
    feature_extractor: str,
    weights: str | None,
    seeds: int,
    paper: str,
) -> tuple[Any, Modality, Any]:
    """The model, its JPEG modality and the FID metric on the model's device (bad seeds, an unknown paper dataset or
    a missing weights file fail first)."""
    if seeds < 1:
        raise UserError(f"seeds must be at least 1, got {seeds}")
    if paper not in (*PAPER_FID, "none"):
        raise UserError(f"paper must be one of {[*PAPER_FID, 'none']}, got {paper!r}")
    metric = fid_metric(feature_extractor, weights)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, modalities = load_model(checkpoint, device, precision)
    return model, pick_modality(modalities, "jpeg"), metric.to(device)


def summary(rows: list[Row]) -> str:
    """What to print when :func:`evaluate` has written ``rows``: the table of results.md."""
    return "\n".join([*_table(rows), "", f"{len(rows)} settings; see results.md and results.json"])


def _evaluate_setting(run: _Run, ratio: float | None, top_k: int | None, top_p: float) -> Row:
    """FID, complete share and tokens/s of one setting over ``run.seeds`` seeds."""
    fids, complete_shares, rates, counts = [], [], [], []
    for seed in range(run.seeds):
        score, complete_share, rate, count = _evaluate_seed(run, ratio, top_k, top_p, seed * 100_003)
        fids.append(score)
        complete_shares.append(complete_share)
        rates.append(rate)
        counts.append(count)
    shares, rate = float(np.mean(complete_shares)), float(np.mean(rates))
    kept = None if ratio is None else run.modality.codec.prompt_share(ratio)
    fid_mean, fid_std, skipped = float(np.mean(fids)), float(np.std(fids)), len(run.streams) - counts[0]
    if skipped:
        print(f"ratio {ratio}: {skipped} of {len(run.streams)} prompts are too long for the model's context, left out")
    return Row(ratio, top_k, top_p, fid_mean, fid_std, shares, rate, run.seeds, counts[0], kept, skipped)


def _evaluate_seed(run: _Run, ratio: float | None, top_k: int | None, top_p: float, seed: int) -> tuple[Any, ...]:
    """FID, complete share, tokens/s and completions of one seed, one batch of completions in memory at a time."""
    images, finished = len(run.streams), run.bar.n

    def advance(done: int, total: int) -> None:
        step = finished + images * done // max(total, 1) - run.bar.n
        if step:
            run.bar.update(step)

    batches = iter_complete(
        run.model,
        run.modality,
        None if ratio is None else run.streams,
        num_samples=images if ratio is None else None,
        ratio=ratio,
        **run.sampling,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        batch_size=run.batch_size,
        max_new_tokens=run.max_new_tokens,
        on_progress=advance,
        on_skip=lambda index, reason: None,  # counted below: the completions lack its index
    )
    began, new_tokens, complete_count, count = time.perf_counter(), 0, 0, 0
    run.metric.reset()  # the fakes' running sums; the originals' stay
    for completions in batches:
        new_tokens += sum(c.new_tokens for c in completions)
        complete_count += sum(c.complete for c in completions)
        count += len(completions)
        fakes = [fake_picture(run.modality.codec, c.decoded) for c in completions]
        add_pictures(run.metric, fakes, real=False, batch_size=run.feature_batch_size)
    rate = new_tokens / (time.perf_counter() - began)
    advance(1, 1)
    if count < 2:
        raise UserError(f"FID needs at least 2 completions; {images - count} of {images} prompts did not fit")
    return float(run.metric.compute()), complete_count / count, rate, count


def _distinct(codec: Codec, ratios: list[float]) -> list[float]:
    """The ratios that cut differently (a later one that keeps the same share is dropped, with a warning)."""
    kept: dict[float, float] = {}
    for ratio in ratios:
        try:
            share = codec.prompt_share(ratio)
        except ValueError as e:
            raise UserError(f"--ratios {ratio}: {e}") from e
        if share in kept.values():
            first = next(r for r, s in kept.items() if s == share)
            print(f"warning: ratio {ratio} keeps the same {share:g} of each image as ratio {first}; evaluated once")
            continue
        kept[ratio] = share
    return list(kept)


def _add_originals(
    metric: Any, modality: Modality, inputs: list[str], limit: int | None, batch_size: int
) -> list[bytes]:
    """Feed the originals to the metric's real side in batches; the streams of the images it read."""
    streams: list[bytes] = []
    add_pictures(metric, _originals(modality, inputs, limit, streams), real=True, batch_size=batch_size)
    if len(streams) < 2:
        raise UserError(f"FID needs at least 2 readable images, found {len(streams)} in {inputs}")
    return streams


def _originals(modality: Modality, inputs: list[str], limit: int | None, streams: list[bytes]) -> Iterator[np.ndarray]:
    """The first ``limit`` readable images as the codec prepares them, one at a time; their streams go to ``streams``.

    A generator, so that the originals reach the FID features in batches and are never all in memory.
    """
    codec = modality.codec
    for item in find_inputs(fetch_inputs(inputs, EXTENSIONS[modality.name]), modality.name).items:
        encoded = encode_input(codec, item)
        if encoded.stream is None:  # one bad file is reported, not fatal
            print(f"skipped {item.name}: {encoded.error}")
            continue
        streams.append(encoded.stream)
        yield real_picture(codec, item.path if item.size < 0 else item.read(), reals="reference")
        if limit and len(streams) == limit:
            return


def _table(rows: list[Row]) -> list[str]:
    """The results as a markdown table; a "paper FID" column when any row has the paper's number beside it."""
    paper = any(r.paper_fid is not None for r in rows)
    head = ["prompt ratio", "kept", "top-k", "top-p", "FID", *(["paper FID"] if paper else [])]
    head += ["complete", "tokens/s", "images x seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        ratio = "unconditional" if r.ratio is None else f"{r.ratio:g}"
        kept = "-" if r.kept is None else f"{r.kept:.0%}"
        skipped = f" ({r.skipped} too long)" if r.skipped else ""
        cells = [ratio, kept, f"{r.top_k or 'all'}", f"{r.top_p:g}", f"{r.fid_mean:.2f} ± {r.fid_std:.2f}"]
        cells += ["-" if r.paper_fid is None else f"{r.paper_fid:.2f}"] if paper else []
        cells += [f"{r.complete_share:.0%}", f"{r.tokens_per_s:.0f}", f"{r.images} x {r.seeds}{skipped}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _write(out: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    definition = meta["fid_definition"]
    lines = [
        f"# jpeglm evaluate: {meta['checkpoint']}",
        "",
        f"FID ({meta['feature_extractor']} features), mean ± std over seeds; temperature {meta['temperature']:g}; "
        + ("sampled under the JPEG grammar." if meta["constrain"] else "unconstrained sampling (the paper's)."),
        f"Reals ({definition['num_reals']}): {definition['reals_are']}; resize before the features: "
        f"{definition['resize']}.",
        f"Codec: {_codec_line(meta['codec'])}. *kept*: the share of each image the prompt really holds (cuts fall",
        "after FFD7 markers, every eighth restart marker).",
        *_paper_note(meta["paper"], rows),
        "",
        *_table(rows),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _paper_note(paper: str, rows: list[Row]) -> list[str]:
    """The line that says where the "paper FID" column comes from (none when no row has one)."""
    if not any(r.paper_fid is not None for r in rows):
        return []
    return [
        f"*paper FID*: JPEG-LM's published FID on {'ImageNet' if paper == 'imagenet' else 'FFHQ'} for the same "
        "ratio (Han et al. 2024); their model, data and sample count, so a guide to the gap, not a like-for-like."
    ]


def _codec_line(spec: dict[str, Any]) -> str:
    """The codec's settings as one line (the full spec is in results.json)."""
    return ", ".join(
        f"{key} {spec[key]}" for key in spec if key not in ("codec", "pillow", "libjpeg") and "sha" not in key
    )
