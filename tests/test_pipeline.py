"""complete(): the one completion pipeline (prompts, budget, mask, stop, batching, seeds, decoding), on tiny models."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from media import PHOTOS, pan_frames
from PIL import Image

from jpeglm.codecs import AvcCodec, DecodedImage, DecodedVideo, JpegCodec
from jpeglm.errors import UserError
from jpeglm.generation import (
    Completion,
    codec_stop,
    complete,
    generate,
    item_budget,
    iter_complete,
    make_prompt,
    sequence_bytes,
    tokenizer_mask,
)
from jpeglm.model import CodecLM
from jpeglm.tokenizer import BOS_ID, EOS_ID, MODALITIES, CodecTokenizer
from jpeglm.vocabulary import Modality

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_query_groups": 2, "intermediate_size": 172}


def tiny_model(vocab_size: int, seq_len: int) -> CodecLM:
    torch.manual_seed(0)
    model = CodecLM(model_overrides=TINY, vocab_size=vocab_size, seq_len=seq_len)
    model.configure_model()
    return model


@pytest.fixture(scope="module")
def jpeg(jpeg_tokenizer) -> Modality:
    return Modality("jpeg", jpeg_tokenizer)


@pytest.fixture(scope="module")
def streams(jpeg_codec, jpeg_tokenizer, jpeg_streams) -> list[bytes]:
    """Three streams whose prompts at ratio 0.25 differ in length."""
    chosen = jpeg_streams[:3]
    lengths = [len(jpeg_tokenizer.encode(jpeg_codec.prompt(s, 0.25))) for s in chosen]
    assert len(set(lengths)) == 3
    return chosen


@pytest.fixture(scope="module")
def lm(jpeg_codec, jpeg_tokenizer, streams) -> CodecLM:
    longest = max(len(make_prompt(jpeg_tokenizer, jpeg_codec.prompt(s, 0.25))) for s in streams)
    return tiny_model(jpeg_tokenizer.num_ids, longest + 60)


def expected_ids(lm, modality, prompts, batch_size, seed, max_new_tokens, **sampling) -> list[list[int]]:
    """What generate() draws for ``prompts`` batch by batch, with the modality's mask and codec stop."""
    tok, codec, offset = modality.tokenizer, modality.codec, modality.offset
    allowed = tokenizer_mask(tok, lm.config.vocab_size, offset)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        budget = min(max_new_tokens, lm.config.block_size - max(map(len, batch)))
        stop = codec_stop(codec, tok, offset)
        outputs += generate(lm.model, batch, budget, seed=seed + start, allowed=allowed, stop=stop, **sampling)
    return outputs


def check_fields(completion: Completion, modality: Modality) -> None:
    """A completion's stream, decode and counts agree with its ids."""
    tok, codec = modality.tokenizer, modality.codec
    prompt_ids = make_prompt(tok, completion.prompt, modality.offset)
    assert completion.ids[: len(prompt_ids)] == prompt_ids
    assert completion.new_tokens == len(completion.ids) - len(prompt_ids)
    assert completion.stream == sequence_bytes(completion.ids, tok, modality.offset, codec)
    assert completion.stream.startswith(completion.prompt)
    again = codec.decode(completion.stream)
    assert (completion.complete, completion.fraction) == (again.complete, again.fraction)
    assert completion.tokens_per_s > 0 or completion.new_tokens == 0


def test_unconditional_samples_are_generate_batch_by_batch(lm, jpeg):
    completions = complete(lm, jpeg, num_samples=3, batch_size=2, seed=5, max_new_tokens=30, top_k=40, constrain=False)
    prompts = [[BOS_ID, MODALITIES["jpeg"]]] * 3
    assert [c.ids for c in completions] == expected_ids(lm, jpeg, prompts, 2, 5, 30, top_k=40)
    assert [c.seed for c in completions] == [5, 6, 7]  # seed + index: each sample its own generator
    assert [c.index for c in completions] == [0, 1, 2]
    [alone] = complete(lm, jpeg, num_samples=1, batch_size=1, seed=6, max_new_tokens=30, top_k=40, constrain=False)
    assert alone.ids == completions[1].ids  # the second sample, reproduced from its own seed alone
    for c in completions:
        assert (c.prompt, c.original) == (b"", None)
        assert 0 < c.new_tokens <= 30
        assert isinstance(c.decoded, DecodedImage)
        check_fields(c, jpeg)
    again = complete(lm, jpeg, num_samples=3, batch_size=2, seed=5, max_new_tokens=30, top_k=40, constrain=False)
    assert [c.ids for c in again] == [c.ids for c in completions]


