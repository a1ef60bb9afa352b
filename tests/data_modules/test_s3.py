"""Prepared datasets in object storage (``s3://``, a live server from tests/s3_server.py): read, streamed and
resumed exactly as the same dataset on local disk."""

from __future__ import annotations

import json

import pytest
import torch
from recording import fit

from jpeglm.data_modules import CodecDataModule, MixedDataModule
from jpeglm.errors import UserError
from jpeglm.shards import read_dataset
from jpeglm.storage import open_store

pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

SEQ_LEN, BATCH = 63, 4


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JPEGLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(batch["input_ids"], batch["modality"]) for batch in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all((x == y).all() and (m == n).all() for (x, m), (y, n) in zip(a, b, strict=True))


def test_prepared_dataset_reads_the_same_from_s3(s3_server, photo_dataset, cache):
    url = s3_server.upload(photo_dataset, s3_server.bucket("photos") + "/run1/data")
    remote, local = read_dataset(url, s3_server.options), read_dataset(photo_dataset)
    assert (remote.modality, remote.num_ids, remote.dtype, remote.splits) == (
        local.modality,
        local.num_ids,
        local.dtype,
        local.splits,
    )
    assert remote.url == url
    assert remote.location == url
    assert cache in remote.path.parents  # the small files are in the cache, the chunks are not
    assert not list(remote.path.rglob("chunk-*.bin"))
    assert remote.tokenizer.num_ids == local.tokenizer.num_ids
    assert remote.codec.spec == local.codec.spec
    for split in ("train", "val"):
        assert [s.tolist() for s in remote.samples(split)] == [s.tolist() for s in local.samples(split)]
    assert read_dataset(url + "/", s3_server.options).path == remote.path  # fetched once, used again


def test_codec_data_module_streams_from_s3_as_from_disk(s3_server, token_dataset):
    data = token_dataset("codec", items=(24, 8))
    url = s3_server.upload(data, s3_server.bucket("stream") + "/codec")
    local = CodecDataModule(str(data), seq_len=SEQ_LEN, batch_size=BATCH)
    remote = CodecDataModule(url, seq_len=SEQ_LEN, batch_size=BATCH, storage=s3_server.options)
    assert remote.data_dir == url  # a URL stays a string
    remote.setup("fit")
    assert remote.vocab_size == local.vocab_size
    expected = _batches(local.train_dataloader())
    assert len(expected) >= 8
    assert _same(_batches(remote.train_dataloader()), expected)
    assert _same(_batches(remote.val_dataloader()), _batches(local.val_dataloader()))


def test_a_dataset_prepared_again_under_the_same_url_streams_its_new_chunks(s3_server, token_dataset):
    # The same chunk names with other content: litdata's chunk cache of the first version must not serve them.
    first, second = token_dataset("first", items=(24, 8), seed=1), token_dataset("second", items=(24, 8), seed=2)
    url = s3_server.upload(first, s3_server.bucket("again") + "/codec")
    old = CodecDataModule(url, seq_len=SEQ_LEN, batch_size=BATCH, storage=s3_server.options)
    on_disk = CodecDataModule(str(first), SEQ_LEN, BATCH)
    assert _same(_batches(old.train_dataloader()), _batches(on_disk.train_dataloader()))
    open_store(url, s3_server.options).delete("")
    s3_server.upload(second, url)
    new = CodecDataModule(url, seq_len=SEQ_LEN, batch_size=BATCH, storage=s3_server.options)
    expected = _batches(CodecDataModule(str(second), SEQ_LEN, BATCH).train_dataloader())
    assert not _same(expected, _batches(old.train_dataloader()))
    assert _same(_batches(new.train_dataloader()), expected)


