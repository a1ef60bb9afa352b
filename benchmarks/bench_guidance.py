"""What classifier-free guidance costs: sampling tokens/s for captions with and without guidance, same run.

Guidance runs each caption's prompt and its uncaptioned twin in one batch and one KV cache, so a batch of ``B``
captions computes ``2B`` rows per step. This prints tokens/s (new ids of the captions' samples, per second) at
scale 1 (plain conditional sampling, the baseline a user would otherwise run) and at scale 3, their ratio, and the
same with the JPEG grammar on. The model is the caption quick start's shape (4 layers, d=128) over the built-in
captioned pictures' vocabulary (64x64 JPEG, a caption BPE after it), untrained, or ``--checkpoint``'s. The caption
prompts are the built-in held-out captions (``jpeglm.caption_eval``). One thread by default (see
bench_generate.py: on a shared 2-core machine more threads made the ratios noise).

    python benchmarks/bench_guidance.py [--checkpoint last.ckpt] [--batch 8] [--new-tokens 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from jpeglm.caption_eval import HELD_OUT_SEED
from jpeglm.checkpoints import load_model
from jpeglm.data_modules import SyntheticDataModule
from jpeglm.data_modules.synthetic import procedural_caption
from jpeglm.generation import complete
from jpeglm.model import CodecLM
from jpeglm.vocabulary import pick_modality


def untrained(cache: Path) -> tuple[CodecLM, object]:
    """The caption quick start's model shape over a small captioned set's vocabulary, freshly initialised."""
    data = SyntheticDataModule(seq_len=512, batch_size=4, num_images=128, image_size=64, captions=True,
                               cache_dir=str(cache))  # fmt: skip
    torch.manual_seed(0)
    overrides = {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_query_groups": 4, "intermediate_size": 344}
    model = CodecLM(model_overrides=overrides, vocab_size=data.vocab_size, seq_len=512)
    model.configure_model()
    return model.eval(), data.modalities()[0]


def measure(model, modality, captions: list[str], scale: float, constrain: bool, new_tokens: int) -> tuple[float, int]:
    """(tokens/s, new ids) of one call drawing every caption once at ``scale``."""
    began = time.perf_counter()
    samples = complete(
        model, modality, captions=captions, cfg_scale=scale, temperature=1.0, top_k=None, seed=0,
        batch_size=len(captions), max_new_tokens=new_tokens, constrain=constrain,
    )  # fmt: skip
    tokens = sum(s.new_tokens for s in samples)
    return tokens / (time.perf_counter() - began), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a checkpoint of the caption recipe (default: an untrained model)")
    parser.add_argument("--batch", type=int, default=8, help="captions drawn at once")
    parser.add_argument("--new-tokens", type=int, default=300, help="most new ids per sample")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            model, modalities = load_model(args.checkpoint, "cpu")
            modality = pick_modality(modalities, "jpeg")
        else:
            model, modality = untrained(Path(tmp))
        size = modality.codec.size
        captions = [procedural_caption(HELD_OUT_SEED, i, size) for i in range(args.batch)]
        measure(model, modality, captions[:2], 3.0, False, 8)  # warm-up
        print(f"batch {args.batch} captions, up to {args.new_tokens} new ids each, {args.threads} thread(s)")
        print("grammar | scale 1 tokens/s | scale 3 tokens/s | ratio (guided / plain)")
        for constrain in (False, True):
            plain, _ = measure(model, modality, captions, 1.0, constrain, args.new_tokens)
            guided, _ = measure(model, modality, captions, 3.0, constrain, args.new_tokens)
            print(f"{'on' if constrain else 'off'} | {plain:.0f} | {guided:.0f} | {guided / plain:.2f}")


if __name__ == "__main__":
    main()