def test_prompts_of_different_lengths_batched(lm, jpeg, jpeg_codec, jpeg_tokenizer, streams):
    sampling = {"temperature": 0.9, "top_k": 20, "top_p": 0.95}
    completions = complete(
        lm, jpeg, streams, ratio=0.25, batch_size=2, seed=7, max_new_tokens=40, **sampling, constrain=False
    )
    cuts = [jpeg_codec.prompt(s, 0.25) for s in streams]
    prompts = [make_prompt(jpeg_tokenizer, cut) for cut in cuts]
    assert [c.ids for c in completions] == expected_ids(lm, jpeg, prompts, 2, 7, 40, **sampling)
    assert [c.seed for c in completions] == [7, 8, 9]
    assert [c.prompt for c in completions] == cuts
    assert [c.original for c in completions] == streams
    for c in completions:
        check_fields(c, jpeg)
        assert c.fraction >= jpeg_codec.decode(c.prompt).fraction > 0  # the prompt's MCUs stay
    # Prompts given already cut: the same ids, and no original to show.
    precut = complete(lm, jpeg, cuts, batch_size=2, seed=7, max_new_tokens=40, **sampling, constrain=False)
    assert [c.ids for c in precut] == [c.ids for c in completions]
    assert [c.original for c in precut] == [None] * 3


def test_a_mixed_vocabulary_draws_only_the_modality_s_ids(jpeg_codec, jpeg_tokenizer, streams):
    shifted = Modality("jpeg", jpeg_tokenizer, offset=100)
    prompt = make_prompt(jpeg_tokenizer, jpeg_codec.prompt(streams[0], 0.25), 100)
    model = tiny_model(jpeg_tokenizer.num_ids + 100, len(prompt) + 40)
    [c] = complete(
        model, shifted, streams[:1], ratio=0.25, max_new_tokens=40, temperature=3.0, top_k=None, constrain=False
    )
    assert c.ids[: len(prompt)] == prompt
    assert all(108 <= i < jpeg_tokenizer.num_ids + 100 or i == EOS_ID for i in c.ids[len(prompt) :])
    check_fields(c, shifted)


def test_the_budget_is_bounded_by_the_context(jpeg, jpeg_codec, jpeg_tokenizer, streams):
    lengths = [len(make_prompt(jpeg_tokenizer, jpeg_codec.prompt(s, 0.25))) for s in streams]
    context = max(lengths) + 12
    model = tiny_model(jpeg_tokenizer.num_ids, context)
    calls = []
    completions = complete(
        model, jpeg, streams, ratio=0.25, batch_size=2, on_progress=lambda *a: calls.append(a), constrain=False
    )
    budgets = [context - max(lengths[:2])] * 2 + [context - lengths[2]]  # what each batch's longest prompt leaves
    assert {total for _, total in calls} == {sum(budgets)}
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert done[-1] == sum(budgets)  # unused budgets count as done when a batch ends: the bar ends full
    for c, budget in zip(completions, budgets, strict=True):
        assert c.new_tokens <= budget
        assert len(c.ids) <= context
    more = complete(
        model, jpeg, streams, ratio=0.25, batch_size=2, max_new_tokens=10**6, constrain=False
    )  # bounded the same
    assert [c.ids for c in more] == [c.ids for c in completions]
    small = tiny_model(jpeg_tokenizer.num_ids, min(lengths))
    with pytest.raises(UserError, match=f"prompt 0 is {lengths[0]} tokens, {lengths[0] - min(lengths) + 1} more than"):
        complete(small, jpeg, streams[:1], ratio=0.25)


