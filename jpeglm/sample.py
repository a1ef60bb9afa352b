"""``jpeglm generate``: sample images or videos from a checkpoint, as files people can open.

Prompts come from your images (or videos): each is encoded with the codec the model was trained with
and cut with the paper's protocol (``--ratio``: after the k-th FFD7 marker of a JPEG; ``--frames``: the
first frames of a video); or sampling starts from nothing (``--unconditional``). Written to ``--output``:

- ``sample_0000.jpg`` / ``.mp4``: each sample. When the stream the model wrote is complete and valid it
  is that stream with the tables put back (``codec.to_jpeg`` / ``to_mp4``); otherwise the best-effort
  decode (grey where the stream broke) saved as an ordinary file, so every file opens.
- ``contact_sheet.png``: one row per sample, ``prompt | completion | original``.
- ``samples.json``: per sample the prompt source, new tokens, complete, fraction decoded, seed and settings.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from jpeglm.callbacks.samples import cut, grid, picture
from jpeglm.checkpoints import check_tokenizer, load_model
from jpeglm.generation import generate_source, make_prompt, new_token_budget, sequence_bytes
from jpeglm.inputs import encode_input, find_inputs
from jpeglm.vocabulary import Modality as Source
from jpeglm.vocabulary import pick_modality as pick_source


def prompt_streams(source: Source, inputs: list[str], count: int, ratio: float) -> list[tuple[str, bytes, bytes]]:
    """(name, prompt stream, original stream) for the first ``count`` readable inputs."""
    codec = source.codec
    found = find_inputs(inputs, source.name).items
    prompts = []
    for item in found:
        encoded = encode_input(codec, item)
        if encoded.stream is None:
            print(f"skipped {item.name}: {encoded.error}")
            continue
        prompts.append((item.name, cut(codec, encoded.stream, ratio), encoded.stream))
        if len(prompts) == count:
            break
    if not prompts:
        raise ValueError(f"none of the inputs in {inputs} could be used as a prompt")
    return prompts


def sample(
    checkpoint: str,
    output: str,
    prompt_inputs: list[str] | None = None,
    ratio: float = 0.5,
    num_samples: int = 8,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = 40,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 8,
    modality: str | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Sample from a checkpoint into ``output`` (see the module docstring); returns the samples' records."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, sources = load_model(checkpoint, device)
    check_tokenizer(sources, tokenizer)
    source = pick_source(sources, modality)
    codec, tok = source.codec, source.tokenizer
    if prompt_inputs:
        items = prompt_streams(source, prompt_inputs, num_samples, ratio)
    else:
        items = [(None, b"", None)] * num_samples
    max_new_tokens = max_new_tokens or model.config.block_size  # generate_source bounds it by the context left
    settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    records, rows = [], []
    all_prompts = [make_prompt(tok, prompt, source.offset) for _, prompt, _ in items]
    starts = range(0, len(items), batch_size)
    budgets = [new_token_budget(model, all_prompts[i : i + batch_size], max_new_tokens) for i in starts]
    # In tokens, so the bar moves within a batch; sequences that end early give their unused budget back when
    # their batch ends, so the bar ends full.
    total = sum(len(all_prompts[i : i + batch_size]) * b for i, b in zip(starts, budgets, strict=True))
    bar = tqdm(total=total, desc="generate", unit="tok", disable=not progress)
    for start, budget in zip(starts, budgets, strict=True):
        chunk = items[start : start + batch_size]
        began, drawn = time.perf_counter(), [0]
        prompts = all_prompts[start : start + batch_size]

        def step(n: int, drawn: list[int] = drawn) -> None:
            drawn[0] += n
            bar.update(n)

        outputs = generate_source(model, source, prompts, max_new_tokens, seed=seed + start, on_step=step, **settings)
        bar.update(len(chunk) * budget - drawn[0])
        bar.set_postfix(samples=f"{start + len(chunk)}/{len(items)}")
        seconds = time.perf_counter() - began
        for j, ((name, prompt, original), ids) in enumerate(zip(chunk, outputs, strict=True)):
            index = start + j
            stream = sequence_bytes(ids, tok, source.offset, codec)
            image, decoded = picture(codec, stream)
            path = write_sample(codec, stream, decoded, out / f"sample_{index:04d}")
            prompt_len = len(make_prompt(tok, prompt, source.offset))
            records.append(
                {
                    "file": path.name,
                    "prompt": name,
                    "ratio": ratio if name else None,
                    "new_tokens": len(ids) - prompt_len,
                    "complete": decoded.complete,
                    "fraction": round(decoded.fraction, 4),
                    "seed": seed + start,
                    "tokens_per_s": round((len(ids) - prompt_len) / seconds, 1),
                    **settings,
                }
            )
            row = [picture(codec, prompt)[0], image] if name else [image]
            rows.append(row + ([picture(codec, original)[0]] if original is not None else []))
    bar.close()
    Image.fromarray(grid(rows)).save(out / "contact_sheet.png")
    (out / "samples.json").write_text(json.dumps({"checkpoint": str(checkpoint), "samples": records}, indent=2) + "\n")
    return records


def write_sample(codec: Any, stream: bytes, decoded: Any, stem: Path) -> Path:
    """The model's own stream as a file when it is complete; else its best-effort decode, so the file opens."""
    if codec.name == "avc":
        path = stem.with_suffix(".mp4")
        if decoded.complete:
            path.write_bytes(codec.to_mp4(stream))
        else:
            path.write_bytes(codec.to_mp4(codec.encode(list(decoded.frames))))
        return path
    path = stem.with_suffix(".jpg")
    if decoded.complete:
        path.write_bytes(codec.to_jpeg(stream))
    else:
        buffer = io.BytesIO()
        decoded.image.save(buffer, format="JPEG", quality=95)
        path.write_bytes(buffer.getvalue())
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a jpeglm checkpoint (file or FSDP2 sharded directory).")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--prompt-images",
        nargs="+",
        metavar="PATH",
        help="images (or videos) whose beginnings are completed: directories, globs, files.",
    )
    group.add_argument("--unconditional", action="store_true", help="sample from nothing (bos and the modality tag).")
    parser.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help="share of each prompt image kept (JPEG: restart intervals; video: frames).",
    )
    parser.add_argument("--num-samples", type=int, default=8, help="samples to write.")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="new tokens per sample (default: up to the context)."
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy).")
    parser.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens (0: all).")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (1.0: off).")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (batch i uses seed + its first index).")
    parser.add_argument("--batch-size", type=int, default=8, help="samples generated at once.")
    parser.add_argument(
        "--modality",
        choices=["jpeg", "avc"],
        default=None,
        help="which modality to sample from a model trained on several (default: its first image or video one).",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="check that this tokenizer directory is the one the checkpoint was trained with.",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
    parser.add_argument("--output", required=True, help="directory for the samples, contact sheet and samples.json.")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar.")


def run(args: argparse.Namespace) -> int:
    records = sample(
        args.checkpoint,
        args.output,
        args.prompt_images,
        args.ratio,
        args.num_samples,
        args.max_new_tokens,
        args.temperature,
        args.top_k or None,
        args.top_p,
        args.seed,
        args.batch_size,
        args.modality,
        args.tokenizer,
        args.device,
        progress=not args.no_progress,
    )
    complete = np.mean([r["complete"] for r in records])
    print(f"wrote {len(records)} samples to {args.output} ({complete:.0%} complete streams); see samples.json")
    return 0
