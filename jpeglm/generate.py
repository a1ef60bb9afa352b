"""``jpeglm generate``: sample images or videos from a checkpoint, as files people can open.

Prompts come from your images (or videos): each is encoded with the codec the model was trained with and cut
with the paper's protocol (``ratio``: after the k-th FFD7 marker of a JPEG, the first frames of a video); or
sampling starts from nothing (``unconditional``); or, for a model trained on captioned images, from captions
(``prompt_text``, ``prompt_file``), with classifier-free guidance (``cfg_scale``). All go through
:func:`jpeglm.generation.complete`.
Written to ``output``:

- ``sample_0000.jpg`` / ``.mp4``: each sample (``codec.to_file``). When the stream the model wrote is complete
  and valid it is that stream made standalone; otherwise the best-effort decode (grey where the stream broke)
  saved as an ordinary file, so every file opens.
- ``contact_sheet.png``: one row per sample, ``prompt | completion | original`` (``caption | image`` for captions).
- ``samples.json``: per sample the file, prompt source, new tokens, complete, fraction decoded, the seed that
  reproduces it, settings and the precision of the weights; and ``skipped``: prompts too long for the model's
  context (each named, with by how much), which are left out while the others are generated.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from jpeglm.checkpoints import Precision, check_tokenizer, load_model, precision_of
from jpeglm.errors import UserError
from jpeglm.generation import Completion, complete
from jpeglm.inputs import EXTENSIONS, encode_input, find_inputs
from jpeglm.pictures import caption_rows, completion_row, grid
from jpeglm.storage import fetch_inputs
from jpeglm.vocabulary import Modality, pick_modality


def generate_samples(
    checkpoint: str,
    output: str,
    prompt_images: list[str] | None = None,
    unconditional: bool = False,
    prompt_text: list[str] | None = None,
    prompt_file: str | None = None,
    cfg_scale: float = 1.0,
    cfg_start: int = 0,
    ratio: float = 0.5,
    num_samples: int = 8,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = 40,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 8,
    constrain: bool = True,
    modality: str | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    precision: Precision | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Sample images or videos from a checkpoint into files, a contact sheet and samples.json; returns its records.

    Args:
        checkpoint: A jpeglm checkpoint (a file, or an FSDP2 sharded directory).
        output: Directory for the samples, contact_sheet.png and samples.json.
        prompt_images: Images (or videos) whose beginnings the model completes: directories, globs, files, s3:// URLs.
        unconditional: Sample from nothing (bos and the modality tag) instead of completing prompts.
        prompt_text: Captions to draw, num_samples of each (with prompt images: one for all, or one per image).
        prompt_file: A text file of captions, one per line, drawn like prompt_text.
        cfg_scale: Classifier-free guidance scale for captions (1.0: none; the batch doubles).
        cfg_start: New tokens each sample draws before guidance starts (0: from the first; 40 for the quick start).
        ratio: Share of each prompt kept (JPEG: of its restart intervals; video: of its frames).
        num_samples: How many samples to write (with prompts: the first readable ones; with captions: per caption).
        max_new_tokens: Most new tokens per sample (default: up to the end of the model's context).
        temperature: Sampling temperature (0: greedy).
        top_k: Sample only from the k most likely tokens (0: from all).
        top_p: Nucleus sampling threshold (1.0: off).
        seed: Sampling seed; sample i draws with seed + i (its own generator, whatever its batch).
        batch_size: Samples generated at once.
        constrain: Sample under the codec's stream grammar: every JPEG whole and valid (--no-constrain: as the paper).
        modality: Which modality of a model trained on several to sample, jpeg or avc (default: its first).
        tokenizer: A tokenizer directory to check against the one the checkpoint was trained with.
        device: Where to run: cpu, cuda, cuda:1 ... (default: cuda if available).
        precision: The model's weights in bf16 or fp32 (default: bf16 on a CUDA device, fp32 on CPU).
        progress: Show a progress bar.
    """
    captions = _check_request(prompt_images, unconditional, num_samples, _captions(prompt_text, prompt_file))
    model, chosen = _load(checkpoint, device, precision, tokenizer, modality)
    names, streams = _prompt_streams(chosen, prompt_images, num_samples) if prompt_images else ([], None)
    settings = _settings(streams, captions, ratio, temperature, top_k, top_p, constrain, cfg_scale, cfg_start)
    captions, names = _per_sample(captions, streams, names, num_samples)
    run = {"num_samples": None if streams else len(names), "seed": seed, "batch_size": batch_size, **settings}
    run |= {"captions": captions, "cfg_scale": cfg_scale, "cfg_start": cfg_start}
    completions, skipped = _complete(model, chosen, streams, names, progress, max_new_tokens=max_new_tokens, **run)
    meta = {"checkpoint": str(checkpoint), **settings, "precision": precision_of(model)}
    return _write(Path(output), chosen, completions, [names[c.index] for c in completions], meta, skipped)


def _settings(streams: list[bytes] | None, captions: list[str] | None, ratio: float, *values: Any) -> dict[str, Any]:
    """The sampling settings samples.json records; None where they do not apply (no prompts, no captions)."""
    temperature, top_k, top_p, constrain, cfg_scale, cfg_start = values
    settings = {"ratio": ratio if streams else None, "temperature": temperature, "top_k": top_k or None, "top_p": top_p}
    guided = {"cfg_scale": cfg_scale, "cfg_start": cfg_start}
    return settings | {"constrain": constrain, **(guided if captions else dict.fromkeys(guided))}


def summary(records: list[dict[str, Any]]) -> str:
    """The line to print when :func:`generate_samples` has written ``records``."""
    folder = Path(records[0]["path"]).parent
    share = np.mean([r["complete"] for r in records])
    return f"wrote {len(records)} samples to {folder} ({share:.0%} complete streams); see samples.json"