def test_prompts_too_long_for_the_context_are_skipped_and_named(jpeg, jpeg_codec, jpeg_tokenizer, streams):
    lengths = [len(make_prompt(jpeg_tokenizer, jpeg_codec.prompt(s, 0.25))) for s in streams]
    shortest = lengths.index(min(lengths))
    room = min(n for n in lengths if n > min(lengths)) - min(lengths)  # the gap to the next shortest prompt
    model = tiny_model(jpeg_tokenizer.num_ids, min(lengths) + room)  # only the shortest prompt leaves room
    skipped = []
    completions = complete(
        model,
        jpeg,
        streams,
        ratio=0.25,
        batch_size=2,
        seed=3,
        on_skip=lambda i, why: skipped.append((i, why)),
        constrain=False,
    )
    too_long = [i for i, n in enumerate(lengths) if n >= min(lengths) + room]
    assert [i for i, _ in skipped] == too_long
    assert all(f"prompt {i} is {lengths[i]} tokens" in why for i, why in skipped)
    assert [c.index for c in completions] == [i for i in range(len(streams)) if i not in too_long]
    [alone] = complete(model, jpeg, [streams[shortest]], ratio=0.25, seed=3 + shortest, constrain=False)
    [kept] = [c for c in completions if c.index == shortest]
    assert kept.ids == alone.ids  # a kept prompt draws with its own seed, as if it were alone


def test_item_budget(jpeg, jpeg_tokenizer, streams):
    longest = max(len(jpeg_tokenizer.encode(s)) for s in streams)
    assert item_budget(jpeg, streams) == int(1.5 * longest) + 2
    assert item_budget(jpeg, []) is None


def test_mistakes_are_user_errors(lm, jpeg, streams):
    mistakes = [
        ({}, "num_samples"),
        ({"num_samples": 2, "ratio": 0.5}, "needs prompts"),
        ({"prompts": streams, "num_samples": 2}, "not both"),
        ({"prompts": []}, "no prompts"),
        ({"prompts": streams, "ratio": 1.5}, "cannot cut prompt 0 at ratio 1.5"),
        ({"prompts": streams, "ratio": 0.01}, "keeps no FFD7"),
        ({"num_samples": 1, "top_p": 0.0}, "top_p"),
        ({"num_samples": 1, "top_k": 0}, "top_k"),
        ({"num_samples": 1, "temperature": -1.0}, "temperature"),
        ({"num_samples": 1, "batch_size": 0}, "batch_size"),
        ({"num_samples": 1, "max_new_tokens": 0}, "max_new_tokens"),
    ]
    for kwargs, message in mistakes:
        with pytest.raises(UserError, match=message):
            complete(lm, jpeg, **kwargs)
    text = Modality("text", CodecTokenizer.train([b"some words to learn from"], "text", 280))
    with pytest.raises(UserError, match="no codec"):
        complete(lm, text, num_samples=1)


@pytest.fixture(scope="module")
def avc() -> tuple[AvcCodec, list[bytes], Modality]:
    """4-frame 16x16 clips (one slice a frame), and a tokenizer trained on them."""
    codec = AvcCodec(width=16, height=16, fps=2, seconds=2)
    streams = [codec.encode(np.stack(pan_frames(photo, 4, (24, 16)))) for photo in PHOTOS[:2]]
    return codec, streams, Modality("avc", CodecTokenizer.train(streams, "avc", 300, codec_spec=codec.spec))


def test_a_video_completion_keeps_whole_frames(avc):
    codec, streams, modality = avc
    longest = max(len(modality.tokenizer.encode(s)) for s in streams)
    model = tiny_model(modality.tokenizer.num_ids, longest + 40)
    completions = complete(model, modality, streams, ratio=0.5, max_new_tokens=30, seed=3)
    cuts = [codec.prompt(s, frames=2) for s in streams]  # max(1, int(0.5 * 4)) whole frames
    assert [c.prompt for c in completions] == cuts
    prompts = [make_prompt(modality.tokenizer, cut) for cut in cuts]
    assert [c.ids for c in completions] == expected_ids(model, modality, prompts, 8, 3, 30, top_k=40)
    for c in completions:
        check_fields(c, modality)
        assert isinstance(c.decoded, DecodedVideo)
        assert c.decoded.frames.shape == (4, 16, 16, 3)
        assert c.fraction >= codec.decode(c.prompt).fraction > 0


