"""Share of complete samples with and without the JPEG grammar, for a checkpoint and for its untrained twin.

For each model (the checkpoint, and a model of the same shape freshly initialised), each temperature, with the
grammar on and off, it samples through :func:`jpeglm.generation.complete` (the pipeline ``jpeglm generate``, the
gallery and FID use): ``--samples`` unconditional samples, and completions of the photos in tests/fixtures (and
their mirror images) cut at ``--ratio``, with top-k off (all ids) and the whole context as budget. Printed: one
row per setting with the share of samples that decode as complete streams, and the mean new tokens. Target: 100%
with the grammar, every time. The grammar's share is measured, not assumed: each sample is decoded by
``JpegCodec.decode`` from the bytes the model wrote.

    python benchmarks/bench_grammar.py --checkpoint runs/jpeg_tiny/checkpoints/last.ckpt [--temperatures 0.4,0.7,1.0]
        [--samples 8] [--ratio 0.5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from PIL import ImageOps

from jpeglm.checkpoints import load_model
from jpeglm.generation import complete
from jpeglm.vocabulary import pick_modality

PHOTOS = sorted((Path(__file__).parents[1] / "tests" / "fixtures" / "photos").glob("*.jpg"))


def untrained(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with freshly initialised weights (the same shape and vocabulary)."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(0)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh


def prompts(codec: object) -> list[bytes]:
    """The fixture photos and their mirror images, encoded with the checkpoint's codec."""
    from PIL import Image

    streams = []
    for path in PHOTOS:
        with Image.open(path) as im:
            streams += [codec.encode(im), codec.encode(ImageOps.mirror(im))]
    return streams


def row(model: torch.nn.Module, modality: object, streams: list[bytes] | None, **sampling: object) -> str:
    began = time.perf_counter()
    if streams is None:
        done = complete(model, modality, num_samples=sampling.pop("samples"), **sampling)
    else:
        sampling.pop("samples")
        done = complete(model, modality, streams, **sampling)
    share = sum(c.complete for c in done) / len(done)
    tokens = sum(c.new_tokens for c in done) / len(done)
    return f"{share:8.0%} {tokens:10.0f} {time.perf_counter() - began:7.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--temperatures", default="0.4,0.7,1.0")
    parser.add_argument("--samples", type=int, default=8, help="unconditional samples per setting")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained, modalities = load_model(args.checkpoint, "cpu")
    modality = pick_modality(modalities, "jpeg")
    streams = prompts(modality.codec)
    models = {"checkpoint": trained, "untrained": untrained(trained)}
    print(f"{'model':<11} {'temp':>5} {'prompt':<14} {'grammar':<8} {'complete':>8} {'new tokens':>10} {'time':>9}")
    for name, model in models.items():
        for temperature in (float(t) for t in args.temperatures.split(",")):
            for kind, given in (("unconditional", None), (f"ratio {args.ratio:g}", streams)):
                for constrain in (False, True):
                    sampling = {"temperature": temperature, "top_k": None, "seed": 0, "constrain": constrain}
                    sampling.update(samples=args.samples, batch_size=8)
                    if given is not None:
                        sampling["ratio"] = args.ratio
                    figures = row(model, modality, given, **sampling)
                    print(f"{name:<11} {temperature:>5.1f} {kind:<14} {'on' if constrain else 'off':<8} {figures}")


if __name__ == "__main__":
    main()
