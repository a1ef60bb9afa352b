"""One decoding step of a Llama-shaped litgpt ``GPT`` on its KV cache, without litgpt's per-module call overhead.

Sampling one token per step spends most of its time outside the arithmetic when the model is small (the quick
start's 1M-parameter model on a CPU: about 57 module calls, a rope/mask gather and several reshapes per token
per block). :func:`decode_step` computes what ``GPT.forward(idx, input_pos=[pos], input_pos_maxp1=pos+1)``
computes for one new position, for the configurations :func:`supports` accepts (Llama: RMSNorm, SwiGLU
``LLaMAMLP``, full rotary embeddings, no biases, no soft-capping, no post-norms, sequential residuals), in the
same order of operations, except attention on CPU: two matrix products instead of the fused kernel, equal within
rounding (``tests/test_generation.py`` checks the logits in fp32 and bf16; ``benchmarks/bench_generate.py`` checks
that greedy ids equal Hugging Face's). It reads the modules' weights once per generation (:func:`plan`) and
writes litgpt's own ``KVCache`` buffers, so prefill (litgpt's forward) and decoding share one cache. Anything
else (other architectures, FSDP2-sharded or compiled blocks) uses litgpt's forward unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from litgpt import GPT
from litgpt.model import Block, LLaMAMLP, RMSNorm


def supports(gpt: GPT) -> bool:
    """Whether :func:`decode_step` computes this model's forward exactly (a plain Llama-shaped litgpt GPT)."""
    c = gpt.config
    blocks = list(gpt.transformer.h)
    plain = all(type(b) is Block and type(b.norm_1) is type(b.norm_2) is RMSNorm for b in blocks)
    llama = (
        all(type(block.mlp) is LLaMAMLP for block in blocks)
        and c.rope_n_elem == c.head_size
        and not (c.bias or c.attn_bias or c.parallel_residual or c.shared_attention_norm)
        and c.attention_logit_softcapping is None
        and c.final_logit_softcapping is None
        and not c.scale_embeddings
        and not c.norm_qk
        and c.rope_indices is None
        and not c.post_attention_norm
        and not c.post_mlp_norm
        and c.sliding_window_size is None
    )
    sharded = any(hasattr(module, "unshard") for module in gpt.modules())  # FSDP2 modules: litgpt's forward
    return plain and llama and not sharded and type(gpt.transformer.ln_f) is RMSNorm


def decode_step(
    gpt: GPT, tokens: torch.Tensor, pos: int | torch.Tensor, layers: list[tuple] | None = None
) -> torch.Tensor:
    """Logits ``(A, padded V)`` for one new id per row at position ``pos``, written into the KV cache.

    Args:
        gpt: a model :func:`supports` accepts, with its KV cache set (``set_kv_cache``) for at least ``A`` rows.
        tokens: ``(A,)`` the ids at position ``pos``.
        pos: the position they take (earlier positions are in the cache); ``(A,)`` for a position per row
            (rows at earlier positions do not see the cache beyond theirs).
        layers: :func:`plan` of ``gpt`` made after ``set_kv_cache`` (None: made here, at each call).
    """
    c, rows = gpt.config, tokens.size(0)
    layers = plan(gpt) if layers is None else layers
    x = gpt.transformer.wte(tokens[:, None])  # (A, 1, C)
    where, last, mask = _where(pos, rows, tokens.device)
    cos, sin = gpt.cos[pos], gpt.sin[pos]
    cos, sin = (cos[None, None], sin[None, None]) if mask is None else (cos[:, None, None], sin[:, None, None])
    heads, groups, size = c.n_head, c.n_query_groups, c.head_size  # cos, sin: (1 or A, 1, 1, hs)
    scale = 1.0 / math.sqrt(c.attention_scores_scalar or size)
    for norm_1, qkv, proj, norm_2, fc_1, fc_2, down, cache in layers[:-1]:
        # Attention: one query per row, which sees every cached position up to its own.
        qk, v = F.linear(_rms(norm_1, x), qkv).split(((heads + groups) * size, groups * size), dim=-1)
        qk = _rope(qk.view(rows, 1, heads + groups, size).transpose(1, 2), cos, sin)  # (A, nh + ng, 1, hs)
        q, k = qk[:, :heads], qk[:, heads:]
        if cache.k.dtype != k.dtype:  # as KVCache.forward: the buffers follow the activations' dtype (autocast)
            cache.k, cache.v = cache.k.to(k.dtype), cache.v.to(v.dtype)
        cache.k[where] = k[:, :, 0] if mask is not None else k
        cache.v[where] = (
            v.view(rows, groups, size) if mask is not None else v.view(rows, 1, groups, size).transpose(1, 2)
        )
        y = _attend(q, cache.k[:rows, :, : last + 1], cache.v[:rows, :, : last + 1], mask, scale)  # (A, nh, 1, hs)
        x = x + F.linear(y.transpose(1, 2).reshape(rows, 1, heads * size), proj)
        h = _rms(norm_2, x)
        x = x + F.linear(F.silu(F.linear(h, fc_1)) * F.linear(h, fc_2), down)
    ln_f, head = layers[-1]
    return F.linear(_rms(ln_f, x), head)[:, -1]  # (A, padded V)


