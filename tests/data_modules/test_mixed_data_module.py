"""MixedDataModule: disjoint id blocks per source, decoding back, mixing proportions, epochs of fixed length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from litdata import StreamingDataLoader

from jpeglm.data_modules import MixedDataModule
from jpeglm.shards import read_dataset
from jpeglm.tokenizer import BOS_ID, EOS_ID, MODALITIES, NUM_SPECIAL


@pytest.fixture
def two_sources(token_dataset):
    jpeg = token_dataset("jpeg", num_ids=328, items=(48, 4), seed=1)
    text = token_dataset("text", modality="text", num_ids=300, items=(48, 4), seed=2)
    return str(jpeg), str(text)


def test_ids_of_each_source_move_into_their_own_block(two_sources):
    module = MixedDataModule(list(two_sources), [0.5, 0.5], seq_len=63, batch_size=8)
    jpeg, text = module.members
    assert module.offsets == [0, 320]
    assert module.vocab_size == 8 + 320 + 292
    assert jpeg.id_range == (8, 328)
    assert text.id_range == (328, 620)
    seen = set()
    for batch in module.train_dataloader():
        for ids, modality in zip(batch["input_ids"].numpy(), batch["modality"].tolist(), strict=True):
            source = jpeg if modality == MODALITIES["jpeg"] else text
            start, stop = source.id_range
            assert np.all((ids < NUM_SPECIAL) | ((ids >= start) & (ids < stop)))
            assert module.member_of(ids) is source
            seen.add(modality)
    assert seen == {MODALITIES["jpeg"], MODALITIES["text"]}


def test_unshift_gives_back_the_source_ids(two_sources):
    module = MixedDataModule(list(two_sources), [0.5, 0.5], seq_len=63, batch_size=1)
    text = module.members[1]
    sample = next(read_dataset(two_sources[1]).samples("train")).astype(np.int64)  # bos, tag, ids, eos
    shifted = np.where(sample >= NUM_SPECIAL, sample + text.offset, sample)
    assert np.array_equal(text.unshift(shifted), sample)
    assert shifted[0] == BOS_ID
    assert shifted[-1] == EOS_ID
    assert shifted[1] == MODALITIES["text"]
    assert module.member_of(shifted) is text


def test_decode_real_prepared_sources(photo_dataset, tmp_path):
    """A mixture of a real JPEG dataset with itself: blocks decode back through their own tokenizer and codec."""
    module = MixedDataModule([str(photo_dataset)] * 2, [0.5, 0.5], seq_len=63, batch_size=2)
    first, second = module.members
    sample = next(read_dataset(photo_dataset).samples("train")).astype(np.int64)
    moved = np.where(sample >= NUM_SPECIAL, sample + second.offset, sample)
    assert module.member_of(moved) is second
    assert module.member_of(sample) is first
    image = second.codec.decode(second.decode(moved))
    assert image.complete
    assert image.image.size == (64, 64)


def test_mixing_proportions(two_sources):
    module = MixedDataModule(list(two_sources), [0.7, 0.3], seq_len=31, batch_size=8)
    modality = torch.cat([b["modality"] for b in module.train_dataloader()])  # one epoch
    assert len(modality) >= 400
    share = float((modality == MODALITIES["jpeg"]).float().mean())
    assert abs(share - 0.7) < 0.06  # 3 standard deviations at 400 draws: 0.07


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epochs_in_a_row_have_the_same_length_of_full_batches(two_sources, num_workers):
    module = MixedDataModule(list(two_sources), [0.7, 0.3], seq_len=31, batch_size=8, num_workers=num_workers)
    loader = module.train_dataloader()
    epochs = [[b["input_ids"] for b in loader] for _ in range(3)]  # no silent stop after the first epoch
    assert [len(e) for e in epochs] == [len(loader)] * 3
    assert all(batch.shape == (8, 32) for e in epochs for batch in e)
    assert not torch.equal(epochs[0][0], epochs[1][0])  # each epoch reshuffles the sources


@pytest.mark.parametrize(
    ("sizes", "weights", "batch_size", "num_workers"),
    [((30, 20), 0.7, 4, 2), ((30, 20), 0.7, 4, 0), ((50, 10), 0.5, 2, 2), ((100, 7), 0.2, 1, 3)],
)
def test_epoch_length_is_never_more_than_litdata_delivers(token_dataset, sizes, weights, batch_size, num_workers):
    """The fixed epoch length against litdata's own mixture iterated to its end: only full batches."""
    a = token_dataset("a", items=(sizes[0], 0), seed=3)
    b = token_dataset("b", modality="text", num_ids=300, items=(sizes[1], 0), seed=4)
    module = MixedDataModule([str(a), str(b)], [weights, 1 - weights], 63, batch_size, num_workers=num_workers)
    length = len(module.train_dataloader())
    natural = StreamingDataLoader(module._train_dataset(), batch_size=batch_size, num_workers=num_workers)
    sizes = [len(batch["input_ids"]) for batch in natural]
    assert 0 < length <= len(sizes)
    assert set(sizes[:length]) == {batch_size}
    if num_workers == 0:  # one worker: the length is exactly where litdata's mixture stops
        assert length == len(sizes) or sizes[length] < batch_size


def test_bad_arguments(two_sources):
    with pytest.raises(ValueError, match="one weight per directory"):
        MixedDataModule(list(two_sources), [1.0], seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="at least one"):
        MixedDataModule([], [], seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="positive sum"):
        MixedDataModule(list(two_sources), [0, 0], seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="too large"):
        MixedDataModule(list(two_sources), [1, 1], seq_len=100_000, batch_size=1).setup("fit")
    with pytest.raises(ValueError, match="data_dirs only"):
        MixedDataModule(list(two_sources), [1, 1], 8, 1, sources=list(two_sources))


def test_sources_is_a_deprecated_name_of_data_dirs(two_sources):
    with pytest.deprecated_call(match="call it data_dirs"):
        module = MixedDataModule(sources=list(two_sources), weights=[1, 1], seq_len=63, batch_size=1)
    assert module.data_dirs == [Path(p) for p in two_sources]
