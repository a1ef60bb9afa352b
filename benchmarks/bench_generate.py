"""Sampling speed on CPU: jpeglm's KV-cache loop vs recomputing every step, and vs Hugging Face ``generate``.

One run, one model (saved as a jpeglm checkpoint, then loaded both ways from it):

1. KV cache vs recompute (batch 1): both sample ``--new-tokens`` ids (seeded top-k, no eos) from an unconditional
   JPEG prompt ``[bos, image]`` with :func:`jpeglm.generation.generate`; only ``use_kv_cache`` differs and the
   ids must be identical. Recomputation costs a forward over the whole sequence per step (quadratic in the
   length), the cache one token per step. Target: cache >= 10x. ``--no-recompute`` skips it.
2. jpeglm vs Hugging Face (batch ``--batch``): the checkpoint exported with ``jpeglm.export.export(...,
   format="hf")`` and loaded with ``transformers.LlamaForCausalLM.from_pretrained`` (fp32, its default
   attention and cache), both greedy (temperature 0) on the same ``--batch`` prompts of ``--prompt`` ids
   (``[bos, image]`` and random JPEG ids: equal lengths, so Hugging Face needs no padding), ``--new-tokens``
   each, no eos (Hugging Face's ``eos_token_id`` unset) and never the head's padding ids (jpeglm draws only
   below ``vocab_size``; Hugging Face gets them as ``suppress_tokens``). The ids must be identical. Target:
   jpeglm >= 2x Hugging Face's tokens/s. Each side runs --repeats times, alternating with the other; the best
   run of each counts.

3. Grammar-constrained vs unconstrained (batch ``--batch``): the quick start's images (64x64 JPEG, a 320-symbol
   tokenizer trained on the photos in tests/fixtures), a model of the same shape with that vocabulary, unconditional
   samples at temperature 1.0 over all ids, ``--grammar-tokens`` new tokens at most, through
   :func:`jpeglm.generation.complete` with ``constrain`` on and off (the same seeds). Printed: tokens/s both ways,
   their ratio, the share of complete samples both ways, the grammar's time per step (all rows of the batch: the
   checks of drawn ids and the masks built, in microseconds) and its share of the constrained run. The two runs
   do not do the same work (unconstrained samples of an untrained model draw eos early, some 80 ids in, and the
   batch shrinks; constrained ones run to the budget, the last ~150 ids under tight budget masks; and their lazy
   draws take 8 ids with replacement per row, some 9x cheaper on CPU than ``sample_logits``' one id without
   replacement, though the same law), so the target
   (at most 10% slower) is read at equal work: the constrained run's tokens/s without the grammar's time would be
   ``1 / (1 - share)`` times higher, i.e. the grammar costs a factor ``1 - share``. ``--no-grammar`` skips it.

The default model (4 layers, d=128, 4 heads, SwiGLU 512, vocab 328 as the paper's JPEG tokenizer, 1.15M
parameters) and 1024 new tokens keep the whole run under two minutes on one CPU thread. One thread by default:
on a 2-core machine shared with other jobs, two OpenMP threads per process slowed single runs down tenfold or
more at random (threads wait on each other for a busy core), which made the ratios noise.

    python benchmarks/bench_generate.py [--new-tokens 1024] [--prompt 16] [--batch 8] [--layers 4] [--dim 128]
        [--threads 1] [--repeats 3] [--no-recompute] [--no-grammar] [--grammar-tokens 400]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from jpeglm.checkpoints import load_model
from jpeglm.export import export
from jpeglm.generation import generate
from jpeglm.model import CodecLM
from jpeglm.tokenizer import BOS_ID, MODALITIES, NUM_SPECIAL, CodecTokenizer
from jpeglm.vocabulary import Modality, to_records


def save_checkpoint(path: Path, layers: int, dim: int, heads: int, vocab: int, context: int) -> None:
    """A jpeglm checkpoint of a freshly initialised model (with a tokenizer record, as export needs one)."""
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
    tokenizer = CodecTokenizer.train([bytes(range(256)) * 4], "jpeg", 280)
    vocabulary = to_records([Modality("jpeg", tokenizer)])
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "jpeglm_vocabulary": vocabulary},
        path,
    )


def timed(run: Callable[[], list[list[int]]]) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    ids = run()
    return ids, time.perf_counter() - start


def jpeglm_greedy(model: CodecLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    return generate(model, prompts, new_tokens, temperature=0, eos_id=None)


def hf_greedy(hf, prompts: list[list[int]], new_tokens: int, vocab: int, device: str = "cpu") -> list[list[int]]:
    """Hugging Face greedy generate: no eos, never the head's padding ids (rows ``vocab`` and above)."""
    ids = torch.tensor(prompts, device=device)  # (B, P): equal lengths, no padding
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no early stop, whatever eos the installed transformers assumes
            do_sample=False,
            pad_token_id=0,
            suppress_tokens=list(range(vocab, hf.config.vocab_size)),  # the head's padding rows are no ids
        )
    return out.tolist()


