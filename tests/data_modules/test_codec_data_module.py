"""CodecDataModule: batches of blocks from a prepared directory, what it exposes, and its errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from jpeglm.codecs import JpegCodec
from jpeglm.data_modules import CodecDataModule
from jpeglm.shards import read_chunk, read_dataset
from jpeglm.tokenizer import BOS_ID, EOS_ID, MODALITIES, PAD_ID


def samples(data_dir, split="train") -> np.ndarray:
    """The split's ids in stored order, concatenated (what litdata cuts into blocks, chunk by chunk)."""
    return np.concatenate(list(read_dataset(data_dir).samples(split))).astype(np.int64)


def test_batches_are_blocks_of_the_prepared_samples(photo_dataset):
    module = CodecDataModule(str(photo_dataset), seq_len=127, batch_size=3, shuffle=False)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"].shape == (3, 128)
    assert batch["modality"].dtype == torch.int64
    assert batch["modality"].tolist() == [MODALITIES["jpeg"]] * 3
    stream = samples(photo_dataset)  # one chunk here: blocks are consecutive slices of the samples
    assert np.array_equal(batch["input_ids"].numpy().reshape(-1), stream[: 3 * 128])
    assert stream[0] == BOS_ID
    assert stream[1] == MODALITIES["jpeg"]


def test_vocab_tokenizer_and_codec_are_readable_before_setup(photo_dataset):
    module = CodecDataModule(str(photo_dataset), seq_len=127, batch_size=2)
    assert module.vocab_size == module.tokenizer.num_ids == read_dataset(photo_dataset).num_ids
    assert module.codec.spec == JpegCodec(size=64).spec
    first = next(read_dataset(photo_dataset).samples("train"))  # bos, tag, tokens, eos
    assert first[-1] == EOS_ID
    decoded = module.codec.decode(module.tokenizer.decode(first))
    assert decoded.complete
    assert decoded.image.size == (64, 64)


def test_validation_is_unshuffled_and_covers_the_val_split(photo_dataset):
    """Every id of the val split, in stored order; each chunk's last block is filled up with pad."""
    module = CodecDataModule(str(photo_dataset), seq_len=63, batch_size=1)
    blocks = torch.cat([b["input_ids"] for b in module.val_dataloader()]).numpy().reshape(-1)
    padded = []
    for chunk in json.loads((photo_dataset / "val" / "index.json").read_text())["chunks"]:
        ids = np.concatenate(list(read_chunk(photo_dataset / "val" / chunk["filename"], "uint16"))).astype(np.int64)
        padded += [ids, np.full(-len(ids) % 64, PAD_ID)]
    assert np.array_equal(blocks, np.concatenate(padded))
    assert np.array_equal(blocks[blocks != PAD_ID], samples(photo_dataset, "val"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_epoch_yields_every_block_once_in_a_new_order(token_dataset, num_workers):
    data = token_dataset(items=(32, 0), item_len=256)  # 128 blocks of 64 ids: 32 batches, none dropped
    module = CodecDataModule(str(data), seq_len=63, batch_size=4, num_workers=num_workers)
    loader = module.train_dataloader()
    epochs = [[tuple(row.tolist()) for batch in loader for row in batch["input_ids"]] for _ in range(3)]
    assert len(loader) == 32
    assert all(len(e) == 128 for e in epochs)
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert len(set(epochs[0])) == len(epochs[0])
    assert epochs[0] != epochs[1] != epochs[2]


def test_an_empty_val_split_gives_no_val_loader(token_dataset):
    module = CodecDataModule(str(token_dataset(items=(8, 0))), seq_len=63, batch_size=2)
    module.setup("fit")
    assert module.val_dataloader() == []


def test_clear_errors(token_dataset, tmp_path):
    with pytest.raises(ValueError, match="not a complete prepared dataset"):
        CodecDataModule(str(tmp_path / "missing"), seq_len=8, batch_size=1).setup("fit")
    incomplete = token_dataset("incomplete")
    (incomplete / "dataset.json").unlink()  # as a killed `jpeglm prepare` leaves it
    with pytest.raises(ValueError, match="not a complete prepared dataset"):
        _ = CodecDataModule(str(incomplete), seq_len=8, batch_size=1).vocab_size
    data = token_dataset("small", items=(4, 1), chunk_bytes=1000)  # chunks of a few hundred ids
    with pytest.raises(ValueError, match="seq_len=4095 is too large"):
        CodecDataModule(str(data), seq_len=4095, batch_size=1).setup("fit")
    with pytest.raises(ValueError, match="yields no batch"):
        CodecDataModule(str(data), seq_len=63, batch_size=64).train_dataloader()
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        CodecDataModule(str(data), seq_len=0, batch_size=1)
    shutil.rmtree(data / "train")
    meta = json.loads((data / "dataset.json").read_text())
    meta["splits"]["train"]["items"] = 0
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="empty train split"):
        CodecDataModule(str(data), seq_len=8, batch_size=1).setup("fit")


def test_a_rebuilt_train_loader_continues_the_old_one(token_dataset):
    """Lightning rebuilds loaders with ``reload_dataloaders_every_n_epochs``: the epochs must go on, not restart."""
    data = str(token_dataset(items=(24, 0)))
    reference = CodecDataModule(data, seq_len=63, batch_size=4).train_dataloader()
    epochs = [torch.stack([b["input_ids"] for b in reference]) for _ in range(2)]
    module = CodecDataModule(data, seq_len=63, batch_size=4)
    first = torch.stack([b["input_ids"] for b in module.train_dataloader()])
    second = torch.stack([b["input_ids"] for b in module.train_dataloader()])  # rebuilt after one epoch
    assert torch.equal(first, epochs[0])
    assert torch.equal(second, epochs[1])
