"""Captioned pictures: the synthetic captions, caption dropout in the blocks, and the loss around captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jpeglm.data_modules import SyntheticDataModule
from jpeglm.data_modules.codec import drop_captions
from jpeglm.data_modules.synthetic import COLOUR_NAMES, caption_colours, palette, procedural_caption, procedural_image
from jpeglm.model import CodecLM, _Targets, caption_id_mask
from jpeglm.tokenizer import BOS_ID, EOS_ID, MODALITIES, PAD_ID, CodecTokenizer
from jpeglm.vocabulary import Modality

TEXT, IMAGE = MODALITIES["text"], MODALITIES["jpeg"]


def sample(caption: list[int], image: list[int]) -> list[int]:
    return [BOS_ID, TEXT, *caption, IMAGE, *image, EOS_ID]


def test_captions_say_what_was_drawn():
    palette_colours = {tuple(c) for c in palette().tolist()}
    for index in range(40):
        caption = procedural_caption(7, index, 64)
        background, shapes = caption_colours(caption)
        assert 1 <= len(shapes) <= 3
        assert 1 <= len(background) <= 2
        assert set(background + shapes) <= set(COLOUR_NAMES)
        pixels = {tuple(p) for p in np.asarray(procedural_image(7, index, 64)).reshape(-1, 3).tolist()}
        if caption.endswith("plain " + background[0] + " background"):  # a flat background: its exact colour shows
            assert tuple(palette()[COLOUR_NAMES.index(background[0])].tolist()) in pixels & palette_colours
    assert procedural_caption(7, 3, 64) == procedural_caption(7, 3, 64)
    assert caption_colours(
        "a red circle at the top left and an orange square in the centre on a plain teal background"
    ) == (
        ["teal"],
        ["red", "orange"],
    )


def test_drop_captions_removes_whole_captions_only_and_is_deterministic():
    block = np.array(
        [20, 21, IMAGE, 9, 9, EOS_ID, *sample([30, 31], [10, 11, 12]), *sample([32], [13]), BOS_ID, TEXT, 33],
        dtype=np.int64,
    )  # a caption cut by the block's start (kept), two whole ones, one cut by its end (kept)
    assert np.array_equal(drop_captions(block, 0.0, 1, 5), block)
    dropped = drop_captions(block, 1.0, 1, 5)
    expected = [
        20,
        21,
        IMAGE,
        9,
        9,
        EOS_ID,
        BOS_ID,
        IMAGE,
        10,
        11,
        12,
        EOS_ID,
        BOS_ID,
        IMAGE,
        13,
        EOS_ID,
        BOS_ID,
        TEXT,
        33,
    ]
    assert dropped.tolist() == expected + [PAD_ID] * (len(block) - len(expected))
    rates = []
    for block_index in range(400):
        out = drop_captions(np.array(sample([30, 31], [10]) * 3, dtype=np.int64), 0.3, 42, block_index)
        rates.append((3 - int(np.sum(out == TEXT))) / 3)
        again = drop_captions(np.array(sample([30, 31], [10]) * 3, dtype=np.int64), 0.3, 42, block_index)
        assert np.array_equal(out, again)  # the same block reads the same way every time: exact resume
    assert 0.25 < np.mean(rates) < 0.35


def test_a_captioned_synthetic_set_trains_with_dropout_and_resumes_exactly(tmp_path):
    def module(**kwargs):
        return SyntheticDataModule(
            seq_len=256, batch_size=2, num_images=48, image_size=32, captions=True, cache_dir=str(tmp_path), **kwargs
        )

    dm = module(caption_dropout=0.5)
    image, text = dm.modalities()
    assert image.captions is text
    assert text.offset == image.tokenizer.num_ids - 8
    assert dm.vocab_size == image.tokenizer.num_ids + text.tokenizer.num_ids - 8
    dm.setup("fit")
    batches = [b["input_ids"] for b, _ in zip(dm.train_dataloader(), range(6), strict=False)]
    ids = torch.cat(batches)
    assert (ids == PAD_ID).any()  # dropped captions leave pad at the end of their block
    starts = ((ids[:, :-1] == BOS_ID) & (ids[:, 1:] == IMAGE)).sum()
    assert starts > 0  # some samples lost their caption ...
    assert ((ids[:, :-1] == BOS_ID) & (ids[:, 1:] == TEXT)).sum() > 0  # ... and some kept it
    none = module(caption_dropout=0.0)
    none.setup("fit")
    kept = torch.cat([b["input_ids"] for b, _ in zip(none.train_dataloader(), range(6), strict=False)])
    assert not (kept == PAD_ID).any()
    again = module(caption_dropout=0.5)
    again.setup("fit")
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(again.train_dataloader(), batches, strict=False))


def test_caption_targets_are_weighted_and_pad_is_no_target():
    text_tok = CodecTokenizer.train([b"a red circle on teal"] * 3, "text", 270)
    image_tok = CodecTokenizer.train([bytes(range(256))], "jpeg", 260)
    text = Modality("text", text_tok, offset=image_tok.num_ids - 8)
    image = Modality("jpeg", image_tok, captions=text)
    vocab = text.offset + text_tok.num_ids
    model = CodecLM(model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_query_groups": 2}, vocab_size=vocab,
                    seq_len=16, caption_loss_weight=0.0)  # fmt: skip
    model.caption_ids = caption_id_mask([image, text], vocab)
    caption_id = text.offset + 8
    targets = torch.tensor([[TEXT, caption_id, caption_id, IMAGE, 20, 21, EOS_ID, PAD_ID]])
    caption, item = model._caption_and_item(targets, torch.tensor([IMAGE]))
    assert caption.tolist() == [[True, True, True, False, False, False, False, False]]
    assert item.tolist() == [[False, False, False, True, True, True, True, False]]
    losses = torch.arange(1.0, 9.0)[None]
    # the per-token losses a forward would give, made up: 1, 2, ..., 8
    assert model._loss(_Targets(losses, targets, caption, item)).item() == pytest.approx((4 + 5 + 6 + 7) / 4)
    model.hparams.caption_loss_weight = 0.5
    weighted = (0.5 * (1 + 2 + 3) + 4 + 5 + 6 + 7) / (0.5 * 3 + 4)
    assert model._loss(_Targets(losses, targets, caption, item)).item() == pytest.approx(weighted)
    text_document = model._caption_and_item(targets, torch.tensor([TEXT]))[0]
    assert not text_document[0, 0]  # a text document's own tag is not a caption
