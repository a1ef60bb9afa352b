"""The token loop (jpeglm.generation.sampling): batched sampling with litgpt's KV cache, on tiny random CodecLMs."""

from __future__ import annotations

import copy

import pytest
import torch

from jpeglm.codecs import DecodedImage
from jpeglm.generation import (
    codec_stop,
    generate,
    make_prompt,
    modality_mask,
    sample_logits,
    sampling,
    sequence_bytes,
    token_pieces,
    tokenizer_mask,
)
from jpeglm.model import CodecLM
from jpeglm.tokenizer import BOS_ID, EOS_ID, MODALITIES

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_query_groups": 2, "intermediate_size": 172}
VOCAB = 40  # padded to 64 logit columns
PROMPTS = [[BOS_ID, 3, 9, 10, 11], [BOS_ID, 3], [BOS_ID, 3, 20, 21, 22, 23, 24, 25, 26]]
SETTINGS = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 1.0, "seed": 3},
    "top-k/top-p": {"temperature": 0.8, "top_k": 8, "top_p": 0.9, "seed": 1},
}


def tiny_model(vocab_size: int = VOCAB, seq_len: int = 128) -> CodecLM:
    torch.manual_seed(0)
    model = CodecLM(model_overrides=TINY, vocab_size=vocab_size, seq_len=seq_len)
    model.configure_model()
    return model


@pytest.fixture(scope="module")
def model() -> CodecLM:
    return tiny_model()


def generated(outputs: list[list[int]], prompts: list[list[int]]) -> list[list[int]]:
    return [out[len(p) :] for out, p in zip(outputs, prompts, strict=True)]