def test_iter_complete_is_complete_batch_by_batch_and_lazy(lm, jpeg, streams):
    steps = []
    batches = iter_complete(
        lm,
        jpeg,
        streams,
        ratio=0.25,
        batch_size=2,
        seed=3,
        max_new_tokens=20,
        on_progress=lambda *a: steps.append(a),
        constrain=False,
    )
    assert steps == []  # nothing generated before the first batch is asked for
    first = next(batches)
    generated = len(steps)
    assert len(first) == 2
    assert generated > 0
    rest = [c for batch in batches for c in batch]
    assert len(steps) > generated  # the later batches were generated only when asked for
    together = complete(lm, jpeg, streams, ratio=0.25, batch_size=2, seed=3, max_new_tokens=20, constrain=False)
    assert [c.ids for c in first + rest] == [c.ids for c in together]
    with pytest.raises(UserError, match="ratio"):
        iter_complete(lm, jpeg, streams, ratio=1.5)  # checked when called, not at the first batch


# ---------------------------------------------------------------------- grammar-constrained sampling


@pytest.fixture(scope="module")
def small_jpeg(photos) -> Modality:
    """64x64 JPEG (16 MCUs, 2 FFD7 markers) with a 300-symbol tokenizer trained on the photos."""
    codec = JpegCodec(size=64)
    streams = [codec.encode(p) for p in photos]
    return Modality("jpeg", CodecTokenizer.train(streams, "jpeg", 300, codec_spec=codec.spec))


def test_constrained_samples_of_an_untrained_model_all_decode_complete(small_jpeg, photos):
    model = tiny_model(small_jpeg.tokenizer.num_ids, 1000)  # untrained: it draws anything the mask allows
    sampling = {"temperature": 1.0, "top_k": None, "seed": 1, "max_new_tokens": 250, "batch_size": 4}
    free = complete(model, small_jpeg, num_samples=4, constrain=False, **sampling)
    assert sum(c.complete for c in free) < 4  # the paper's unconstrained sampling: broken streams
    constrained = complete(model, small_jpeg, num_samples=4, **sampling)
    streams = [small_jpeg.codec.encode(p) for p in photos[:3]]
    constrained += complete(model, small_jpeg, streams, ratio=0.5, **sampling)
    for c in constrained:
        assert c.complete, c.stream[-8:]
        assert c.fraction == 1.0
        assert c.new_tokens <= 250
        assert c.ids[-1] != EOS_ID or c.stream.endswith(b"\xff\xd9")  # the codec stop ends it right after EOI
        with Image.open(io.BytesIO(small_jpeg.codec.to_jpeg(c.stream))) as im:
            im.load()  # Pillow reads it whole, no truncation
    assert [c.prompt for c in constrained[4:]] == [small_jpeg.codec.prompt(s, 0.5) for s in streams]


def test_constrained_prompts_are_checked_before_sampling(small_jpeg, photos):
    model = tiny_model(small_jpeg.tokenizer.num_ids, 400)
    stream = small_jpeg.codec.encode(photos[0])
    broken = bytearray(small_jpeg.codec.prompt(stream, 0.5))
    broken[len(small_jpeg.codec.header) + 3 : len(small_jpeg.codec.header) + 5] = b"\xff\x12"  # not stuffing
    with pytest.raises(UserError, match=r"prompt 0 is not the beginning of a valid stream: byte \d+"):
        complete(model, small_jpeg, [bytes(broken)], max_new_tokens=50)
    with pytest.raises(UserError, match="prompt 0 needs at least .* more tokens to end a valid stream"):
        complete(model, small_jpeg, num_samples=1, max_new_tokens=5)
    [c] = complete(model, small_jpeg, [bytes(broken)], max_new_tokens=5, constrain=False)  # the old way: allowed
    assert not c.complete


# ---------------------------------------------------------------------- captions and guidance


