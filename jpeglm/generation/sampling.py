"""The token loop: batched sampling from a CodecLM (or any litgpt ``GPT``) with litgpt's KV cache.

Most callers want :func:`jpeglm.generation.complete` (pipeline.py), which builds the prompts, mask and stop
from a :class:`~jpeglm.vocabulary.Modality` and decodes what the model writes; this module is the loop under it.

:func:`generate` continues a batch of prompts one token per step. Prompts may differ in length: the
shortest common length is prefilled for the whole batch at once, then every sequence advances one
position per step, and a sequence still inside its prompt is fed its own next prompt id instead of a
sampled one. Sequences are never padded (all start at position 0), so the cache holds for each one
exactly what prefilling its prompt alone would have put there.

The model knows nothing about codecs; the codec-aware parts come from the caller:

- ``allowed``: which ids may be drawn, e.g. :func:`modality_mask` / :func:`tokenizer_mask` (inside an
  image only the JPEG tokenizer's BPE ids and eos; never pad, bos, another modality's tag or ids).
- ``stop``: when a sequence is done, e.g. :func:`codec_stop` (the codec says the image or clip is whole).

Prompts (:func:`make_prompt`): ``[bos, tag]`` for an unconditional sample, ``[bos, tag] +
tokenizer.encode(codec.prompt(stream, ...))`` to complete a partial image or clip.

Sampling is reproducible from ``seed`` (prompt ``i`` draws from its own ``torch.Generator``, seeded ``seed + i``,
on the model's device). With an FSDP2
sharded model call :func:`generate` on every rank with the same prompts and seed: every rank runs the
same forwards and draws the same ids; nothing here depends on the rank.

FSDP2 (:func:`gathered`): :func:`generate` all-gathers the parameters once (one collective per sharded module),
runs every forward on the gathered parameters, and reshards at the end. Left to itself FSDP2 gathers every
block again for every forward, i.e. for every generated token (measured: 257 all-gathers for 64 tokens with 4
blocks on 2 ranks, 5 with :func:`gathered`). The price is the whole model unsharded in memory while sampling,
in the compute dtype (bf16 under a bf16 ``MixedPrecisionPolicy``: 2 bytes a parameter).

The KV cache is allocated in the dtype the model computes in (:func:`compute_dtype`: bf16 under that policy,
though the stored parameters are fp32); :func:`kv_cache_bytes` says how large it is.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from litgpt import GPT, Config

from jpeglm import _compat
from jpeglm.generation import decode
from jpeglm.tokenizer import BOS_ID, EOS_ID, NUM_SPECIAL, CodecTokenizer

_PREFILL_CHUNK = 1024  # positions per forward when filling the KV cache with the prompts
_LAZY_DRAWS = 8  # draws a row tries under a constraint that answers id by id, before its mask

Stop = Callable[[list[int]], int | None]
"""Called with a sequence (prompt + ids generated so far) after each generated id: a length to cut it to
(which ends it), or None to go on."""


# ---------------------------------------------------------------------- sampling


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Draw one id per row of ``logits``; ids whose logit is -inf are never drawn.

    Args:
        logits: (B, V) unnormalised log-probabilities.
        temperature: divides the logits; 0 takes the most likely id (greedy, no randomness).
        top_k: keep only the ``top_k`` most likely ids of each row (None: all).
        top_p: then keep the smallest set of most likely ids whose probability reaches ``top_p``
            (nucleus sampling; 1.0 keeps all).
        generator: the source of randomness, for draws reproducible from a seed; a sequence of generators,
            one per row, makes each row's draw depend on its own generator only (not on the other rows).

    Returns:
        (B,) int64 ids.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()  # (B, V)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = _keep_top_k(logits, top_k)
    if top_p < 1.0:
        logits = _keep_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)
    if len(generator) != len(probs):
        raise ValueError(f"one generator per row: got {len(generator)} for {len(probs)} rows")
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator, strict=True)])


def _keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) logits with all but the ``k`` largest of each row set to -inf."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    values, indices = torch.topk(logits, min(k, logits.size(-1)))  # (B, k) each
    # Scatter the k winners into -inf rather than nanoGPT's `torch.where(logits < values[:, [-1]], -inf, ...)`:
    # that keeps every id tied with the k-th, so more than k (litgpt's comment on top-k collisions).
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def _keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) logits outside each row's nucleus (the most likely ids that together reach ``p``) set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely ids: 0 for the top id, which always stays
    drop = before >= p  # (B, V), in sorted order
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


class Constraint(Protocol):
    """Which ids each running sequence may draw next, from what it holds so far (e.g. a grammar of the stream).

    Called before each draw with the running sequences (each one's prompt and the ids generated so far; the
    same list object, grown, from step to step) and how many ids each may still draw, this one included;
    returns an (A, vocab_size) bool mask, at least one id allowed per row. Rows still inside a longer prompt are
    given the prompt's next id whatever the mask says.
    """

    def __call__(self, sequences: list[list[int]], remaining: list[int]) -> torch.Tensor: ...


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance for :func:`generate`: each prompt's unconditional twin, and the scale.

    The twins run in the same batch and KV cache as the prompts (the batch doubles). At each step the logits of
    prompt ``i`` and of its twin are mixed as ``uncond + scale * (cond - uncond)`` before the mask, temperature,
    top-k and top-p; the id drawn from the mix is appended to both, so both hold the same new ids. Scale 1 is
    plain conditional sampling, 0 unconditional. With ``start``, a sequence's first ``start`` new ids are drawn
    from its conditional logits alone (a guidance interval: at an image's first ids the unconditional branch knows
    least, and mixing there broke the quick start's first blocks into noise; see the README's caption section).
    A twin shorter than its prompt waits at position 0 (it is fed its first id again) until the two are level, so
    neither is padded: each computes what it would compute alone.

    Attributes:
        prompts: the unconditional prompt of each prompt (e.g. ``[bos, image tag]`` for a caption's
            ``[bos, text tag, caption..., image tag]``), in the same order.
        scale: the guidance scale ``s``.
        start: new ids each sequence draws before guidance starts (0: from its first).
    """

    prompts: Sequence[Sequence[int]]
    scale: float
    start: int = 0

    def mix(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """(R, V) logits ``uncond + scale * (cond - uncond)`` (ids masked to -inf in either stay -inf)."""
        if self.scale == 1.0:
            return cond
        mixed = uncond + self.scale * (cond - uncond)
        return mixed.masked_fill(torch.isinf(cond) | torch.isinf(uncond) | torch.isnan(mixed), float("-inf"))


@dataclass
class _Sampler:
    """Draws the next id of each running sequence from the model's logits, under the ``allowed`` mask."""

    temperature: float
    top_k: int | None
    top_p: float
    generators: list[torch.Generator]  # one per prompt
    vocab_size: int
    allowed: torch.Tensor | Constraint | None  # (V,) or (B, V) bool, or a constraint

    guidance: Guidance | None = None
    max_new_tokens: int = 0  # the budget ``remaining`` counts down from (where guidance's ``start`` is counted)

    def __call__(
        self,
        logits: torch.Tensor,
        prompts: list[int],
        sequences: list[list[int]],
        remaining: list[int],
        reading: list[bool] | None = None,
    ) -> torch.Tensor:
        """(A,) ids drawn for the running rows; rows still ``reading`` their prompt draw from a scratch generator, so
        a sequence's own generator serves its new ids only, whatever the other prompts of the batch."""
        logits = logits[:, : self.vocab_size]  # (A, V): the padding columns of the head are no ids
        reading = reading or [False] * len(prompts)
        if self.guidance is None:
            return self._draw(logits, prompts, sequences, remaining, reading)
        # Rows of prompt i >= n are the unconditional twins of prompt i - n: one draw per pair, from the mixed logits.
        n, row_of = len(self.guidance.prompts), {p: r for r, p in enumerate(prompts)}
        cond = [r for r, p in enumerate(prompts) if p < n]
        twins = [row_of[prompts[r] + n] for r in cond]
        mixed = self.guidance.mix(logits[cond].float(), logits[twins].float())  # (A / 2, V)
        if self.guidance.start:  # rows still before their guidance interval draw from their conditional logits
            early = [self.max_new_tokens - remaining[r] < self.guidance.start for r in cond]
            mixed = torch.where(torch.tensor(early, device=mixed.device)[:, None], logits[cond].float(), mixed)
        pick = [prompts[r] for r in cond], [sequences[r] for r in cond], [remaining[r] for r in cond]
        drawn = self._draw(mixed, *pick, [reading[r] for r in cond])  # (A / 2,)
        ids = torch.empty(len(prompts), dtype=torch.long, device=logits.device)
        ids[cond], ids[twins] = drawn, drawn
        return ids

    def _draw(
        self,
        logits: torch.Tensor,
        prompts: list[int],
        sequences: list[list[int]],
        remaining: list[int],
        reading: list[bool],
    ) -> torch.Tensor:
        scratch = torch.Generator(device=logits.device)
        generators = [scratch if busy else self.generators[i] for i, busy in zip(prompts, reading, strict=True)]
        lazy = self.temperature == 0 or (self.top_k is None and self.top_p == 1.0)
        if lazy and callable(getattr(self.allowed, "allows", None)):
            return self._draw_lazily(logits, sequences, remaining, reading, generators)
        if callable(self.allowed):
            allowed = self.allowed(sequences, remaining).to(logits.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        elif self.allowed is not None:
            allowed = self.allowed if self.allowed.dim() == 1 else self.allowed[prompts]
            logits = logits.masked_fill(~allowed, float("-inf"))
        return sample_logits(logits, self.temperature, self.top_k, self.top_p, generators)  # (A,)

    def _draw_lazily(
        self,
        logits: torch.Tensor,
        sequences: list[list[int]],
        remaining: list[int],
        reading: list[bool],
        generators: list[torch.Generator],
    ) -> torch.Tensor:
        """Draw from all ids, asking the constraint about the drawn id alone (``allowed.allows``, far cheaper than
        its masks); a row whose draw is refused tries up to :data:`_LAZY_DRAWS` draws in all, then draws under its
        mask. Exact: ``t`` drawn from ``p`` (softmax of the logits over ``temperature``), kept if allowed, else
        drawn again the same way (k times), else drawn from ``p`` on the allowed set ``A``, has the law
        ``p(t) (1 + q + ... + q^(k-1)) + q^k p(t) / p(A) = p(t) / p(A)`` (``q = 1 - p(A)``) of a draw under the
        mask; greedy: the argmax, if allowed, is the allowed argmax. Without top-k and top-p only (theirs depend on
        the whole allowed set)."""
        if self.temperature == 0:
            tries = logits.argmax(dim=-1, keepdim=True)  # (A, 1)
        else:
            probs = (logits.float() / self.temperature).softmax(dim=-1)  # (A, V)
            pairs = zip(probs, generators, strict=True)
            tries = torch.stack([torch.multinomial(p, _LAZY_DRAWS, replacement=True, generator=g) for p, g in pairs])
        drawn = tries.tolist()
        ids = [row[0] for row in drawn]
        rows = [r for r, busy in enumerate(reading) if not busy]  # rows reading their prompt keep no draw
        for k in range(tries.shape[1]):
            fine = self.allowed.allows(
                [sequences[r] for r in rows], [remaining[r] for r in rows], [drawn[r][k] for r in rows]
            )
            for r, ok in zip(rows, fine, strict=True):
                ids[r] = drawn[r][k] if ok else ids[r]
            rows = [r for r, ok in zip(rows, fine, strict=True) if not ok]
            if not rows:
                break
        out = torch.tensor(ids, device=logits.device)  # (A,)
        if rows:
            allowed = self.allowed([sequences[r] for r in rows], [remaining[r] for r in rows]).to(logits.device)
            masked = logits[rows].masked_fill(~allowed, float("-inf"))
            out[rows] = sample_logits(masked, self.temperature, None, 1.0, [generators[r] for r in rows])
        return out


# ---------------------------------------------------------------------- generate


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | Sequence[int] = 0,
    allowed: torch.Tensor | Constraint | None = None,
    stop: Stop | None = None,
    eos_id: int | None = EOS_ID,
    use_kv_cache: bool = True,
    on_step: Callable[[int], None] | None = None,
    guidance: Guidance | None = None,
) -> list[list[int]]:
    """Continue every prompt with up to ``max_new_tokens`` sampled ids, all prompts in one batch.

    A sequence ends at ``eos_id`` (kept as its last id), when ``stop`` cuts it, or after ``max_new_tokens``
    new ids; ended sequences leave the batch. The model runs in eval mode without autograd; its training
    mode is restored and the KV cache cleared afterwards. An FSDP2-sharded model's parameters are gathered once
    for the whole call (:func:`gathered`); the KV cache is in the dtype the model computes in (:func:`compute_dtype`).

    Args:
        model: a litgpt ``GPT``, or a module holding one as ``.model`` (:class:`~jpeglm.model.CodecLM`).
        prompts: the ids to continue, at least one each (e.g. ``[bos, tag]``); lengths may differ.
        max_new_tokens: most ids generated per sequence.
        temperature, top_k, top_p: see :func:`sample_logits` (temperature 0 is greedy).
        seed: prompt ``i`` draws from its own generator, seeded ``seed + i``: the same seed gives the same ids
            (on every rank), and a sequence's draws do not depend on the other prompts of the batch (up to
            floating-point differences between batch shapes). A sequence gives each prompt's seed.
        allowed: bool (vocab_size,), or (len(prompts), vocab_size): the ids that may be drawn (e.g.
            :func:`tokenizer_mask`); or a :class:`Constraint`, asked at every step. The head's padding
            columns beyond ``vocab_size`` are never drawn.
        stop: called after each generated id with the sequence so far (the same list, grown): a returned
            length cuts the sequence to that many ids (never into the prompt) and ends it (:func:`codec_stop`).
        eos_id: the id that ends a sequence (None: no id does).
        use_kv_cache: False recomputes the whole forward at every step (the same ids, slower).
        on_step: called after each step with the number of ids it generated (sequences past their prompt).
        guidance: classifier-free guidance (:class:`Guidance`); ``allowed``, ``stop`` and eos see the prompts.

    Returns:
        One list per prompt: the prompt (an exact prefix) followed by the generated ids.
    """
    gpt = model.model if isinstance(getattr(model, "model", None), GPT) else model
    prompts = _check_arguments(gpt, model, prompts, max_new_tokens)
    device = gpt.lm_head.weight.device
    generators = _generators(seed, len(prompts), device)
    mask = allowed if callable(allowed) else _check_allowed(allowed, gpt.config.vocab_size, len(prompts), device)
    sampler = _Sampler(temperature, top_k, top_p, generators, gpt.config.vocab_size, mask, guidance, max_new_tokens)
    rows, delays = _guided_rows(gpt, prompts, max_new_tokens, guidance, use_kv_cache)
    training = model.training
    model.eval()
    try:
        with _without_autograd(gpt), gathered(model):
            out = _generate(gpt, rows, max_new_tokens, sampler, stop, eos_id, use_kv_cache, on_step, delays)
        return out if delays is None else _unlead(out, delays)[: len(prompts)]
    finally:
        gpt.clear_kv_cache()
        model.train(training)


def _guided_rows(
    gpt: GPT, prompts: list[list[int]], max_new_tokens: int, guidance: Guidance | None, use_kv_cache: bool
) -> tuple[list[list[int]], list[int] | None]:
    """The batch's rows (the prompts, then their unconditional twins) and each row's delay.

    The shorter of a pair is led by copies of its first id, so both reach their new ids at the same step (their
    positions: :func:`_positions`)."""
    if guidance is None:
        return prompts, None
    twins = _check_arguments(gpt, gpt, guidance.prompts, max_new_tokens)
    if len(twins) != len(prompts):
        raise ValueError(f"guidance needs one unconditional prompt per prompt: got {len(twins)} for {len(prompts)}")
    if not use_kv_cache:
        raise ValueError("guidance runs on the KV cache (use_kv_cache=True)")
    level = [max(len(a), len(b)) for a, b in zip(prompts, twins, strict=True)]
    rows = prompts + twins
    delays = [length - len(row) for length, row in zip(level + level, rows, strict=True)]
    return [[row[0]] * delay + row for row, delay in zip(rows, delays, strict=True)], delays


def _unlead(rows: list[list[int]], delays: list[int]) -> list[list[int]]:
    """The rows without the copies of their first id that led them (:func:`_guided_rows`)."""
    return [row[delay:] for row, delay in zip(rows, delays, strict=True)]


def _generators(seed: int | Sequence[int], count: int, device: torch.device) -> list[torch.Generator]:
    """One generator per prompt: seeded ``seed + i``, or with the given seeds."""
    seeds = [seed + i for i in range(count)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"give one seed, or one per prompt: got {len(seeds)} seeds for {count} prompts")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _check_arguments(
    gpt: Any, model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """The prompts as lists of ints, once the model, prompts and budget are known to fit together."""
    if not isinstance(gpt, GPT):
        raise TypeError(f"expected a litgpt GPT or a module holding one as .model (configured), got {type(model)}")
    prompts = [[int(i) for i in p] for p in prompts]
    if not prompts or not all(prompts):
        raise ValueError("give at least one prompt, each of at least one id (e.g. [bos, tag])")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > gpt.max_seq_length:
        raise ValueError(
            f"the longest prompt ({longest} ids) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {gpt.max_seq_length} tokens"
        )
    return prompts


def _without_autograd(gpt: GPT) -> contextlib.AbstractContextManager:
    """``torch.inference_mode()``, or ``torch.no_grad()`` for an FSDP2-sharded model: FSDP2 reuses the buffers
    it all-gathers parameters into, and ones made under inference mode break the next training step
    ("Inplace update to inference tensor outside InferenceMode", measured with torch 2.14 on CPU)."""
    return torch.no_grad() if _is_fsdp2(gpt) else torch.inference_mode()


def _is_fsdp2(gpt: GPT) -> bool:
    return bool(_fsdp2_modules(gpt))


def _fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2-sharded modules in ``model`` (``fully_shard``), the outermost first."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Inside, an FSDP2-sharded ``model``'s parameters are all-gathered, once; at exit they are resharded.

    Each sharded module (``fully_shard``: every block and the root) is unsharded (``FSDPModule.unshard``, one
    all-gather each, in the ``MixedPrecisionPolicy``'s ``param_dtype``) and keeps its parameters after each
    forward, so the forwards inside run no collective at all; at exit each is resharded
    (``FSDPModule.reshard``) and gets back its own ``reshard_after_forward`` setting. The weights are untouched
    (the sharded ones are the originals; the gathered copies are freed) and training goes on as before.
    Collective: every rank must enter and leave it together. Use it without autograd (``torch.no_grad()``,
    which :func:`generate` does). A model without FSDP2 modules passes through unchanged.
    """
    modules = _fsdp2_modules(model)
    if not modules:
        yield
        return
    with _compat.fsdp2_kept_unsharded(modules):
        try:
            for module in modules:
                module.unshard()
            yield
        finally:
            for module in modules:
                module.reshard()


def compute_dtype(gpt: GPT) -> torch.dtype:
    """The dtype ``gpt``'s attention computes keys and values in, which its KV cache should hold.

    The autocast dtype when autocast is on for the model's device; otherwise the dtype of the attention's
    weights. For an FSDP2 model call it inside :func:`gathered`: the gathered weights have the
    ``MixedPrecisionPolicy``'s ``param_dtype`` (bf16, say), while the sharded ones keep the stored dtype (fp32).
    """
    weight = gpt.transformer.h[0].attn.qkv.weight if len(gpt.transformer.h) else gpt.lm_head.weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def kv_cache_bytes(config: Config, batch_size: int, max_seq_length: int, dtype: torch.dtype) -> int:
    """Bytes of litgpt's KV cache for ``batch_size`` sequences of up to ``max_seq_length`` positions.

    Keys and values for every layer: 2 x layers x batch x query groups x positions x head size x bytes per
    element (litgpt's ``GPT.set_kv_cache`` for a model with full rotary embeddings, as Llama's).
    """
    elements = 2 * config.n_layer * batch_size * config.n_query_groups * max_seq_length * config.head_size
    return elements * dtype.itemsize


def _generate(
    gpt: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampler: _Sampler,
    stop: Stop | None,
    eos_id: int | None,
    use_kv_cache: bool,
    on_step: Callable[[int], None] | None = None,
    delays: list[int] | None = None,
) -> list[list[int]]:
    outputs = [list(p) for p in prompts]
    if max_new_tokens == 0:
        return outputs
    lengths = [len(p) for p in prompts]
    total = max(lengths) + max_new_tokens
    device = gpt.lm_head.weight.device
    tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)  # (A, total): prompts, then draws
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    lag = None if delays is None else torch.tensor(delays, device=device)  # (A,): a row's position is pos - lag
    running = list(range(len(prompts)))  # the prompt of each batch row
    if use_kv_cache:
        gpt.set_kv_cache(batch_size=len(prompts), max_seq_length=total, device=device, dtype=compute_dtype(gpt))
    forward = _cached_forward if use_kv_cache else _full_forward
    if use_kv_cache and decode.supports(gpt):  # one position per step without litgpt's per-module overhead
        forward = functools.partial(_decode_forward, layers=decode.plan(gpt))
    twins = len(prompts) if sampler.guidance is None else len(sampler.guidance.prompts)  # rows >= twins: guidance
    start = min(lengths)
    logits = _prefill(gpt, tokens, start, use_kv_cache, lag)  # (A, padded V)
    for pos in range(start, total):
        left = [max_new_tokens - max(pos - lengths[i], 0) for i in running]  # ids each may still draw, this one too
        reading = [pos < lengths[i] for i in running]  # rows still inside their prompt
        ids = sampler(logits, running, [outputs[i] for i in running], left, reading)  # (A,)
        if any(reading):  # a prompt's own ids until it is used up
            ids = torch.where(torch.tensor(reading, device=device), tokens[:, pos], ids)
        tokens[:, pos] = ids
        ended: dict[int, bool] = {}
        for i, token in zip(running, tokens[:, pos].tolist(), strict=True):
            if i >= twins and pos >= lengths[i]:  # an unconditional twin holds its prompt's ids and ends with it
                outputs[i].append(token)
                ended[i] = ended[i - twins]
            elif i >= twins:
                ended[i] = False
            else:
                ended[i] = pos >= lengths[i] and _extend(outputs[i], token, lengths[i], max_new_tokens, eos_id, stop)
        if on_step is not None:
            on_step(sum(pos >= lengths[i] for i in running if i < twins))
        if all(ended.values()):
            break
        if any(ended.values()):
            keep = [row for row, i in enumerate(running) if not ended[i]]
            tokens = _keep_rows(gpt, tokens, keep, pos + 1, use_kv_cache)
            lag = None if lag is None else lag[keep]
            running = [running[row] for row in keep]
        logits = forward(gpt, tokens, pos, pos + 1, lag)
    return outputs


def _extend(
    sequence: list[int], token: int, prompt_length: int, max_new_tokens: int, eos_id: int | None, stop: Stop | None
) -> bool:
    """Append a generated id to ``sequence`` (in place); True when the sequence has ended."""
    sequence.append(token)
    if token == eos_id:
        return True
    if stop is not None:
        cut = stop(sequence)
        if cut is not None:
            del sequence[max(cut, prompt_length) :]
            return True
    return len(sequence) - prompt_length >= max_new_tokens


def _prefill(
    gpt: GPT, tokens: torch.Tensor, length: int, use_kv_cache: bool, lag: torch.Tensor | None = None
) -> torch.Tensor:
    """Run the first ``length`` positions of every sequence: (A, padded V) logits at ``length - 1``.

    With the cache, in chunks of ``_PREFILL_CHUNK`` positions: litgpt's attention under a mask materialises
    (A, heads, T, T) scores, too much for a long video prompt in one go.
    """
    if not use_kv_cache:
        return _full_forward(gpt, tokens, 0, length)
    for begin in range(0, length, _PREFILL_CHUNK):
        logits = _cached_forward(gpt, tokens, begin, min(begin + _PREFILL_CHUNK, length), lag)
    return logits


def _positions(begin: int, end: int, lag: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The positions that steps ``begin:end`` write: (T,) for all rows alike, or (A, T) for rows that lag behind
    (guidance: a row lagging ``d`` steps writes position ``step - d``, and position 0 again while ``step < d``)."""
    steps = torch.arange(begin, end, device=device)  # (T,)
    return steps if lag is None else (steps[None, :] - lag[:, None]).clamp(min=0)  # (A, T)


def _cached_forward(
    gpt: GPT, tokens: torch.Tensor, begin: int, end: int, lag: torch.Tensor | None = None
) -> torch.Tensor:
    """Run steps ``begin:end`` of ``tokens`` (A, total) on the KV cache: (A, padded V) logits at ``end - 1``."""
    input_pos = _positions(begin, end, lag, tokens.device)
    return gpt(tokens[:, begin:end], input_pos=input_pos, input_pos_maxp1=end)[:, -1]


def _decode_forward(
    gpt: GPT, tokens: torch.Tensor, begin: int, end: int, lag: torch.Tensor | None = None, layers: list | None = None
) -> torch.Tensor:
    """:func:`_cached_forward` of one step (``end == begin + 1``): :func:`.decode.decode_step` on its ``layers``."""
    pos = begin if lag is None else _positions(begin, end, lag, tokens.device)[:, 0]  # int, or (A,) per row
    return decode.decode_step(gpt, tokens[:, begin], pos, layers)


def _full_forward(
    gpt: GPT, tokens: torch.Tensor, begin: int, end: int, lag: torch.Tensor | None = None
) -> torch.Tensor:
    """Recompute positions ``0:end`` of ``tokens`` (A, total): (A, padded V) logits at ``end - 1`` (no cache)."""
    return gpt(tokens[:, :end])[:, -1]


def _keep_rows(gpt: GPT, tokens: torch.Tensor, keep: list[int], length: int, use_kv_cache: bool) -> torch.Tensor:
    """Drop ended sequences from the batch: ``tokens``' rows, and the first ``length`` cache entries of each layer."""
    rows = torch.tensor(keep, device=tokens.device)
    if use_kv_cache:
        # litgpt's KVCache uses its first `batch size` rows: move the kept ones there (B, groups, positions, head).
        for block in gpt.transformer.h:
            cache = block.attn.kv_cache
            cache.k[: len(keep), :, :length] = cache.k[rows, :, :length]
            cache.v[: len(keep), :, :length] = cache.v[rows, :, :length]
    return tokens[rows]


def _check_allowed(
    allowed: torch.Tensor | None, vocab_size: int, batch: int, device: torch.device
) -> torch.Tensor | None:
    if allowed is None:
        return None
    allowed = torch.as_tensor(allowed, device=device)
    if allowed.dtype != torch.bool or allowed.shape not in ((vocab_size,), (batch, vocab_size)):
        raise ValueError(
            f"allowed must be a bool mask of shape ({vocab_size},) or ({batch}, {vocab_size}) over the model's "
            f"ids, got {allowed.dtype} {tuple(allowed.shape)}"
        )
    if not allowed.any(dim=-1).all():
        raise ValueError("allowed leaves no id to draw (for some prompt)")
    return allowed


# ---------------------------------------------------------------------- codec-aware helpers


def modality_mask(num_ids_model: int, first_id: int, last_id: int, eos_id: int | None = EOS_ID) -> torch.Tensor:
    """(num_ids_model,) bool mask for :func:`generate`: True for ids in ``[first_id, last_id)`` and ``eos_id``."""
    if not 0 <= first_id < last_id <= num_ids_model:
        raise ValueError(f"need 0 <= first_id < last_id <= {num_ids_model}, got [{first_id}, {last_id})")
    mask = torch.zeros(num_ids_model, dtype=torch.bool)
    mask[first_id:last_id] = True
    if eos_id is not None:
        mask[eos_id] = True
    return mask


def tokenizer_mask(tokenizer: CodecTokenizer, num_ids_model: int, offset: int = 0) -> torch.Tensor:
    """The ids that may follow inside one modality's item: its tokenizer's BPE ids (moved by ``offset`` in a
    mixed vocabulary, see :meth:`CodecTokenizer.shift`) and eos."""
    return modality_mask(num_ids_model, NUM_SPECIAL + offset, tokenizer.num_ids + offset)


def make_prompt(tokenizer: CodecTokenizer, stream: bytes = b"", offset: int = 0) -> list[int]:
    """``[bos, tag]`` followed by the ids of ``stream`` (moved by ``offset``): an empty stream gives the
    unconditional prompt; for a completion pass ``codec.prompt(stream, ...)``. A tokenizer without a tag
    (``tag_id`` None: the released JPEG-LM vocabulary) gives ``[bos]`` and the ids."""
    ids = tokenizer.shift(np.asarray(tokenizer.encode(stream), dtype=np.int64), offset)
    tag = [] if tokenizer.tag_id is None else [tokenizer.tag_id]
    return [BOS_ID, *tag, *ids.tolist()]


def token_pieces(tokenizer: CodecTokenizer, offset: int = 0) -> list[bytes]:
    """The bytes each model id stands for, indexed by id; empty for special ids and other modalities' ids."""
    return [b""] * (NUM_SPECIAL + offset) + [tokenizer.token_bytes(i) for i in range(NUM_SPECIAL, tokenizer.num_ids)]


def sequence_bytes(ids: Sequence[int], tokenizer: CodecTokenizer, offset: int = 0, codec: Any = None) -> bytes:
    """The codec stream a generated sequence holds; with ``codec``, cut at the end of its first item.

    The cut drops the bytes a :func:`codec_stop` cut may keep past the item's end (its last id can hold
    bytes of both), so ``codec.decode`` sees exactly one item.
    """
    pieces = token_pieces(tokenizer, offset)
    stream = b"".join(pieces[i] for i in ids if 0 <= i < len(pieces))
    end = codec.stream_end(stream) if codec is not None else None
    return stream if end is None else stream[:end]


@dataclass
class _Running:
    """The bytes of one sequence so far, and the byte length after each of its ids."""

    ids: list[int]
    data: bytearray = field(default_factory=bytearray)
    ends: list[int] = field(default_factory=list)


class CodecStop:
    """A ``stop`` for :func:`generate` that ends a sequence once its codec stream holds a whole item.

    It keeps a running byte buffer per sequence (each call adds only the bytes of the new ids) and asks
    ``codec.stream_end`` where the first item (image, clip) ends. Ids need not end where the item ends: the
    cut keeps every id up to and including the one that holds the item's last byte, so the kept ids may
    decode to a few bytes past the item (:func:`sequence_bytes` with the codec drops them).

    Make one per :func:`generate` call: it remembers the sequences it has seen (by identity; generate passes
    each sequence's own growing list).

    Args:
        codec: a codec with ``stream_end(stream) -> int | None`` (JpegCodec, AvcCodec).
        tokenizer: the tokenizer of that codec's streams.
        offset: where its BPE ids sit in a mixed vocabulary (see :meth:`CodecTokenizer.shift`).
    """

    def __init__(self, codec: Any, tokenizer: CodecTokenizer, offset: int = 0) -> None:
        self.codec = codec
        self.pieces = token_pieces(tokenizer, offset)
        self._running: dict[int, _Running] = {}

    def __call__(self, ids: list[int]) -> int | None:
        running = self._update(ids)
        end = self.codec.stream_end(bytes(running.data))
        if end is None:
            return None
        del self._running[id(ids)]  # the sequence ends here
        return bisect.bisect_left(running.ends, end) + 1  # the first id whose bytes reach the end, included

    def _update(self, ids: list[int]) -> _Running:
        running = self._running.get(id(ids))
        if running is None or running.ids is not ids or len(ids) < len(running.ends):
            running = self._running[id(ids)] = _Running(ids)  # a new sequence (or not one grown in place)
        for token in ids[len(running.ends) :]:
            running.data += self.pieces[token] if 0 <= token < len(self.pieces) else b""
            running.ends.append(len(running.data))
        return running


def codec_stop(codec: Any, tokenizer: CodecTokenizer, offset: int = 0) -> CodecStop:
    """A ``stop`` for :func:`generate`: cut each sequence after the ids that cover its first whole item.

    The cut length counts the whole sequence (prompt included, so a completion's item starts in its
    prompt); the id holding the item's last byte is kept, see :class:`CodecStop`.
    """
    return CodecStop(codec, tokenizer, offset)


class GrammarConstraint:
    """A :class:`Constraint` that keeps every sequence a valid prefix of its codec's streams (``codec.grammar``).

    Each sequence's grammar state is kept between steps (by the identity of its growing list, as
    :class:`CodecStop` does) and moved by its new ids only; the mask of a state is the grammar's (cached there),
    restricted so that the stream can still end within the ids the sequence may still draw. Make one per
    :func:`generate` call. :meth:`allows` answers for one drawn id per sequence without the masks, so that
    sampling without top-k and top-p draws first and builds a mask only for refused rows (exact, see
    ``_Sampler._draw_lazily``).

    Args:
        grammar: a token grammar (``start``, ``step``, ``allowed(state, budget)``), e.g.
            :class:`~jpeglm.codecs.grammar.TokenGrammar` from ``codec.grammar(tokenizer, offset, vocab_size)``.
        skip: leading ids of every sequence that are not stream bytes (``[bos, tag]``: 2; ``[bos]`` without a tag: 1),
            or a function of the sequence that says how many (a caption before the image: up to its image tag).
    """

    def __init__(self, grammar: Any, skip: int | Callable[[list[int]], int] = 2) -> None:
        self.grammar, self.skip = grammar, skip
        self._states: dict[int, tuple[list[int], int, Any]] = {}  # id(sequence) -> (sequence, ids walked, state)

    def __call__(self, sequences: list[list[int]], remaining: list[int]) -> torch.Tensor:
        pairs = zip(sequences, remaining, strict=True)
        return torch.stack([self.grammar.allowed(self.state(ids), budget) for ids, budget in pairs])  # (A, vocab_size)

    def allows(self, sequences: list[list[int]], remaining: list[int], ids: list[int]) -> list[bool]:
        """Whether each sequence may draw its id: those entries of :meth:`__call__`'s mask, without the masks
        when the grammar answers id by id (``allows(state, id, budget)``)."""
        check = getattr(self.grammar, "allows", None)
        if check is None:
            return self(sequences, remaining)[torch.arange(len(ids)), torch.tensor(ids)].tolist()
        triples = zip(sequences, remaining, ids, strict=True)
        return [check(self.state(sequence), token, budget) for sequence, budget, token in triples]

    def state(self, ids: list[int]) -> Any:
        """The grammar state after the stream bytes of ``ids`` (walking only the ids added since the last call)."""
        known = self._states.get(id(ids))
        if known is None or known[0] is not ids or known[1] > len(ids):
            known = (ids, self.skip(ids) if callable(self.skip) else self.skip, self.grammar.start)
        _, walked, state = known
        for position in range(walked, len(ids)):
            state = self.grammar.step(state, ids[position])
            if state is None:
                raise ValueError(f"id {ids[position]} at position {position} breaks the stream's grammar")
        self._states[id(ids)] = (ids, len(ids), state)
        return state