def recompute_rows(model: CodecLM, new_tokens: int) -> list[tuple[str, float, float]]:
    """KV cache vs recompute at batch 1 (seeded top-k): the same ids, and each one's (name, tokens/s, seconds)."""
    prompt = [[BOS_ID, MODALITIES["jpeg"]]]
    sample = {"top_k": 40, "seed": 0, "eos_id": None}
    cached, t_cached = timed(lambda: generate(model, prompt, new_tokens, use_kv_cache=True, **sample))
    full, t_full = timed(lambda: generate(model, prompt, new_tokens, use_kv_cache=False, **sample))
    assert cached == full, "the KV cache changed the sampled ids"
    return [("recompute, batch 1", new_tokens / t_full, t_full), ("KV cache, batch 1", new_tokens / t_cached, t_cached)]


def grammar_rows(args: argparse.Namespace) -> list[str]:
    """Constrained vs unconstrained sampling on the quick start's 64x64 JPEGs: the lines to print."""
    from jpeglm.codecs import JpegCodec
    from jpeglm.generation import complete, sampling

    codec = JpegCodec(size=64)
    photos = sorted((Path(__file__).parents[1] / "tests" / "fixtures" / "photos").glob("*.jpg"))
    tokenizer = CodecTokenizer.train([codec.encode(p) for p in photos], "jpeg", 320, codec_spec=codec.spec)
    modality = Modality("jpeg", tokenizer)
    torch.manual_seed(0)
    overrides = {"n_layer": args.layers, "n_embd": args.dim, "n_head": args.heads, "n_query_groups": args.heads}
    model = CodecLM(
        model_overrides={**overrides, "intermediate_size": 4 * args.dim},
        vocab_size=tokenizer.num_ids,
        seq_len=args.grammar_tokens + 2,
    )
    model.configure_model()
    spent, counts = [0.0], {"steps": 0, "rows": 0, "masks": 0}
    names = [name for name in ("__call__", "allows") if hasattr(sampling.GrammarConstraint, name)]
    patched = {name: getattr(sampling.GrammarConstraint, name) for name in names}

    def timed(name):  # the grammar's share of every step: masks (and checks of single ids, where lazy)
        def wrapper(self, sequences, *rest):
            began = time.perf_counter()
            try:
                return patched[name](self, sequences, *rest)
            finally:
                spent[0] += time.perf_counter() - began
                counts["masks"] += len(sequences) if name == "__call__" else 0

        return wrapper

    draw = sampling._Sampler._draw

    def counted(self, logits, *rest):  # sampling steps (and rows drawn) of the constrained run
        counts["steps"], counts["rows"] = counts["steps"] + 1, counts["rows"] + len(logits)
        return draw(self, logits, *rest)

    run = {"num_samples": args.batch, "batch_size": args.batch, "temperature": 1.0, "top_k": None, "seed": 0}
    run["max_new_tokens"] = args.grammar_tokens
    complete(model, modality, **{**run, "num_samples": 2, "batch_size": 2, "seed": 99})  # warm-up (other samples)
    results = {}
    for constrain in (False, True):
        for name in patched:
            setattr(sampling.GrammarConstraint, name, timed(name) if constrain else patched[name])
        sampling._Sampler._draw = counted if constrain else draw
        try:
            began = time.perf_counter()
            done = complete(model, modality, constrain=constrain, **run)
            seconds = time.perf_counter() - began
        finally:
            for name, method in patched.items():
                setattr(sampling.GrammarConstraint, name, method)
            sampling._Sampler._draw = draw
        new = sum(c.new_tokens for c in done)
        results[constrain] = (new / seconds, sum(c.complete for c in done) / len(done), seconds)
    (free, free_complete, _), (ruled, ruled_complete, ruled_seconds) = results[False], results[True]
    steps, share = max(counts["steps"], 1), spent[0] / ruled_seconds
    return [
        f"unconstrained, batch {args.batch}     {free:10.1f} tokens/s  ({free_complete:.0%} complete)",
        f"JPEG grammar, batch {args.batch}      {ruled:10.1f} tokens/s  ({ruled_complete:.0%} complete)",
        f"grammar vs unconstrained (64x64, batch {args.batch}): {ruled / free:.2f}x tokens/s end to end (unequal "
        f"work); grammar {1e6 * spent[0] / steps:.0f} us per step for the batch, {share:.0%} of the constrained run: "
        f"{1 - share:.2f}x tokens/s at equal work (target >= 0.9x); masks built for "
        f"{counts['masks'] / max(counts['rows'], 1):.0%} of the rows drawn",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=16, help="ids per prompt of the jpeglm vs HF comparison")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=328)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (see the module docstring)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, alternating; the best counts")
    parser.add_argument("--no-recompute", action="store_true", help="skip the KV cache vs recompute baseline")
    parser.add_argument("--no-grammar", action="store_true", help="skip the grammar-constrained comparison")
    parser.add_argument("--grammar-tokens", type=int, default=400, help="new tokens per grammar sample at most")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    n, batch = args.new_tokens, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model.ckpt"
        save_checkpoint(checkpoint, args.layers, args.dim, args.heads, args.vocab, context=args.prompt + n)
        model, _ = load_model(checkpoint, "cpu")  # fp32 on CPU
        hf = LlamaForCausalLM.from_pretrained(export(checkpoint, Path(tmp) / "hf", "hf"), dtype=torch.float32)
    hf.eval().generation_config.eos_token_id = None  # no id ends a sequence, as eos_id=None on jpeglm's side
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.layers} layers, d={args.dim}, {args.heads} heads, vocab {args.vocab}, {params / 1e6:.2f}M "
        f"parameters, fp32; {n} new tokens; {torch.get_num_threads()} CPU threads"
    )
    generator = torch.Generator().manual_seed(0)
    jpeg_ids = torch.randint(NUM_SPECIAL, args.vocab, (batch, args.prompt - 2), generator=generator)
    prompts = [[BOS_ID, MODALITIES["jpeg"], *row] for row in jpeg_ids.tolist()]
    jpeglm_greedy(model, prompts, 16)  # warm-up, both sides
    hf_greedy(hf, prompts, 16, args.vocab)

    rows = [] if args.no_recompute else recompute_rows(model, n)
    t_ours = t_theirs = float("inf")
    for _ in range(args.repeats):  # alternating, so a busy spell of a shared machine slows both sides alike
        ours, seconds = timed(lambda: jpeglm_greedy(model, prompts, n))
        t_ours = min(t_ours, seconds)
        theirs, seconds = timed(lambda: hf_greedy(hf, prompts, n, args.vocab))
        t_theirs = min(t_theirs, seconds)
    assert all(len(ids) == args.prompt + n for ids in ours + theirs)
    assert ours == theirs, "jpeglm and Hugging Face generate wrote different ids"
    rows += [
        (f"jpeglm, batch {batch}", batch * n / t_ours, t_ours),
        (f"HF generate, batch {batch}", batch * n / t_theirs, t_theirs),
    ]
    for name, rate, seconds in rows:
        print(f"{name:<22} {rate:10.1f} tokens/s  ({seconds:.1f} s)")
    if not args.no_recompute:
        print(
            f"KV cache vs recompute (batch 1, top-k 40): {rows[1][1] / rows[0][1]:.1f}x  (target >= 10x); ids identical"
        )
    print(
        f"jpeglm vs HF generate (batch {batch}, greedy, {args.prompt}-id prompts): {t_theirs / t_ours:.2f}x tokens/s "
        "(target >= 2x)"
    )
    print("ids identical: yes")
    if not args.no_grammar:
        print("\n".join(grammar_rows(args)))


if __name__ == "__main__":
    main()