@pytest.fixture(scope="module")
def captioned(small_jpeg) -> Modality:
    """The 64x64 JPEG modality with captions in a text modality whose BPE ids follow the JPEG ones."""
    words = b"a red circle at the top left on a plain teal background and a blue square at the bottom"
    text_tok = CodecTokenizer.train([words] * 4, "text", 300)
    text = Modality("text", text_tok, offset=small_jpeg.tokenizer.num_ids - 8)
    return Modality("jpeg", small_jpeg.tokenizer, captions=text, max_caption_tokens=20)


def test_captioned_samples_start_with_their_caption_and_guidance_keeps_them_whole(captioned, photos):
    text = captioned.captions
    model = tiny_model(text.offset + text.tokenizer.num_ids, 600)
    captions = ["a red circle on a plain teal background", "a blue square at the bottom"]
    sampling = {"temperature": 1.0, "top_k": None, "seed": 3, "max_new_tokens": 250}
    for scale in (1.0, 3.0):
        samples = complete(model, captioned, captions=captions, cfg_scale=scale, **sampling)
        for c, caption in zip(samples, captions, strict=True):
            head = [
                BOS_ID,
                MODALITIES["text"],
                *text.tokenizer.shift(text.tokenizer.encode(caption.encode()), text.offset),
            ]
            assert c.ids[: len(head) + 1] == [*head, MODALITIES["jpeg"]]
            assert c.caption == caption
            assert c.complete
            assert c.fraction == 1.0
    stream = captioned.codec.encode(photos[0])  # a caption and the top half of a picture
    [c] = complete(model, captioned, [stream], ratio=0.5, captions=captions[:1], cfg_scale=3.0, **sampling)
    assert c.stream.startswith(captioned.codec.prompt(stream, 0.5))
    assert c.complete


def test_guided_samples_differ_from_conditional_ones(captioned):
    text = captioned.captions
    model = tiny_model(text.offset + text.tokenizer.num_ids, 600)
    sampling = {"temperature": 0.0, "max_new_tokens": 60, "constrain": False, "captions": ["a red circle"]}
    [plain] = complete(model, captioned, **sampling)
    [guided] = complete(model, captioned, cfg_scale=4.0, **sampling)
    [unconditional] = complete(model, captioned, cfg_scale=0.0, **sampling)
    [nothing] = complete(model, captioned, num_samples=1, **{**sampling, "captions": None})
    assert plain.ids != guided.ids
    assert unconditional.ids[unconditional.ids.index(MODALITIES["jpeg"]) :] == nothing.ids[1:]  # scale 0: no caption
    [late] = complete(model, captioned, cfg_scale=4.0, cfg_start=20, **sampling)  # guided from the 21st new id on
    start = plain.ids.index(MODALITIES["jpeg"]) + 1
    assert late.ids[: start + 20] == plain.ids[: start + 20]
    assert late.ids != plain.ids
    [never] = complete(model, captioned, cfg_scale=4.0, cfg_start=60, **sampling)  # the whole budget unguided
    assert never.ids == plain.ids


def test_caption_mistakes_are_user_errors(captioned, small_jpeg):
    model = tiny_model(captioned.captions.offset + captioned.captions.tokenizer.num_ids, 400)
    with pytest.raises(UserError, match="trained without captions"):
        complete(model, small_jpeg, captions=["a red circle"])
    with pytest.raises(UserError, match="more than the 20 the model was trained on"):
        complete(model, captioned, captions=["a red circle at the top left " * 4])
    with pytest.raises(UserError, match="caption 1 is empty"):
        complete(model, captioned, captions=["a red circle", "  "])
    with pytest.raises(UserError, match="cfg_scale 3.0 guides towards captions"):
        complete(model, captioned, num_samples=1, cfg_scale=3.0)
    with pytest.raises(UserError, match="cfg_start must be >= 0"):
        complete(model, captioned, captions=["a red circle"], cfg_scale=3.0, cfg_start=-1)
    with pytest.raises(UserError, match="2 captions for 1 samples"):
        complete(model, captioned, num_samples=1, captions=["a", "b"])
