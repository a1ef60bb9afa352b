"""One completion pipeline: codec streams in, decoded samples out.

:func:`complete` is the only place that turns prompts into decoded samples; the sample gallery, the FID
callback, ``jpeglm generate`` and ``jpeglm evaluate`` all call it. It owns, for one modality of a model:

- the prompts: each full stream cut with ``codec.prompt(stream, ratio)`` (the paper's protocol), or
  ``[bos, tag]`` alone for unconditional samples; with ``captions``, ``[bos, text tag, caption..., image tag]``
  before the image's ids, and classifier-free guidance (``cfg_scale``) against the same prompt without its caption;
- the token budget: ``max_new_tokens``, never more than the context the longest prompt of a batch leaves
  (:func:`item_budget` gives the usual "enough for any of these items" budget);
- the ids that may be drawn: by default (``constrain``) those the codec's stream grammar allows next
  (``codec.grammar``, :class:`~jpeglm.generation.GrammarConstraint`: JPEG), so every sample is a valid stream that
  ends within its budget; otherwise the modality's own BPE ids and eos (:func:`~jpeglm.generation.tokenizer_mask`);
- the stop at the end of the first whole item (:func:`~jpeglm.generation.codec_stop`);
- batching; sample ``i`` draws with its own seed, ``seed + i``, whatever batch it is in;
- prompts too long for the model's context: an error naming the prompt, or (``on_skip``) skipped and reported;
- the bytes of the item each sequence holds (:func:`~jpeglm.generation.sequence_bytes`) and their decode.

Under FSDP2 call it on every rank with the same arguments: every rank draws the same ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from litgpt import GPT

from jpeglm.codecs import Codec, Decoded
from jpeglm.errors import UserError
from jpeglm.generation.sampling import (
    GrammarConstraint,
    Guidance,
    codec_stop,
    generate,
    make_prompt,
    sequence_bytes,
    tokenizer_mask,
)
from jpeglm.tokenizer import MODALITIES
from jpeglm.vocabulary import Modality

Progress = Callable[[int, int], None]
"""Called as ``on_progress(done, total)``: ids generated so far, and the most the whole call can generate."""

Skip = Callable[[int, str], None]
"""Called as ``on_skip(index, reason)`` for a prompt that is skipped: its index among the prompts, and why."""


@dataclass(frozen=True)
class Completion:
    """One sample: what the model was given, what it wrote, and how it decodes.

    Attributes:
        prompt: the prompt stream the model continued (``b""`` for an unconditional sample).
        original: the full stream the prompt was cut from (None when the prompt was given already cut).
        ids: the model's ids: the prompt's (``bos, tag, ...``) followed by the generated ones.
        stream: the codec stream of the one item the ids hold (the prompt's bytes included), cut at its end.
        decoded: ``codec.decode(stream)`` (never raises: grey where the stream broke).
        new_tokens: ids generated after the prompt.
        seed: the seed it was drawn with (``seed + index``): ``complete`` of its prompt alone with this seed
            draws the same ids (up to floating-point differences between batch shapes).
        index: its place among the prompts (or unconditional samples) the call was given.
        tokens_per_s: ``new_tokens`` over the seconds its batch took to generate.
        caption: the caption it was drawn for (None: none).
    """

    prompt: bytes
    original: bytes | None
    ids: list[int]
    stream: bytes
    decoded: Decoded
    new_tokens: int
    seed: int
    tokens_per_s: float
    index: int = 0
    caption: str | None = None

    @property
    def complete(self) -> bool:
        """Whether the stream decodes as a full, valid item."""
        return self.decoded.complete

    @property
    def fraction(self) -> float:
        """Share of the item (MCUs of an image, slices of a clip) that the stream holds well-formed."""
        return self.decoded.fraction


def complete(
    model: torch.nn.Module,
    modality: Modality,
    prompts: Sequence[bytes] | None = None,
    *,
    num_samples: int | None = None,
    ratio: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = 40,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    on_progress: Progress | None = None,
    on_skip: Skip | None = None,
    constrain: bool = True,
    captions: Sequence[str] | None = None,
    cfg_scale: float = 1.0,
    cfg_start: int = 0,
) -> list[Completion]:
    """Complete codec streams (or sample from nothing) with one modality of a model, and decode the results.

    Args:
        model: a :class:`~jpeglm.model.CodecLM` (or a bare litgpt ``GPT``) trained on ``modality``'s ids.
        modality: the image or video modality to write (its tokenizer, codec and id offset).
        prompts: with ``ratio``, full streams (e.g. from ``codec.encode``), each cut with
            ``codec.prompt(stream, ratio)``; without, prompt streams used as given. None: unconditional.
        num_samples: how many unconditional samples to draw (only without ``prompts``).
        ratio: share of each full stream kept as its prompt, inside (0, 1) (only with ``prompts``).
        temperature: divides the logits; 0 takes the most likely id.
        top_k: draw only from the k most likely ids (None: all).
        top_p: then only from the most likely ids that together reach this probability (1.0: all).
        seed: sample ``i`` (the i-th prompt) draws from its own generator, seeded ``seed + i``.
        batch_size: sequences generated at once.
        max_new_tokens: most ids generated per sample (None: up to the end of the context); never more than
            the context the longest prompt of a batch leaves.
        on_progress: called after each generation step as ``on_progress(done, total)``, in ids; the budget a
            batch leaves unused counts as done when the batch ends, so ``done`` ends at ``total``.
        on_skip: called as ``on_skip(index, reason)`` for each prompt that leaves no room in the model's
            context, which is then skipped (its completion is missing from the result: see ``index``).
            None: such a prompt is an error.
        constrain: sample under the codec's stream grammar (``codec.grammar``, JPEG): every id keeps the stream a
            valid prefix and can still end within the budget, so every sample decodes complete. False: the
            paper's unconstrained sampling (the modality's ids and eos). H.264 has no grammar: never constrained.
        captions: one caption per sample (``num_samples`` defaults to their number), for a model trained on
            captioned images (``jpeglm prepare --captions``).
        cfg_scale: classifier-free guidance towards the captions (the batch doubles; 1.0: plain conditional).
        cfg_start: new ids each sample draws before guidance starts (plain conditional until then; 0: none).

    Returns:
        One :class:`Completion` per prompt (or sample), in order.

    Raises:
        UserError: bad settings, a prompt not cut at ``ratio``, (no ``on_skip``) one the context cannot hold,
            (``constrain``) one that is not a valid prefix of the codec's streams or cannot end within its budget,
            captions for a model trained without them, or a caption longer than the model was trained on.
    """
    arguments = dict(locals())  # every parameter, as given: complete() is iter_complete() gathered
    batches = iter_complete(**arguments)
    return [completion for batch in batches for completion in batch]


def iter_complete(
    model: torch.nn.Module,
    modality: Modality,
    prompts: Sequence[bytes] | None = None,
    *,
    num_samples: int | None = None,
    ratio: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = 40,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    on_progress: Progress | None = None,
    on_skip: Skip | None = None,
    constrain: bool = True,
    captions: Sequence[str] | None = None,
    cfg_scale: float = 1.0,
    cfg_start: int = 0,
) -> Iterator[list[Completion]]:
    """:func:`complete`, one batch at a time: the same arguments, the same completions, in lists of ``batch_size``.

    For callers that must not hold every sample at once (``jpeglm evaluate`` with 5000 images, FID): use each
    batch's completions, drop them, take the next. Settings and prompts are checked (and prompts cut) when this
    is called, before the first batch is generated.
    """
    codec = _media_codec(modality)
    _check_settings(temperature, top_k, top_p, batch_size, max_new_tokens, cfg_scale, captions, cfg_start)
    if captions is not None and prompts is None and num_samples is None:
        num_samples = len(captions)
    cuts, originals = _prompt_streams(codec, prompts, num_samples, ratio)
    gpt = model.model if isinstance(getattr(model, "model", None), GPT) else model
    if not isinstance(gpt, GPT):
        raise TypeError(f"expected a CodecLM or a litgpt GPT, got {type(model).__name__}")
    twins = [make_prompt(modality.tokenizer, cut, modality.offset) for cut in cuts]  # [bos, tag, image ids...]
    heads = _caption_heads(modality, captions, len(cuts))  # [text tag, caption ids...] of each sample, or None
    ids = twins if heads is None else [[twin[0], *head, *twin[1:]] for twin, head in zip(twins, heads, strict=True)]
    kept = _fitting(ids, gpt.config.block_size, on_skip)
    batches = [kept[start : start + batch_size] for start in range(0, len(kept), batch_size)]
    budgets = [_budget(gpt, [ids[i] for i in b], max_new_tokens) for b in batches]
    progress = _Progress(sum(len(b) * n for b, n in zip(batches, budgets, strict=True)), on_progress)
    grammar = _grammar(codec, modality, gpt.config.vocab_size, constrain)
    for b, budget in zip(batches, budgets, strict=True):
        _check_grammar(grammar, [cuts[i] for i in b], b, budget)
    allowed = tokenizer_mask(modality.tokenizer, gpt.config.vocab_size, modality.offset)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    guided = heads is not None and cfg_scale != 1.0
    run = _Batch(gpt, modality, allowed, sampling, grammar, (cfg_scale, cfg_start) if guided else None)
    captions = list(captions) if captions is not None else [None] * len(cuts)

    def batches_of_completions() -> Iterator[list[Completion]]:
        for b, budget in zip(batches, budgets, strict=True):
            prompts_b = [ids[i] for i in b], [twins[i] for i in b], [cuts[i] for i in b], [originals[i] for i in b]
            completions = run(b, *prompts_b, budget, seed, progress, [captions[i] for i in b])
            progress.batch_done(len(b) * budget)
            yield completions

    return batches_of_completions()


def item_budget(modality: Modality, streams: Sequence[bytes]) -> int | None:
    """New tokens enough to write any of ``streams`` whole: 1.5x the longest in tokens, plus 2.

    The default budget of the gallery, FID and ``jpeglm evaluate``: a sample that runs past it is not going to
    end well. None when there are no streams (then :func:`complete` allows up to the end of the context).
    """
    if not streams:
        return None
    return int(1.5 * max(len(modality.tokenizer.encode(s)) for s in streams)) + 2


# ---------------------------------------------------------------------- the parts of complete()


@dataclass
class _Batch:
    """Generates one batch under the modality's mask and codec stop, and decodes what each sequence holds."""

    gpt: GPT
    modality: Modality
    allowed: torch.Tensor
    sampling: dict[str, Any]
    grammar: Any = None  # the codec's token grammar when sampling is constrained
    guidance: tuple[float, int] | None = None  # against the uncaptioned twins: scale, start (None: none)

    def skip(self, ids: list[int]) -> int:
        """Leading ids of a sequence that are not stream bytes: ``[bos, tag]`` (a caption before it included), or
        ``[bos]`` for a tokenizer without a tag."""
        tag = self.modality.tokenizer.tag_id
        return 1 if tag is None else ids.index(tag) + 1

    def __call__(
        self,
        indices: list[int],
        ids: list[list[int]],
        twins: list[list[int]],
        cuts: list[bytes],
        originals: list[bytes | None],
        budget: int,
        seed: int,
        progress: _Progress,
        captions: list[str | None],
    ) -> list[Completion]:
        tok, codec, offset = self.modality.tokenizer, self.modality.codec, self.modality.offset
        seeds = [seed + index for index in indices]
        began = time.perf_counter()
        outputs = generate(
            self.gpt,
            ids,
            budget,
            allowed=self.allowed if self.grammar is None else GrammarConstraint(self.grammar, skip=self.skip),
            stop=codec_stop(codec, tok, offset),
            seed=seeds,
            on_step=progress.step,
            guidance=None if self.guidance is None else Guidance(twins, *self.guidance),
            **self.sampling,
        )
        seconds = max(time.perf_counter() - began, 1e-9)
        completions = []
        rows = zip(indices, ids, outputs, cuts, originals, captions, strict=True)
        for index, prompt_ids, out, cut, original, caption in rows:
            stream = sequence_bytes(out, tok, offset, codec)
            new = len(out) - len(prompt_ids)
            decoded = codec.decode(stream)
            completions.append(
                Completion(cut, original, out, stream, decoded, new, seed + index, new / seconds, index, caption)
            )
        return completions