def _check_request(
    prompt_images: list[str] | None, unconditional: bool, num_samples: int, captions: list[str] | None
) -> list[str] | None:
    """The captions, once the request makes sense."""
    if unconditional and (prompt_images or captions):
        raise UserError("--unconditional samples from nothing: give it without prompt images or captions")
    if not (unconditional or prompt_images or captions):
        raise UserError(
            "give prompt images to complete (--prompt-images), captions to draw (--prompt-text, --prompt-file) or "
            "--unconditional"
        )
    if num_samples < 1:
        raise UserError(f"num_samples must be at least 1, got {num_samples}")
    return captions


def _captions(prompt_text: list[str] | None, prompt_file: str | None) -> list[str] | None:
    """The captions given on the command line and in the file (one per non-empty line), or None."""
    captions = list(prompt_text or [])
    if prompt_file is not None:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise UserError(f"prompt_file {path} is not a file: give a text file with one caption per line")
        captions += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not captions:
            raise UserError(f"prompt_file {path} holds no caption")
    return captions or None


def _per_sample(
    captions: list[str] | None, streams: list[bytes] | None, names: list[str], num_samples: int
) -> tuple[list[str] | None, list[str | None]]:
    """Each sample's caption (each caption ``num_samples`` times, or with prompt images one for each) and prompt
    name (None without prompt images)."""
    if streams is not None:
        if captions is not None and len(captions) not in (1, len(streams)):
            raise UserError(f"{len(captions)} captions for {len(streams)} prompt images: give one, or one per image")
        return (captions * len(streams) if captions and len(captions) == 1 else captions), names
    if captions is None:
        return None, [None] * num_samples
    captions = [caption for caption in captions for _ in range(num_samples)]
    return captions, [None] * len(captions)


def _load(
    checkpoint: str, device: str | None, precision: Precision | None, tokenizer: str | None, modality: str | None
) -> tuple[Any, Modality]:
    """The model (built for inference) and the modality to sample, once a given tokenizer is the checkpoint's."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, modalities = load_model(checkpoint, device, precision)
    check_tokenizer(modalities, tokenizer)
    return model, pick_modality(modalities, modality)


def _prompt_streams(modality: Modality, inputs: list[str], count: int) -> tuple[list[str], list[bytes]]:
    """Names and streams of the first ``count`` readable inputs (unreadable ones are reported and skipped)."""
    names, streams = [], []
    for item in find_inputs(fetch_inputs(inputs, EXTENSIONS[modality.name]), modality.name).items:
        encoded = encode_input(modality.codec, item)
        if encoded.stream is None:
            print(f"skipped {item.name}: {encoded.error}")
            continue
        names.append(item.name)
        streams.append(encoded.stream)
        if len(streams) == count:
            break
    if not streams:
        raise UserError(f"none of the inputs in {inputs} could be used as a prompt")
    return names, streams


def _complete(
    model: Any, modality: Modality, streams: list[bytes] | None, names: list[str | None], progress: bool, **kwargs: Any
) -> tuple[list[Completion], list[dict[str, Any]]]:
    """:func:`complete` with a progress bar; prompts too long for the context are skipped, named and returned."""
    skipped: list[dict[str, Any]] = []
    with tqdm(desc="generate", unit="tok", disable=not progress) as bar:
        completions = complete(
            model,
            modality,
            streams,
            on_progress=partial(_advance, bar),
            on_skip=partial(_skip, names, skipped),
            **kwargs,
        )
    if not completions:
        raise UserError(f"every prompt is too long for the model's context: {skipped[0]['reason']}")
    return completions, skipped


def _skip(names: list[str | None], skipped: list[dict[str, Any]], index: int, reason: str) -> None:
    """Record and print a prompt that :func:`complete` skips (too long for the model's context)."""
    skipped.append({"prompt": names[index], "reason": reason})
    print(f"skipped {names[index]}: {reason}")


def _advance(bar: tqdm, done: int, total: int) -> None:
    """Show ``done`` of ``total`` tokens (sequences that end early give their unused budget back, so it ends full)."""
    if bar.total != total:
        bar.total = total
        bar.refresh()
    bar.update(done - bar.n)  # drawn at most every mininterval seconds


def _write(
    out: Path,
    modality: Modality,
    completions: list[Completion],
    names: list[str | None],
    meta: dict[str, Any],
    skipped: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Write the sample files, the contact sheet and samples.json; the samples' records.

    ``meta``: the checkpoint (at the top of samples.json), the sampling settings and the weights' precision (in
    every record). ``skipped``: the prompts left out, and why.
    """
    settings = {k: v for k, v in meta.items() if k != "checkpoint"}
    codec = modality.codec
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index, (name, c) in enumerate(zip(names, completions, strict=True)):
        path = out / f"sample_{index:04d}{codec.file_suffix}"
        path.write_bytes(codec.to_file(c.stream, c.decoded))
        records.append(
            {
                "file": path.name,
                "path": str(path),
                "prompt": name,
                "new_tokens": c.new_tokens,
                "complete": c.complete,
                "fraction": round(c.fraction, 4),
                "seed": c.seed,
                "caption": c.caption,
                "tokens_per_s": round(c.tokens_per_s, 1),
                **settings,
            }
        )
    rows = (
        caption_rows(codec, [completions])
        if completions[0].caption
        else [completion_row(codec, c) for c in completions]
    )
    Image.fromarray(grid(rows)).save(out / "contact_sheet.png")
    (out / "samples.json").write_text(
        json.dumps({"checkpoint": meta["checkpoint"], "samples": records, "skipped": skipped}, indent=2) + "\n"
    )
    return records
