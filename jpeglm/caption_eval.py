"""``jpeglm evaluate-captions``: does a captioned model draw what it is told? Agreement read from the pixels.

For models trained on the built-in captioned pictures (``SyntheticDataModule(captions=True)``, the
``jpeg_caption_tiny`` recipe), whose captions name the background's colours and each shape's colour in the
16-colour palette (:func:`~jpeglm.data_modules.synthetic.procedural_caption`). Each caption is drawn once per
guidance scale (the same seed at every scale, so the columns differ by the scale only), then read back:

- background agreement: the most common palette colour of the picture's border (the outer 4 pixels; each pixel
  taken to its nearest palette colour) is one the caption gives the background; also by the pattern the caption
  names (plain, gradient, striped), since a small model draws plain backgrounds best;
- shape colour agreement: for each shape the caption names, its colour covers at least 1% of the picture (nearest
  palette colour), counted over all named shapes.

Two chances to beat: ``palette`` is what a uniformly random palette colour scores (1 in 16 for a plain
background, 2 in 16 for a two-colour one); ``shuffled`` scores the same pictures against other captions (each
picture against the next caption's colours): what a model that ignores its captions but draws like this one
would get. Guidance doubles the sampling batch: tokens/s at each scale is reported beside the agreement.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from jpeglm.checkpoints import Precision, load_model
from jpeglm.errors import UserError
from jpeglm.generation import complete
from jpeglm.pictures import caption_rows, grid
from jpeglm.vocabulary import pick_modality

HELD_OUT_SEED = 1_000_003
"""Seed of the built-in captions drawn here: the training sets use small seeds (42 by default)."""


def evaluate_captions(
    checkpoint: str,
    output: str,
    captions: str | None = None,
    num_captions: int = 64,
    cfg_scales: list[float] = [1.0, 2.0],  # noqa: B006 (never mutated; a list shows as one in --help)
    cfg_start: int = 40,
    temperature: float = 0.3,
    top_k: int | None = 40,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    constrain: bool = True,
    image_size: int | None = None,
    device: str | None = None,
    precision: Precision | None = None,
) -> list[dict[str, Any]]:
    """Draw captions at several guidance scales and measure how often the pictures agree with them (results.json).

    Args:
        checkpoint: A jpeglm checkpoint trained on captioned built-in pictures (the jpeg_caption_tiny recipe).
        output: Directory for results.json and one contact sheet per scale.
        captions: A text file of built-in-style captions, one per line (default: num_captions new ones, drawn
            with a seed the training sets do not use).
        num_captions: How many captions to make when no file is given.
        cfg_scales: Classifier-free guidance scales, one row each (1.0: plain conditional sampling).
        cfg_start: New tokens each picture draws before guidance starts (40: the quick start's 64-px pictures
            agree most often; 0: guidance from the first token; see the README).
        temperature: Sampling temperature (0.3: the quick-start model's backgrounds agree most often; see the README).
        top_k: Sample only from the k most likely tokens (0: all).
        top_p: Nucleus sampling threshold (1.0: off).
        seed: Caption i is drawn with seed + i at every scale.
        batch_size: Captions drawn at once (guidance doubles the batch).
        constrain: Sample under the JPEG grammar (every picture whole).
        image_size: Side of the pictures the captions describe (default: the model's codec size).
        device: Where to run: cpu, cuda ... (default: cuda if available).
        precision: The model's weights in bf16 or fp32 (default: bf16 on CUDA, fp32 on CPU).
    """
    model, modalities = load_model(checkpoint, device or ("cuda" if torch.cuda.is_available() else "cpu"), precision)
    modality = pick_modality(modalities, "jpeg")
    texts = _read_captions(captions, num_captions, image_size or modality.codec.size)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale in cfg_scales:
        began = time.perf_counter()
        samples = complete(
            model, modality, captions=texts, cfg_scale=scale, cfg_start=cfg_start, temperature=temperature,
            top_k=top_k or None, top_p=top_p, seed=seed, batch_size=batch_size, constrain=constrain,
        )  # fmt: skip
        speed = sum(c.new_tokens for c in samples) / (time.perf_counter() - began)  # new ids of the captions' rows
        pictures = [modality.codec.preview(c.decoded) for c in samples]
        complete_share = float(np.mean([c.complete for c in samples]))
        rows.append(
            {"cfg_scale": scale, **agreement(pictures, texts), "complete": complete_share, "tokens_per_s": speed}
        )
        Image.fromarray(grid(caption_rows(modality.codec, [samples[:16]]))).save(out / f"captions_cfg_{scale:g}.png")
    results = {"checkpoint": str(checkpoint), "captions": len(texts), "temperature": temperature, "rows": rows}
    (out / "results.json").write_text(json.dumps({**results, "cfg_start": cfg_start}, indent=2) + "\n")
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    """The agreement table, one line per guidance scale."""
    lines = [
        "cfg scale | background | plain / gradient / striped | shuffled | palette | shape colour | shuffled | "
        "complete | tokens/s",
        "--- | --- | --- | --- | --- | --- | --- | --- | ---",
    ]
    for r in rows:
        patterns = " / ".join("n/a" if v is None else f"{v:.0%}" for v in r["background_by_pattern"].values())
        lines.append(
            f"{r['cfg_scale']:g} | {r['background']:.0%} | {patterns} | {r['background_shuffled']:.0%} | "
            f"{r['background_palette']:.0%} | {r['shape']:.0%} | {r['shape_shuffled']:.0%} | {r['complete']:.0%} | "
            f"{r['tokens_per_s']:.0f}"
        )
    return "\n".join(lines)


def agreement(pictures: list[np.ndarray], captions: list[str]) -> dict[str, Any]:
    """Shares of pictures whose border colour, and of named shapes whose colour, agree with their caption; the
    background's share by the pattern the caption names (``background_by_pattern``: plain, gradient, striped; None
    for one no caption names); the same against the next caption (``_shuffled``); the background's palette chance.
    """
    from jpeglm.data_modules.synthetic import COLOUR_NAMES, caption_colours, caption_pattern

    named = [caption_colours(c) for c in captions]
    colours = [_nearest_palette(p) for p in pictures]  # (H, W) palette indices
    shifted = named[1:] + named[:1]

    def scores(against: list[tuple[list[str], list[str]]], drawn: list[np.ndarray] = colours) -> tuple[float, float]:
        background = [COLOUR_NAMES[_border_colour(c)] in bg for c, (bg, _) in zip(drawn, against, strict=True)]
        shapes = [
            np.mean(c == COLOUR_NAMES.index(name)) >= 0.01
            for c, (_, names) in zip(drawn, against, strict=True)
            for name in names
        ]
        return float(np.mean(background)), float(np.mean(shapes)) if shapes else float("nan")

    patterns = [caption_pattern(c) for c in captions]
    by_pattern = {}
    for pattern in ("plain", "gradient", "striped"):
        chosen = [i for i, p in enumerate(patterns) if p == pattern]
        by_pattern[pattern] = scores([named[i] for i in chosen], [colours[i] for i in chosen])[0] if chosen else None
    background, shape = scores(named)
    background_shuffled, shape_shuffled = scores(shifted)
    palette_chance = float(np.mean([len(set(bg)) / len(COLOUR_NAMES) for bg, _ in named]))
    return {
        "background": background,
        "background_shuffled": background_shuffled,
        "background_palette": palette_chance,
        "background_by_pattern": by_pattern,
        "shape": shape,
        "shape_shuffled": shape_shuffled,
    }


def _nearest_palette(picture: np.ndarray) -> np.ndarray:
    """(H, W) index of each pixel's nearest palette colour (RGB distance)."""
    from jpeglm.data_modules.synthetic import palette

    colours = palette().astype(np.int32)  # (16, 3)
    distances = ((picture[..., None, :].astype(np.int32) - colours) ** 2).sum(-1)  # (H, W, 16)
    return distances.argmin(-1)


def _border_colour(indices: np.ndarray, width: int = 4) -> int:
    """The most common palette index of the outer ``width`` pixels."""
    border = np.concatenate(
        [indices[:width].ravel(), indices[-width:].ravel(), indices[:, :width].ravel(), indices[:, -width:].ravel()]
    )
    return int(np.bincount(border, minlength=16).argmax())


def _read_captions(path: str | None, count: int, size: int) -> list[str]:
    from jpeglm.data_modules.synthetic import procedural_caption

    if path is None:
        if count < 2:
            raise UserError(f"num_captions must be at least 2 (the shuffled chance pairs them up), got {count}")
        return [procedural_caption(HELD_OUT_SEED, index, size) for index in range(count)]
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"captions {file} is not a file: give a text file with one caption per line")
    texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(texts) < 2:
        raise UserError(f"captions {file} holds {len(texts)} captions: give at least 2")
    return texts