def _where(pos: int | torch.Tensor, rows: int, device: torch.device) -> tuple[tuple, int, torch.Tensor | None]:
    """Where the new keys go in the cache, the last position any row sees, and the (A, 1, 1, last + 1) mask of the
    positions each row sees (None when all rows are at ``pos``: every cached position is seen)."""
    if isinstance(pos, int):
        return (slice(0, rows), slice(None), slice(pos, pos + 1)), pos, None
    last = int(pos.max())
    mask = torch.arange(last + 1, device=device)[None, :] <= pos[:, None]  # (A, last + 1)
    return (torch.arange(rows, device=device), slice(None), pos), last, mask[:, None, None, :]


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query per row and head against the cache: ``(A, nh, 1, hs)`` from ``(A, ng, L, hs)`` keys and values.

    On CPU, two matrix products and a softmax, with each group's heads stacked as the rows of one product, so
    grouped keys and values are read once and never repeated: this reads the cache faster than
    ``scaled_dot_product_attention``'s flash kernel, whose tiles suit many queries, not one (4 blocks of 8 rows x 4
    heads x 1040 positions: 372 against 509 us per block, torch 2.14 on one thread; bench_generate.py: 2.1x Hugging
    Face ``generate``, from 1.7x). Elsewhere ``scaled_dot_product_attention``, as litgpt's forward (its fused
    GPU kernels were not measured against this).
    """
    rows, heads, _, size = q.shape
    groups = keys.size(1)
    if q.device.type != "cpu":
        if groups != heads and groups != 1:
            keys = keys.repeat_interleave(heads // groups, dim=1)
            values = values.repeat_interleave(heads // groups, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    scores = torch.matmul(q.reshape(rows, groups, heads // groups, size), keys.transpose(-1, -2)).float() * scale
    if mask is not None:  # (A, 1, 1, L): broadcasts over groups and their heads
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1).to(values.dtype)  # in fp32, as the fused kernels do, whatever the cache holds
    return torch.matmul(weights, values).view(rows, heads, 1, size)


def plan(gpt: GPT) -> list[tuple]:
    """What :func:`decode_step` reads of ``gpt``, looked up once per generation rather than once per step
    (``nn.Module`` attribute access is slow): each block's norms, weights and KV cache module, then the final norm
    and the head. Norms are ``(weight, eps)`` with litgpt's unit offset already added. Make it after
    ``set_kv_cache`` and while the weights stay as they are (the cache's buffers may change: it holds the modules).
    """
    blocks = [
        (_norm(b.norm_1), b.attn.qkv.weight, b.attn.proj.weight, _norm(b.norm_2), b.mlp.fc_1.weight,
         b.mlp.fc_2.weight, b.mlp.proj.weight, b.attn.kv_cache)
        for b in gpt.transformer.h
    ]  # fmt: skip
    return [*blocks, (_norm(gpt.transformer.ln_f), gpt.lm_head.weight)]


def _norm(norm: RMSNorm) -> tuple[torch.Tensor, float]:
    """An RMSNorm's effective weight (as litgpt's forward computes it, in fp32) and epsilon."""
    weight = (1 + norm.weight) if norm.add_unit_offset else norm.weight
    return weight.float(), norm.eps


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """litgpt's ``apply_rope`` for ``(A, heads, 1, hs)`` and ``(1, 1, 1, hs)`` tables."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return ((x * cos) + (rotated * sin)).to(dtype=x.dtype)


def _rms(norm: tuple[torch.Tensor, float], x: torch.Tensor) -> torch.Tensor:
    """litgpt's ``RMSNorm.forward`` with a :func:`_norm`, in the same order of operations."""
    (weight, eps), dtype = norm, x.dtype
    x = x.float()
    normed = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps)
    return (normed * weight).to(dtype=dtype)