def test_mixed_data_module_streams_from_s3_as_from_disk(s3_server, token_dataset, monkeypatch):
    jpeg = token_dataset("jpeg", items=(24, 8), seed=1)
    text = token_dataset("text", modality="text", num_ids=300, items=(16, 8), seed=2)
    bucket = s3_server.bucket("mixed")
    for name, value in s3_server.env.items():  # storage from the environment, as a user would set it
        monkeypatch.setenv(name, value)
    urls = [s3_server.upload(jpeg, f"{bucket}/jpeg"), s3_server.upload(text, f"{bucket}/text")]
    local = MixedDataModule([str(jpeg), str(text)], [0.7, 0.3], SEQ_LEN, BATCH, num_workers=2)
    remote = MixedDataModule([urls[0], str(text)], [0.7, 0.3], SEQ_LEN, BATCH, num_workers=2)  # s3 and local
    remote.setup("fit")
    assert remote.offsets == local.offsets
    assert remote.members[0].path == urls[0]
    expected = _batches(local.train_dataloader())
    assert _same(_batches(remote.train_dataloader()), expected)
    assert _same(_batches(remote.val_dataloader()), _batches(local.val_dataloader()))


def test_resume_from_s3_sees_the_batches_of_an_uninterrupted_run(s3_server, token_dataset, tmp_path):
    data = token_dataset("codec", items=(24, 4))
    url = s3_server.upload(data, s3_server.bucket("resume") + "/codec")

    def module() -> CodecDataModule:
        return CodecDataModule(url, seq_len=SEQ_LEN, batch_size=BATCH, storage=s3_server.options)

    length = len(module().train_dataloader())
    total, step = length + length // 2, length // 2 + 1  # resume mid-epoch, run into the second epoch
    uninterrupted = fit(module(), tmp_path / "a", max_steps=total, checkpoint_every=step)
    local = fit(CodecDataModule(str(data), seq_len=SEQ_LEN, batch_size=BATCH), tmp_path / "l", max_steps=total)
    assert uninterrupted == local  # the same blocks in the same order as from disk
    checkpoint = tmp_path / "a" / f"step={step}.ckpt"
    assert s3_server.secret_access_key.encode() not in checkpoint.read_bytes()  # no credentials in checkpoints
    resumed = fit(module(), tmp_path / "b", max_steps=total, ckpt_path=str(checkpoint))
    assert resumed == uninterrupted[step:]
    assert len({d for _, _, d, _ in uninterrupted[:length]}) == length


def test_incomplete_s3_datasets_are_one_line_errors(s3_server, token_dataset):
    data = token_dataset("codec", items=(24, 4))
    bucket = s3_server.bucket("broken")
    url = s3_server.upload(data, f"{bucket}/missing-chunk")
    store = open_store(url, s3_server.options)
    chunk = json.loads(store.read_text("train/index.json"))["chunks"][1]["filename"]
    store.delete(f"train/{chunk}")
    module = CodecDataModule(url, seq_len=SEQ_LEN, batch_size=BATCH, storage=s3_server.options)
    with pytest.raises(UserError, match=rf"^{url}/train lacks 1 of its \d+ chunk files \({chunk}\)"):
        module.setup("fit")
    unfinished = open_store(f"{bucket}/unfinished", s3_server.options)
    unfinished.write_text(".prepare/state.json", "{}")
    with pytest.raises(UserError, match=r"s3://broken/unfinished is not a complete .* unfinished `jpeglm prepare`"):
        read_dataset(unfinished.url, s3_server.options)


def test_elastic_resume_from_s3_serves_the_blocks_it_does_from_disk(s3_server, token_dataset, monkeypatch):
    """2 ranks -> 1 with 2 workers: the continued epoch reads blocks of several chunks out of litdata's order, from
    chunks litdata downloads (and may have released); it must see exactly what it sees on local disk."""
    from test_elastic_resume import blocks, resume

    data = token_dataset("codec", items=(24, 4), chunk_bytes=2048)
    url = s3_server.upload(data, s3_server.bucket("elastic") + "/codec")
    assert len(json.loads(open_store(url, s3_server.options).read_text("train/index.json"))["chunks"]) > 2
    local = resume(lambda w: CodecDataModule(str(data), SEQ_LEN, BATCH, num_workers=w), monkeypatch, (2, 2), (1, 2), 3)
    remote = resume(
        lambda w: CodecDataModule(url, SEQ_LEN, BATCH, num_workers=w, storage=s3_server.options),
        monkeypatch,
        (2, 2),
        (1, 2),
        3,
    )
    assert remote[:4] == local[:4]
    seen = blocks(remote[1]) + blocks(remote[2])
    assert len(seen) == len(set(seen)) == len(blocks(remote[0]))