class _Progress:
    """Counts generated ids for ``on_progress``; ids a batch left unused count as done when it ends."""

    def __init__(self, total: int, callback: Progress | None) -> None:
        self.total, self.callback = total, callback
        self.done = self.batches_done = 0

    def step(self, count: int) -> None:
        self.done += count
        if self.callback is not None:
            self.callback(self.done, self.total)

    def batch_done(self, most: int) -> None:
        self.batches_done += most
        self.step(self.batches_done - self.done)


def _media_codec(modality: Modality) -> Codec:
    if not modality.is_media:
        raise UserError(f"the {modality.name!r} modality has no codec: complete() writes images and videos")
    return modality.codec


def _check_settings(
    temperature: float,
    top_k: int | None,
    top_p: float,
    batch_size: int,
    max_new_tokens: int | None,
    cfg_scale: float = 1.0,
    captions: Sequence[str] | None = None,
    cfg_start: int = 0,
) -> None:
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1 (None: all ids), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1.0: off), got {top_p}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1 (None: up to the context), got {max_new_tokens}")
    if cfg_scale < 0:
        raise UserError(f"cfg_scale must be >= 0 (1.0: no guidance), got {cfg_scale}")
    if cfg_scale != 1.0 and captions is None:
        raise UserError(f"cfg_scale {cfg_scale} guides towards captions: give captions (or leave cfg_scale at 1.0)")
    if cfg_start < 0:
        raise UserError(f"cfg_start must be >= 0 (new ids before guidance starts), got {cfg_start}")


