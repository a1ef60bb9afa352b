"""Sampling speed: litgpt's KV cache vs recomputing the whole forward at every step, same model and seed.

Both sides sample ``--new-tokens`` ids (seeded top-k sampling, no eos) from an unconditional JPEG prompt
``[bos, image]`` with :func:`jpeglm.generation.generate`; only ``use_kv_cache`` differs, and the ids must
be identical. Recomputation costs a forward over the whole sequence per step (quadratic in the length),
the cache one token per step. Then batch 1 vs batch ``--batch`` with the cache. Target: cache >= 10x.

The default model (4 layers, d=128, 4 heads, SwiGLU 512, vocab 328 as the paper's JPEG tokenizer,
1.15M parameters, context ``--new-tokens + 2``) keeps the whole run to about two minutes on one CPU
thread (measured: 28.5x, recompute 100 s of it). One thread by default: on a 2-core machine shared with
other jobs, two OpenMP threads per process slowed single runs down tenfold or more at random (threads
wait on each other for a busy core), which made the ratio noise. ``--threads 2`` on an idle machine:
23.5x in 80 s (the recompute baseline gains more from the second thread than the cached steps do).

    python benchmarks/bench_generate.py [--new-tokens 2048] [--layers 4] [--dim 128] [--batch 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from jpeglm.generation import generate
from jpeglm.model import CodecLM
from jpeglm.tokenizer import BOS_ID, MODALITIES


def build(layers: int, dim: int, heads: int, vocab: int, context: int) -> CodecLM:
    torch.manual_seed(0)
    overrides = {
        "n_layer": layers,
        "n_embd": dim,
        "n_head": heads,
        "n_query_groups": heads,
        "intermediate_size": 4 * dim,
    }
    model = CodecLM(model_overrides=overrides, vocab_size=vocab, seq_len=context)
    model.configure_model()
    return model


def timed(model: CodecLM, batch: int, new_tokens: int, use_kv_cache: bool) -> tuple[list[list[int]], float]:
    """The ids sampled for ``batch`` unconditional prompts, and the seconds it took."""
    prompts = [[BOS_ID, MODALITIES["jpeg"]]] * batch
    start = time.perf_counter()
    ids = generate(model, prompts, new_tokens, top_k=40, seed=0, eos_id=None, use_kv_cache=use_kv_cache)
    return ids, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=328)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (see the module docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens
    model = build(args.layers, args.dim, args.heads, args.vocab, context=n + 2)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.layers} layers, d={args.dim}, {args.heads} heads, vocab {args.vocab}, {params / 1e6:.2f}M "
        f"parameters; {n} new tokens from [bos, image], top-k 40, seed 0; {torch.get_num_threads()} CPU threads"
    )
    timed(model, 1, 32, use_kv_cache=True)  # warm-up

    cached, t_cached = timed(model, 1, n, use_kv_cache=True)
    full, t_full = timed(model, 1, n, use_kv_cache=False)
    assert cached == full, "the KV cache changed the sampled ids"
    batched, t_batched = timed(model, args.batch, n, use_kv_cache=True)
    assert all(len(ids) == n + 2 for ids in batched)

    rows = [
        ("recompute, batch 1", n / t_full, t_full),
        ("KV cache, batch 1", n / t_cached, t_cached),
        (f"KV cache, batch {args.batch}", args.batch * n / t_batched, t_batched),
    ]
    for name, rate, seconds in rows:
        print(f"{name:<20} {rate:10.1f} tokens/s  ({seconds:.1f} s)")
    print(f"KV cache vs recompute (batch 1): {t_full / t_cached:.1f}x  (target >= 10x); ids identical")
    print(f"batch {args.batch} vs batch 1 (KV cache): {rows[2][1] / rows[1][1]:.1f}x tokens/s")


if __name__ == "__main__":
    main()
