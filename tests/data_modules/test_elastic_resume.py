"""Elastic resume and the validation tail.

A position saved on one topology (ranks x loader workers) continues the epoch on another with no block lost and
none seen twice, for one dataset and for a mixture; validation yields every id of its split. Ranks are simulated
in one process: litdata reads ``WORLD_SIZE`` and ``GLOBAL_RANK`` when torch.distributed is not initialised, and
rank 0's state stands for every rank's (Lightning saves rank 0's, and every rank takes as many batches).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from recording import fit

from jpeglm.data_modules import CodecDataModule, MixedDataModule
from jpeglm.shards import read_chunk
from jpeglm.tokenizer import NUM_SPECIAL, PAD_ID

pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

SEQ_LEN, BATCH = 63, 4


def digest(row) -> str:
    return hashlib.blake2b(np.asarray(row, dtype=np.int64).tobytes(), digest_size=8).hexdigest()


@pytest.fixture
def modules(token_dataset):
    """``modules[kind](num_workers)``: the codec data (72 training blocks) or the mixture (48 + 32 blocks)."""
    codec = token_dataset("codec", items=(24, 4))
    jpeg = token_dataset("jpeg", items=(24, 4), seed=1)
    text = token_dataset("text", modality="text", num_ids=300, items=(16, 4), seed=2)
    return {
        "codec": lambda workers: CodecDataModule(str(codec), SEQ_LEN, BATCH, num_workers=workers),
        "mixed": lambda workers: MixedDataModule(
            [str(jpeg), str(text)], [0.7, 0.3], SEQ_LEN, BATCH, num_workers=workers
        ),
    }


def run(make, monkeypatch, world: int, rank: int, workers: int, state=None, batches=None, epochs: int = 1):
    """One simulated rank: ``(batches of block digests per epoch, its data module's state, loader)``."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("GLOBAL_RANK", str(rank))
    module = make(workers)
    if state is not None:
        module.load_state_dict(state)
    loader = module.train_dataloader()
    seen = []
    for _ in range(epochs):
        seen.append([])
        for batch in loader:
            seen[-1].append([digest(row) for row in batch["input_ids"]])
            if batches is not None and len(seen[-1]) == batches:
                break
    return seen, module.state_dict(), loader


def resume(make, monkeypatch, old: tuple[int, int], new: tuple[int, int], taken: int):
    """Uninterrupted epoch on ``old``; ``taken`` batches on ``old``, then the rest of the epoch (and the next) on
    ``new``. Returns per-rank batches: ``(uninterrupted, before, after, next epoch)`` and the new rank 0's loader."""
    whole = [run(make, monkeypatch, old[0], r, old[1])[0][0] for r in range(old[0])]
    before = [run(make, monkeypatch, old[0], r, old[1], batches=taken) for r in range(old[0])]
    after = [run(make, monkeypatch, new[0], r, new[1], state=before[0][1], epochs=2) for r in range(new[0])]
    return whole, [b[0][0] for b in before], [a[0][0] for a in after], [a[0][1] for a in after], after[0][2]


def blocks(per_rank) -> list[str]:
    return [block for batches in per_rank for batch in batches for block in batch]


CASES = {"2 ranks -> 1": ((2, 0), (1, 0), 3), "1 rank -> 2": ((1, 0), (2, 0), 5), "workers 2 -> 0": ((1, 2), (1, 0), 5)}


@pytest.mark.parametrize("case", CASES)
def test_codec_epoch_continues_on_another_topology(modules, monkeypatch, case):
    old, new, taken = CASES[case]
    whole, before, after, following, loader = resume(modules["codec"], monkeypatch, old, new, taken)
    epoch, seen = blocks(whole), blocks(before) + blocks(after)
    print(f"{case}: {len(blocks(before))} blocks before, {len(blocks(after))} after, of {len(epoch)}")
    assert len(seen) == len(set(seen)), "a block seen twice"
    assert set(seen) == set(epoch), "a block lost"
    assert loader.elastic_report["dropped"] == 0
    assert len({len(batches) for batches in after}) == 1, "every rank takes as many batches"
    assert len(loader) >= taken + len(after[0]), "Lightning reads the length once: it must not cut the epoch"
    if old[0] == new[0]:  # same ranks and batch size: each rank sees what it would have, in the same order
        assert after == [batches[taken:] for batches in whole]
    # the next epoch is an ordinary one of the new topology: every block once
    assert sorted(blocks(following)) == sorted(set(blocks(following)))
    assert len(blocks(following)) == len(epoch) - len(epoch) % (new[0] * BATCH)


def test_codec_epoch_continued_twice(modules, monkeypatch):
    """A checkpoint taken in a continued epoch continues it again (here 2 ranks -> 1 -> 2)."""
    make = modules["codec"]
    epoch = blocks([run(make, monkeypatch, 2, r, 0)[0][0] for r in range(2)])
    first = [run(make, monkeypatch, 2, r, 0, batches=2) for r in range(2)]
    second = run(make, monkeypatch, 1, 0, 0, state=first[0][1], batches=5)
    third = [run(make, monkeypatch, 2, r, 0, state=second[1]) for r in range(2)]
    seen = blocks([f[0][0] for f in first]) + blocks(second[0]) + blocks([t[0][0] for t in third])
    assert len(seen) == len(set(seen)) == len(epoch)
    assert set(seen) == set(epoch)


def member_blocks(module: MixedDataModule) -> set[str]:
    """Every training block of every member, as the mixture shows it (ids moved by the member's offset)."""
    found = set()
    for info in module.members:
        directory = info.path / "train"
        for chunk in json.loads((directory / "index.json").read_text())["chunks"]:
            ids = np.concatenate(list(read_chunk(directory / chunk["filename"], "uint16"))).astype(np.int64)
            ids = np.where(ids >= NUM_SPECIAL, ids + info.offset, ids)
            found |= {digest(b) for b in ids[: len(ids) // (SEQ_LEN + 1) * (SEQ_LEN + 1)].reshape(-1, SEQ_LEN + 1)}
    return found


@pytest.mark.parametrize("case", CASES)
def test_mixture_epoch_continues_on_another_topology(modules, monkeypatch, case):
    old, new, taken = CASES[case]
    whole, before, after, following, loader = resume(modules["mixed"], monkeypatch, old, new, taken)
    seen = blocks(before) + blocks(after)
    print(
        f"{case}: {len(blocks(before))} blocks before, {len(blocks(after))} after, uninterrupted {len(blocks(whole))}"
    )
    assert len(seen) == len(set(seen)), "a block seen twice"
    assert set(seen) <= member_blocks(modules["mixed"](0))
    assert len({len(batches) for batches in after}) == 1, "every rank takes as many batches"
    assert all(len(batch) == BATCH for batches in after for batch in batches)
    # the epoch ends when a member runs out, as an uninterrupted one: about as many blocks
    assert abs(len(seen) - len(blocks(whole))) <= new[0] * max(new[1], 1) * BATCH
    assert loader.elastic_report["batches"] == taken + len(after[0])
    assert len(set(blocks(following))) == len(blocks(following)) > 0


def test_trainer_resumes_on_fewer_workers(modules, tmp_path):
    """Through Lightning: saved with 2 workers, resumed with 0, the rest of the epoch is the uninterrupted run's
    (same ranks and batch size: each rank's blocks and their order are unchanged); the next epoch is litdata's own
    for 0 workers (another order) and as long."""
    make = modules["codec"]
    length = len(make(2).train_dataloader())
    total, step = 2 * length, length // 2 + 1
    uninterrupted = fit(make(2), tmp_path / "a", max_steps=total, checkpoint_every=step)
    resumed = fit(make(0), tmp_path / "b", max_steps=total, ckpt_path=str(tmp_path / "a" / f"step={step}.ckpt"))
    assert resumed[: length - step] == uninterrupted[step:length]
    assert [(s, e) for s, e, _, _ in resumed] == [(s, e) for s, e, _, _ in uninterrupted[step:]]
    assert len({d for _, e, d, _ in resumed if e == 1}) == length


def test_checkpoints_without_topology_resume_on_the_same_topology(modules, monkeypatch):
    """States saved before ``topology`` and ``epoch_batches`` were recorded resume as before (litdata's resume)."""
    make = modules["mixed"]
    whole = run(make, monkeypatch, 1, 0, 2)[0][0]
    _, state, _ = run(make, monkeypatch, 1, 0, 2, batches=5)
    old = {key: value for key, value in state["train_loader"].items() if key not in ("topology", "epoch_batches")}
    after = run(make, monkeypatch, 1, 0, 2, state={"train_loader": old})[0][0]
    assert after == whole[5:]


def test_validation_yields_every_token_once(token_dataset, monkeypatch):
    """A val split of 11 samples of 150 ids in several chunks (no multiple of 64): every id once, the pad reported."""
    data = token_dataset(items=(8, 11), item_len=150, chunk_bytes=700)
    chunks = json.loads((data / "val" / "index.json").read_text())["chunks"]
    assert len(chunks) > 1
    assert any(chunk["dim"] % (SEQ_LEN + 1) for chunk in chunks)
    expected = [np.concatenate(list(read_chunk(data / "val" / c["filename"], "uint16"))) for c in chunks]
    module = CodecDataModule(str(data), SEQ_LEN, batch_size=2)
    rows = [row for batch in module.val_dataloader() for row in batch["input_ids"].numpy()]
    stream = np.concatenate(rows)
    assert np.array_equal(stream[stream != PAD_ID], np.concatenate(expected).astype(np.int64))
    padded = sum(-c["dim"] % (SEQ_LEN + 1) for c in chunks)
    assert module.val_report == {
        "blocks": len(rows),
        "tokens": 11 * 150,
        "padded_tokens": padded,
        "left_out_blocks": 0,
    }
    assert (stream == PAD_ID).sum() == padded
    # on 2 ranks: every rank as many blocks, the rest left out and counted
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        module = CodecDataModule(str(data), SEQ_LEN, batch_size=2)
        per_rank.append([digest(row) for batch in module.val_dataloader() for row in batch["input_ids"]])
    assert len(per_rank[0]) == len(per_rank[1])
    assert len(set(per_rank[0] + per_rank[1])) == len(rows) - module.val_report["left_out_blocks"]