def _caption_heads(modality: Modality, captions: Sequence[str] | None, count: int) -> list[list[int]] | None:
    """Each sample's ``[text tag, caption ids...]`` in the model's ids (None without captions).

    Raises:
        UserError: the modality was trained without captions, the count is wrong, or a caption is empty or longer
            than the captions the model was trained on.
    """
    if captions is None:
        return None
    text = modality.captions
    if text is None:
        raise UserError(
            f"the model's {modality.name} modality was trained without captions, so it cannot draw from a text prompt: "
            "train on data prepared with `jpeglm prepare --captions` (or sample without captions)"
        )
    if len(captions) != count:
        raise UserError(f"{len(captions)} captions for {count} samples: give one caption per sample")
    heads = []
    for index, caption in enumerate(captions):
        ids = text.tokenizer.encode(str(caption).strip().encode("utf-8"))
        if not ids:
            raise UserError(f"caption {index} is empty")
        limit = modality.max_caption_tokens
        if limit is not None and len(ids) > limit:
            raise UserError(
                f"caption {index} ({caption[:40]!r}...) is {len(ids)} tokens, more than the {limit} the model was "
                "trained on: shorten it"
            )
        heads.append([MODALITIES["text"], *text.tokenizer.shift(ids, text.offset).tolist()])
    return heads