# ---------------------------------------------------------------------- sample_logits


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, temperature=0), greedy)
    for seed in range(5):
        drawn = sample_logits(logits, top_k=1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(drawn, greedy)


def test_top_k_keeps_exactly_k_ids_even_with_ties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]).repeat(2000, 1)  # four ids tied for first
    drawn = sample_logits(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert len(drawn.unique()) == 2


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    drawn = sample_logits(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised inside the nucleus
    assert set(sample_logits(logits, top_p=0.01).tolist()) == {0}  # the top id always stays
    assert len(sample_logits(logits, generator=torch.Generator().manual_seed(0)).unique()) == 4


def test_seeded_draws_reproduce():
    logits = torch.randn(8, 30)
    a = sample_logits(logits, generator=torch.Generator().manual_seed(7))
    b = sample_logits(logits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(logits, top_p=0.0)


# ---------------------------------------------------------------------- generate


@pytest.mark.parametrize("setting", SETTINGS)
def test_kv_cache_gives_the_ids_of_full_recomputation(model, setting):
    for eos_id in (None, EOS_ID):
        cached = generate(model, PROMPTS, 40, **SETTINGS[setting], eos_id=eos_id)
        recomputed = generate(model, PROMPTS, 40, **SETTINGS[setting], eos_id=eos_id, use_kv_cache=False)
        assert cached == recomputed
    assert [len(out) for out in generate(model, PROMPTS, 40, **SETTINGS[setting], eos_id=None)] == [45, 42, 49]


def test_a_prompt_longer_than_a_prefill_chunk(model, monkeypatch):
    prompts = [PROMPTS[0] + [12, 13], PROMPTS[2]]  # 7 and 9 ids, 7 in common
    expected = generate(model, prompts, 20, temperature=0, use_kv_cache=False)
    monkeypatch.setattr(sampling, "_PREFILL_CHUNK", 3)  # the common 7 in chunks of 3, 3 and 1
    assert generate(model, prompts, 20, temperature=0) == expected


def test_each_prompt_is_an_exact_prefix(model):
    outputs = generate(model, PROMPTS, 30, temperature=1.5, seed=4)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert out[: len(prompt)] == prompt
        assert len(prompt) < len(out) <= len(prompt) + 30


def test_a_batch_gives_each_prompt_what_it_gets_alone(model):
    batch = generate(model, PROMPTS, 25, temperature=0, eos_id=None)
    assert batch == [generate(model, [p], 25, temperature=0, eos_id=None)[0] for p in PROMPTS]


def test_seeds_reproduce(model):
    a = generate(model, PROMPTS, 30, seed=11)
    assert a == generate(model, PROMPTS, 30, seed=11)
    assert a != generate(model, PROMPTS, 30, seed=12)


def test_top_k_one_is_greedy(model):
    assert generate(model, PROMPTS, 30, top_k=1, seed=5) == generate(model, PROMPTS, 30, temperature=0)


def test_eos_ends_a_sequence_and_is_kept(model):
    allowed = modality_mask(VOCAB, 8, 12)  # eos and four other ids: eos comes soon
    prompts = [[BOS_ID, 3]] * 16
    outputs = generate(model, prompts, 30, allowed=allowed, seed=0)
    new = generated(outputs, prompts)
    assert any(len(ids) < 30 for ids in new)
    for ids in new:
        assert EOS_ID not in ids[:-1]
        assert ids[-1] == EOS_ID or len(ids) == 30
    only_eos = torch.arange(VOCAB) == EOS_ID
    assert generate(model, PROMPTS, 30, allowed=only_eos) == [p + [EOS_ID] for p in PROMPTS]


def test_on_step_counts_every_generated_id(model):
    # Prompts of different lengths (forced ids are not counted) and sequences that end early at eos.
    allowed = modality_mask(VOCAB, 8, 12)
    prompts = [*PROMPTS, [BOS_ID, 3]]
    counts = []
    outputs = generate(model, prompts, 30, allowed=allowed, seed=0, on_step=counts.append)
    assert sum(counts) == sum(len(ids) for ids in generated(outputs, prompts))
    assert max(counts) <= len(prompts)


def test_stop_cuts_the_sequence(model):
    full = generate(model, PROMPTS, 20, temperature=0, eos_id=None)
    seen = []

    def stop(ids: list[int]) -> int | None:
        seen.append((ids, len(ids)))
        return len(ids) - 2 if len(ids) >= 12 else None

    cut = generate(model, PROMPTS, 20, temperature=0, eos_id=None, stop=stop)
    assert cut == [out[:10] for out in full]
    # Called with each sequence's own list after each generated id, never while a prompt is being read.
    for prompt, out in zip(PROMPTS, cut, strict=True):
        assert sorted(length for seq, length in seen if seq is out) == list(range(len(prompt) + 1, 13))
    # A cut never reaches into the prompt.
    assert generate(model, PROMPTS, 20, stop=lambda ids: 0) == PROMPTS


def test_allowed_ids_only(model):
    allowed = modality_mask(VOCAB, 20, 30)  # e.g. one modality's BPE ids, and eos
    prompts = [[BOS_ID, 4]] * 8
    for kv in (True, False):
        outputs = generate(model, prompts, 40, temperature=3.0, allowed=allowed, seed=2, use_kv_cache=kv)
        drawn = {i for ids in generated(outputs, prompts) for i in ids}
        assert drawn <= set(range(20, 30)) | {EOS_ID}
        assert len(drawn) > 5
    per_prompt = torch.stack([modality_mask(VOCAB, 8, 16, None), modality_mask(VOCAB, 16, 40, None)])
    outputs = generate(model, [[BOS_ID, 3], [BOS_ID, 4, 30]], 40, temperature=3.0, allowed=per_prompt)
    assert set(outputs[0][2:]) <= set(range(8, 16))
    assert set(outputs[1][3:]) <= set(range(16, 40))


def test_padding_columns_are_never_drawn(model):
    loud = copy.deepcopy(model)
    with torch.no_grad():
        loud.model.lm_head.weight[VOCAB:] *= 1000  # the head's padding rows would win every draw
        assert loud(torch.tensor([[BOS_ID, 3]]))[0, -1].argmax() >= VOCAB  # so this test can fail
    for kwargs in SETTINGS.values():
        outputs = generate(loud, [[BOS_ID, 3]] * 4, 30, **kwargs)
        assert max(i for out in outputs for i in out) < VOCAB


def test_training_mode_is_restored_and_the_cache_cleared(model):
    model.train()
    generate(model, PROMPTS, 5)
    assert model.training
    assert model.model.training
    assert model.model.mask_cache is None
    assert all(block.attn.kv_cache is None for block in model.model.transformer.h)
    model.eval()
    generate(model.model, PROMPTS, 5)  # a bare litgpt GPT works too
    assert not model.training


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="context"):
        generate(model, PROMPTS, 120)
    with pytest.raises(ValueError, match="allowed"):
        generate(model, PROMPTS, 5, allowed=torch.ones(64, dtype=torch.bool))  # the padded width
    with pytest.raises(ValueError, match="no id"):
        generate(model, PROMPTS, 5, allowed=torch.zeros(VOCAB, dtype=torch.bool))
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [[]], 5)
    assert generate(model, PROMPTS, 0) == PROMPTS


# ---------------------------------------------------------------------- codec-aware helpers


def test_modality_mask():
    mask = modality_mask(16, 8, 12)
    assert mask.tolist() == [i in (EOS_ID, 8, 9, 10, 11) for i in range(16)]
    assert not modality_mask(16, 8, 12, eos_id=None)[EOS_ID]
    with pytest.raises(ValueError, match="first_id"):
        modality_mask(16, 8, 20)


def test_codec_stop_cuts_after_the_image(jpeg_codec, jpeg_tokenizer, jpeg_streams):
    stream = jpeg_streams[0]
    for offset in (0, 100):
        whole = make_prompt(jpeg_tokenizer, stream, offset)
        ids = whole + [i + offset for i in jpeg_tokenizer.encode(b"\x12\x34\x56")]
        stop = codec_stop(jpeg_codec, jpeg_tokenizer, offset)
        sequence = ids[:100]
        cuts = []
        for token in ids[100:]:  # the same list, grown one id at a time, as generate passes it
            sequence.append(token)
            cuts.append(stop(sequence))
        complete = len(whole) - 100 - 1  # the call after the image's last id
        assert set(cuts[:complete]) == {None}
        assert set(cuts[complete:]) == {len(whole)}
        assert codec_stop(jpeg_codec, jpeg_tokenizer, offset)(ids) == len(whole)  # a new list: decoded at once
        assert sequence_bytes(ids, jpeg_tokenizer, offset, codec=jpeg_codec) == stream
        assert sequence_bytes(ids, jpeg_tokenizer, offset) == stream + b"\x12\x34\x56"


def test_codec_stop_keeps_the_id_that_holds_the_last_byte(jpeg_tokenizer):
    class EndsAt:  # a codec whose items are `end` bytes long
        def __init__(self, end: int) -> None:
            self.end = end

        def stream_end(self, stream: bytes) -> int | None:
            return self.end if len(stream) >= self.end else None

    pieces = token_pieces(jpeg_tokenizer)
    ids = [BOS_ID, 3] + [i for i in range(8, len(pieces)) if len(pieces[i]) >= 2][:10]
    ends = [len(b"".join(pieces[i] for i in ids[:n])) for n in range(len(ids) + 1)]  # bytes of the first n ids
    for n in range(3, len(ids) + 1):
        assert codec_stop(EndsAt(ends[n]), jpeg_tokenizer)(ids) == n  # the item ends with id n
        assert codec_stop(EndsAt(ends[n] - 1), jpeg_tokenizer)(ids) == n  # ... or one byte inside it


def test_a_whole_image_in_the_prompt_stops_at_once(jpeg_codec, jpeg_tokenizer, jpeg_streams):
    lm = tiny_model(jpeg_tokenizer.num_ids, seq_len=len(jpeg_tokenizer.encode(jpeg_streams[0])) + 20)
    prompt = make_prompt(jpeg_tokenizer, jpeg_streams[0])
    stop = codec_stop(jpeg_codec, jpeg_tokenizer)
    assert generate(lm, [prompt], 10, stop=stop, eos_id=None) == [prompt]


def test_a_random_model_completes_a_real_jpeg_prompt_into_a_decodable_image(jpeg_codec, jpeg_tokenizer, jpeg_streams):
    prompts = [
        make_prompt(jpeg_tokenizer, jpeg_codec.prompt(jpeg_streams[0], 0.25)),
        make_prompt(jpeg_tokenizer, jpeg_codec.prompt(jpeg_streams[1], 0.5)),
        make_prompt(jpeg_tokenizer),  # unconditional: [bos, image]
    ]
    assert prompts[2] == [BOS_ID, MODALITIES["jpeg"]]
    lm = tiny_model(jpeg_tokenizer.num_ids, seq_len=max(map(len, prompts)) + 120)
    allowed = tokenizer_mask(jpeg_tokenizer, jpeg_tokenizer.num_ids)
    stop = codec_stop(jpeg_codec, jpeg_tokenizer)
    outputs = generate(lm, prompts, 120, top_k=40, seed=0, allowed=allowed, stop=stop)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out[: len(prompt)] == prompt
        assert all(8 <= i < jpeg_tokenizer.num_ids or i == EOS_ID for i in out[len(prompt) :])
        decoded = jpeg_codec.decode(sequence_bytes(out, jpeg_tokenizer, codec=jpeg_codec))
        assert isinstance(decoded, DecodedImage)
        assert decoded.image.size == (256, 256)
    assert jpeg_codec.decode(sequence_bytes(outputs[0], jpeg_tokenizer)).fraction >= 0.25  # the prompt's MCUs


# ---------------------------------------------------------------------- KV cache dtype and size
# FSDP2 (one all-gather per generate call, a bf16 MixedPrecisionPolicy) is tested in tests/test_fsdp_sampling.py.


def spy_on_kv_cache(gpt) -> list[torch.dtype]:
    """The dtype of each KV cache ``gpt`` allocates from now on, as allocated (litgpt's cache converts itself
    to the dtype of the first keys written into it, so looking later would not tell)."""
    allocated = []
    real = gpt.set_kv_cache

    def spy(*args, **kwargs):
        real(*args, **kwargs)
        allocated.append(gpt.transformer.h[0].attn.kv_cache.k.dtype)

    gpt.set_kv_cache = spy
    return allocated


def test_the_kv_cache_is_allocated_in_the_compute_dtype(model):
    allocated = spy_on_kv_cache(model.model)
    try:
        generate(model, PROMPTS, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            generate(model, PROMPTS, 3)
    finally:
        del model.model.set_kv_cache
    half = copy.deepcopy(model).to(torch.bfloat16)
    allocated_half = spy_on_kv_cache(half.model)
    generate(half, PROMPTS, 3)
    assert allocated == [torch.float32, torch.bfloat16]  # fp32 weights: fp32, under bf16 autocast: bf16
    assert allocated_half == [torch.bfloat16]
    assert sampling.compute_dtype(model.model) == torch.float32


def test_kv_cache_bytes_is_the_allocated_cache():
    from litgpt import GPT, Config

    config = Config(n_layer=3, n_embd=64, n_head=4, n_query_groups=2, vocab_size=40, block_size=64)  # grouped
    gpt = GPT(config)
    for dtype in (torch.float32, torch.bfloat16):
        gpt.set_kv_cache(batch_size=3, max_seq_length=50, dtype=dtype)
        caches = [block.attn.kv_cache for block in gpt.transformer.h]
        allocated = sum(t.numel() * t.element_size() for cache in caches for t in (cache.k, cache.v))
        assert sampling.kv_cache_bytes(config, 3, 50, dtype) == allocated
    assert sampling.kv_cache_bytes(config, 3, 50, torch.bfloat16) == 2 * 3 * 3 * 2 * 50 * 16 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [4, 2, 1])  # multi-head, grouped-query and multi-query attention
def test_the_decode_step_is_litgpt_s_forward(groups, dtype):
    """jpeglm.generation.decode: one cached position without litgpt's module calls gives litgpt's logits and cache
    (its attention on CPU is two matrix products, not litgpt's fused kernel: equal within rounding, bf16 too)."""
    from litgpt import GPT, Config

    from jpeglm.generation import decode

    config = Config(
        n_layer=2, n_embd=64, n_head=4, n_query_groups=groups, vocab_size=50, block_size=32, intermediate_size=96,
        mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", bias=False, parallel_residual=False,
        rotary_percentage=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    ours, theirs = GPT(config).eval().to(dtype), GPT(config).eval().to(dtype)
    theirs.load_state_dict(ours.state_dict())
    assert decode.supports(ours)
    tokens = torch.randint(0, 50, (3, 12))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a few units in its last place (2^-8)
    with torch.inference_mode():
        for model in (ours, theirs):
            model.set_kv_cache(batch_size=3, max_seq_length=32, dtype=dtype)
            model(tokens[:, :8], input_pos=torch.arange(8), input_pos_maxp1=8)  # prefill: litgpt's forward
        for pos in range(8, 12):
            mine = decode.decode_step(ours, tokens[:, pos], pos)
            reference = theirs(tokens[:, pos : pos + 1], input_pos=torch.tensor([pos]), input_pos_maxp1=pos + 1)
            torch.testing.assert_close(mine, reference[:, -1], rtol=tolerance, atol=tolerance)
            assert mine.dtype == dtype
    for a, b in zip(ours.transformer.h, theirs.transformer.h, strict=True):
        for mine, reference in ((a.attn.kv_cache.k, b.attn.kv_cache.k), (a.attn.kv_cache.v, b.attn.kv_cache.v)):
            torch.testing.assert_close(mine[:, :, :12], reference[:, :, :12], rtol=tolerance, atol=tolerance)
    assert not decode.supports(GPT(Config.from_name("pythia-14m")))  # LayerNorm, GELU, parallel residual: litgpt's


# ---------------------------------------------------------------------- classifier-free guidance

CAPTIONED = [[BOS_ID, 5, 30, 31, 32, 3], [BOS_ID, 5, 33, 3, 9, 10], [BOS_ID, 5, 34, 35, 3]]
TWINS = [[BOS_ID, 3], [BOS_ID, 3, 9, 10], [BOS_ID, 3]]


def guided_by_hand(model, prompt, twin, scale, new_tokens, allowed, start=0):
    """Greedy guided ids computed the slow way: each branch recomputed alone at every step, then mixed (from the
    ``start``-th new id on; the conditional logits alone before it)."""
    gpt, cond, uncond = model.model, list(prompt), list(twin)
    with torch.no_grad():
        for step in range(new_tokens):
            c = gpt(torch.tensor([cond]))[0, -1, :VOCAB].float()
            u = gpt(torch.tensor([uncond]))[0, -1, :VOCAB].float()
            mixed = (c if step < start else u + scale * (c - u)).masked_fill(~allowed, float("-inf"))
            token = int(mixed.argmax())
            cond.append(token)
            uncond.append(token)
    return cond[len(prompt) :]


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_guidance_mixes_each_prompt_with_its_twin(model, scale):
    allowed = modality_mask(VOCAB, 8, 30)  # the "image" ids and eos
    out = generate(
        model, CAPTIONED, 6, temperature=0.0, allowed=allowed, eos_id=None,
        guidance=sampling.Guidance(TWINS, scale),
    )  # fmt: skip
    for prompt, twin, sequence in zip(CAPTIONED, TWINS, out, strict=True):
        assert sequence[: len(prompt)] == prompt
        assert sequence[len(prompt) :] == guided_by_hand(model, prompt, twin, scale, 6, allowed)


def test_guidance_starts_after_its_start_new_ids(model):
    """Guidance.start: the first new ids are plain conditional draws, the rest guided (each row counts its own)."""
    allowed = modality_mask(VOCAB, 8, 30)
    out = generate(
        model, CAPTIONED, 6, temperature=0.0, allowed=allowed, eos_id=None,
        guidance=sampling.Guidance(TWINS, 3.0, start=3),
    )  # fmt: skip
    for prompt, twin, sequence in zip(CAPTIONED, TWINS, out, strict=True):
        assert sequence[len(prompt) :] == guided_by_hand(model, prompt, twin, 3.0, 6, allowed, start=3)
    plain = generate(model, CAPTIONED, 3, temperature=0.0, allowed=allowed, eos_id=None)
    assert [s[:-3] for s in out] == plain  # the first 3 new ids: conditional greedy


def test_guidance_at_scale_one_is_conditional_sampling(model):
    plain = generate(model, CAPTIONED, 8, temperature=1.0, seed=5, eos_id=None)
    guided = generate(model, CAPTIONED, 8, temperature=1.0, seed=5, eos_id=None, guidance=sampling.Guidance(TWINS, 1.0))
    assert guided == plain


def test_guidance_at_scale_zero_samples_the_twins(model):
    """Scale 0 draws from the unconditional branch alone: what the twins get sampled on their own, same seeds."""
    alone = generate(model, TWINS, 8, temperature=1.0, seed=9, eos_id=None)
    guided = generate(model, CAPTIONED, 8, temperature=1.0, seed=9, eos_id=None, guidance=sampling.Guidance(TWINS, 0.0))
    assert generated(guided, CAPTIONED) == generated(alone, TWINS)


def test_guidance_pairs_end_together_and_stops_see_the_prompts(model):
    seen = []

    def stop(sequence):
        seen.append(len(sequence))
        return len(sequence) if sequence[1] == 5 and len(sequence) >= 9 else None

    out = generate(model, CAPTIONED, 20, temperature=1.0, seed=1, stop=stop, guidance=sampling.Guidance(TWINS, 2.0))
    assert [len(s) for s in out] == [9, 9, 9]


def test_guidance_is_refused_without_one_twin_per_prompt(model):
    with pytest.raises(ValueError, match="one unconditional prompt per prompt"):
        generate(model, CAPTIONED, 4, guidance=sampling.Guidance(TWINS[:2], 2.0))
    with pytest.raises(ValueError, match="KV cache"):
        generate(model, CAPTIONED, 4, use_kv_cache=False, guidance=sampling.Guidance(TWINS, 2.0))


def test_a_sampled_sequence_does_not_depend_on_the_other_prompts_of_its_batch(model):
    """Prompts of different lengths: a row still reading its prompt must not use its own generator's draws."""
    batch = generate(model, PROMPTS, 12, temperature=1.0, seed=[7, 8, 9], eos_id=None)
    alone = [
        generate(model, [p], 12, temperature=1.0, seed=[s], eos_id=None)[0]
        for p, s in zip(PROMPTS, [7, 8, 9], strict=True)
    ]
    assert batch == alone