def _prompt_streams(
    codec: Codec, prompts: Sequence[bytes] | None, num_samples: int | None, ratio: float | None
) -> tuple[list[bytes], list[bytes | None]]:
    """The prompt stream of each sample and the full stream it was cut from (None: not cut here)."""
    if prompts is None:
        if ratio is not None:
            raise UserError("a prompt ratio needs prompts to cut; unconditional samples start from nothing")
        if num_samples is None or num_samples < 1:
            raise UserError(f"give prompts, or num_samples >= 1 for unconditional samples (got {num_samples})")
        return [b""] * num_samples, [None] * num_samples
    if num_samples is not None:
        raise UserError("give prompts or num_samples, not both: each prompt is completed once")
    if not prompts:
        raise UserError("no prompts to complete")
    if ratio is None:
        return [bytes(p) for p in prompts], [None] * len(prompts)
    cuts = []
    for index, stream in enumerate(prompts):
        try:
            cuts.append(codec.prompt(bytes(stream), ratio))
        except ValueError as e:
            raise UserError(f"cannot cut prompt {index} at ratio {ratio}: {e}") from e
    return cuts, [bytes(p) for p in prompts]


def _grammar(codec: Codec, modality: Modality, vocab_size: int, constrain: bool) -> Any:
    """The codec's token grammar over the model's ids when sampling is constrained (None: not, or no grammar)."""
    return codec.grammar(modality.tokenizer, modality.offset, vocab_size) if constrain else None


def _check_grammar(grammar: Any, cuts: list[bytes], indices: list[int], budget: int) -> None:
    """Refuse, before any sampling, a prompt that is not a valid stream prefix or cannot end within ``budget``."""
    if grammar is None:
        return
    for index, cut in zip(indices, cuts, strict=True):
        try:
            state = grammar.check_prefix(cut)
        except ValueError as e:
            raise UserError(f"prompt {index} is not the beginning of a valid stream: {e}") from e
        if grammar.finish_cost(state) > budget:
            raise UserError(
                f"prompt {index} needs at least {grammar.finish_cost(state)} more tokens to end a valid stream, but "
                f"only {budget} new tokens are allowed (max_new_tokens or the context); allow more, or sample "
                "without the grammar (constrain=False)"
            )


def _fitting(ids: list[list[int]], context: int, on_skip: Skip | None) -> list[int]:
    """Indices of the prompts that leave the model room for at least one new id; the others are skipped or an error."""
    kept = []
    for index, prompt in enumerate(ids):
        if len(prompt) < context:
            kept.append(index)
            continue
        reason = (
            f"prompt {index} is {len(prompt)} tokens, {len(prompt) - context + 1} more than the model's context of "
            f"{context} tokens leaves room for (it needs at least one new token)"
        )
        if on_skip is None:
            raise UserError(f"{reason}; cut the prompts shorter (a smaller ratio) or skip it")
        on_skip(index, reason)
    return kept


def _budget(gpt: GPT, prompts: list[list[int]], max_new_tokens: int | None) -> int:
    """``max_new_tokens`` (None: no limit), bounded by the context the longest of ``prompts`` leaves."""
    longest, context = max(len(p) for p in prompts), gpt.config.block_size
    return context - longest if max_new_tokens is None else min(max_new_tokens, context - longest)
