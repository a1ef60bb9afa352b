"""Stream a prepared dataset (``jpeglm prepare``) as blocks of ``seq_len + 1`` token ids, with exact resume.

Keep "prepare" and "stream" apart (litgpt ``data/tinyllama.py``): this module only opens the litdata shards
that ``jpeglm prepare`` wrote. Each split is one token stream cut into fixed blocks (litdata ``TokensLoader``):
samples (bos, modality tag, codec tokens, eos) are concatenated and a block may span several of them.

Exact resume: the data module owns the position in the data. ``state_dict`` returns the train loader's
state and goes into every Lightning checkpoint; ``load_state_dict`` keeps it and it is applied to the loader
when the loader is built (or at once, when the loader already exists). Lightning also restores a
``StreamingDataLoader`` by itself, but silently drops that state when ``trainer.estimated_stepping_batches``
is read while ``max_epochs`` is set (litdata #775, Lightning #20550); owning it makes resume independent of
that. :class:`ResumableLoader` adds what an exact resume needs on top of litdata's loader: a restored
position is used once, so an epoch cut short (``max_steps``, ``limit_train_batches``, a fixed epoch length)
never makes the next epoch replay it, and a state saved on the last batch of an epoch starts a fresh epoch.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

from jpeglm._compat import ResumeAtWorkerCounts, distributed_position, local_dir, padded_tokens_loader
from jpeglm.data_modules.elastic import ElasticEpoch, clear, members_of, topology
from jpeglm.errors import UserError
from jpeglm.shards import PreparedDataset, check_blocks, read_dataset
from jpeglm.storage import S3Options, is_remote
from jpeglm.tokenizer import BOS_ID, MODALITIES, NUM_SPECIAL, PAD_ID, CodecTokenizer
from jpeglm.vocabulary import Modality, dataset_modalities

__all__ = [
    "CodecDataModule",
    "PreparedDataModule",
    "ResumableLoader",
    "StreamingDataModule",
    "TokenBlocks",
    "drop_captions",
]


class TokenBlocks(ResumeAtWorkerCounts, StreamingDataset):
    """One split of a prepared dataset as blocks of ``block_size`` ids: ``{"input_ids", "modality"}`` items.

    A mixture (mixed.py) sets :attr:`samples_per_worker` from a loaded state, so each worker resumes at the
    number of blocks it yielded (:class:`jpeglm._compat.ResumeAtWorkerCounts`; litdata's own split of one count
    over the workers is wrong for a mixture).

    Args:
        input_dir: the split's directory (``index.json`` + ``chunk-*.bin``).
        block_size: ids per block (``seq_len + 1``: inputs and the shifted targets).
        modality_id: tag id of the source's modality (3 image, 4 video, 5 text), carried by every block.
        offset: added to BPE ids (>= 8) to move them into a mixed vocabulary; special ids stay.
        shuffle: shuffle chunks and blocks (per epoch, from ``seed``).
        seed: the shuffle seed, and the seed of the caption dropout.
        caption_dropout: share of captioned samples whose caption is dropped (:func:`drop_captions`).
        cache_dir: for a split in object storage, where litdata keeps the chunks it downloads (None: litdata's).
        storage_options: for a split in object storage, litdata's ``storage_options`` (endpoint, credentials);
            ``PreparedDataset.stream_source`` gives ``input_dir``, ``cache_dir`` and these.
        pad_tail: also yield the last, partial block of every chunk, filled up with pad (validation: every id is
            seen; :func:`jpeglm._compat.padded_tokens_loader`). Training cuts whole blocks only.
        dtype: the ids' dtype in the chunks (``dataset.json``'s), read for the padded blocks.
        drop_last: give every rank and worker the same number of blocks (litdata; always so on several ranks).

    Attributes:
        elastic_blocks: set by an elastic resume (:mod:`jpeglm.data_modules.elastic`): for epoch
            :attr:`elastic_epoch`, the blocks each worker of this rank yields, instead of litdata's assignment.
    """

    def __init__(
        self,
        input_dir: str | Path,
        block_size: int,
        modality_id: int,
        offset: int = 0,
        shuffle: bool = False,
        seed: int = 42,
        caption_dropout: float = 0.0,
        cache_dir: str | None = None,
        storage_options: dict[str, Any] | None = None,
        pad_tail: bool = False,
        drop_last: bool = True,
        dtype: str = "uint16",
    ) -> None:
        loader = padded_tokens_loader(block_size, PAD_ID, dtype) if pad_tail else TokensLoader(block_size=block_size)
        super().__init__(
            input_dir=str(input_dir),
            item_loader=loader,
            shuffle=shuffle,
            drop_last=drop_last,  # True: every rank and worker gets the same number of blocks
            seed=seed,
            cache_dir=cache_dir,
            storage_options=storage_options,
        )
        self.modality_id = modality_id
        self.offset = offset
        self.caption_dropout = caption_dropout
        self.samples_per_worker: dict[int, int] | None = None
        self.block_size = block_size
        self.elastic_blocks: list[np.ndarray] | None = None
        self.elastic_epoch = 0

    def __iter__(self) -> Any:
        if self.elastic_blocks is None or self.current_epoch != self.elastic_epoch:
            return super().__iter__()
        super().__iter__()  # litdata's set-up of the worker and its cache; its own plan goes unused
        worker = torch.utils.data.get_worker_info()
        return self._serve(self.elastic_blocks[0 if worker is None else worker.id])

    def _serve(self, blocks: np.ndarray) -> Any:
        for index in blocks.tolist():
            yield self[index]

    def __getitem__(self, index: Any) -> dict[str, Any]:
        ids = super().__getitem__(index).astype(np.int64)  # (block_size,)
        if self.caption_dropout:
            ids = drop_captions(ids, self.caption_dropout, self.seed, getattr(index, "index", index))
        if self.offset:
            ids = np.where(ids >= NUM_SPECIAL, ids + self.offset, ids)
        return {"input_ids": ids, "modality": self.modality_id}


def drop_captions(ids: np.ndarray, rate: float, seed: int, block: int) -> np.ndarray:
    """The block with the caption of some of its samples dropped, for classifier-free guidance.

    A captioned sample is ``bos, text tag, caption..., image tag, ...``; a dropped one becomes ``bos, image tag,
    ...`` (the unconditional prompt of sampling), the rest of the block moves up and pad fills its end (pad is no
    target: the model's loss skips it). Whether a sample's caption is dropped is drawn from ``(seed, block,
    position of its bos)``: the same every time the block is read, so a resumed run sees the same data. Only
    captions that begin and end inside the block can be dropped (one cut by the block's start or end is kept).

    Args:
        ids: (block_size,) ids of one block.
        rate: share of the captions dropped.
        seed: the data's seed.
        block: the block's index in its split.
    """
    starts = np.flatnonzero((ids[:-1] == BOS_ID) & (ids[1:] == MODALITIES["text"]))
    keep = np.ones(len(ids), dtype=bool)
    for start in starts.tolist():
        ends = np.flatnonzero(ids[start + 2 :] == MODALITIES["jpeg"])
        if len(ends) and np.random.default_rng([seed, block, start]).random() < rate:
            keep[start + 1 : start + 2 + int(ends[0])] = False  # the text tag and the caption
    if keep.all():
        return ids
    return np.concatenate([ids[keep], np.full(len(ids) - int(keep.sum()), PAD_ID, dtype=ids.dtype)])


def collate_blocks(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack blocks into one tensor; modalities stay a list (see :meth:`ResumableLoader.__iter__`)."""
    return {
        "input_ids": torch.from_numpy(np.stack([item["input_ids"] for item in items])),  # (B, block_size)
        "modality": [item["modality"] for item in items],
    }


class ResumableLoader(StreamingDataLoader):
    """A ``StreamingDataLoader`` whose restored position is used exactly once, and an optional fixed length.

    litdata keeps ``restore`` set until an epoch runs to its natural end, so an epoch cut short after a resume
    would make the next epoch replay the restored position. Here every new epoch starts afresh unless a state
    was loaded since the last one began; a state saved after the last batch of an epoch (the loader's length)
    starts a fresh epoch, as an uninterrupted run would.

    Args:
        dataset: a ``StreamingDataset`` or ``CombinedStreamingDataset``.
        batch_size: blocks per batch.
        num_workers: loader worker processes.
        length: batches per epoch, for datasets whose length litdata cannot tell (a weighted mixture); the epoch
            is cut there. None: litdata's own length.
    """

    def __init__(self, dataset: Any, batch_size: int, num_workers: int = 0, length: int | None = None) -> None:
        super().__init__(
            dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=False, collate_fn=collate_blocks
        )
        self._length = length
        self._batches_in_epoch = 0
        self._resume_pending = False
        self._elastic: ElasticEpoch | None = None  # an epoch continued on another topology
        self._loaded: dict[str, Any] | None = None
        #: after an elastic resume: the epoch, blocks left in it (all ranks), blocks dropped, batches of the epoch
        self.elastic_report: dict[str, int] | None = None

    def __len__(self) -> int:
        # Lightning reads the length once per run: it must not cut a continued epoch short (an epoch shorter than
        # the length ends where its data ends)
        length = self._base_length()
        return length if self._elastic is None else max(length, self._elastic.length)

    def _base_length(self) -> int:
        return super().__len__() if self._length is None else self._length

    def _in_elastic_epoch(self) -> bool:
        return self._elastic is not None and self.current_epoch == self._elastic.epoch

    def _epoch_batches(self) -> int:
        """Batches of the current epoch in this run."""
        return self._elastic.length if self._in_elastic_epoch() else self._base_length()

    def topology(self) -> dict[str, int]:
        """World size, loader workers (0 counts as 1), batch size and nodes of this run."""
        _, world, nodes = distributed_position(members_of(self.dataset)[0])
        return topology(world, self.num_workers, self.batch_size, nodes)

    def __iter__(self) -> Any:
        # A generator: this body runs at the first `next`, so iterators Lightning creates but never starts
        # (it calls `iter` more than once around setup and restarts) do not consume the restored state.
        if not self._resume_pending:
            self.restore = False
            self._batches_in_epoch = 0
        self._resume_pending = False
        for batch in super().__iter__():
            self._batches_in_epoch += 1
            # Made here, not in the worker: every tensor a worker sends costs a shared-memory segment (~1 ms).
            batch["modality"] = torch.tensor(batch["modality"], dtype=torch.long)  # (B,)
            yield batch
            cut = self._elastic.length if self._in_elastic_epoch() else self._length
            if cut is not None and self._batches_in_epoch >= cut:
                return

    def state_dict(self) -> dict[str, Any]:
        """litdata's state, the batches taken this epoch, and what an elastic resume needs (topology, epoch)."""
        if self._resume_pending and self._elastic is not None:
            return self._loaded  # loaded and not yet begun: the same position
        state = {
            **super().state_dict(),
            "batches_in_epoch": self._batches_in_epoch,
            "epoch_batches": self._epoch_batches(),
            "topology": self.topology(),
        }
        if self._in_elastic_epoch():
            state["elastic"] = self._elastic.state()
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Continue from a saved position: litdata's resume on the same topology, else :meth:`_resume_elastic`.

        Checkpoints from before ``topology`` was saved take it from litdata's state.
        """
        clear(self.dataset)
        self._elastic, self._loaded, self.elastic_report = None, obj, None
        self._batches_in_epoch = obj.get("batches_in_epoch", 0)
        now = self.topology()
        saved = saved_topology(obj, now)
        # mid-epoch: the next `__iter__` continues from the state; before or after an epoch: it starts the next one
        mid = 0 < self._batches_in_epoch < obj.get("epoch_batches", self._base_length())
        if mid and (saved != now or "elastic" in obj):
            self._resume_elastic(obj, saved, now)
        elif saved != now:
            self.current_epoch, self.restore, self._resume_pending = obj["current_epoch"], False, False
        else:
            super().load_state_dict(obj)
            self._resume_pending = self.restore = mid

    def _resume_elastic(self, obj: dict[str, Any], saved: dict[str, int], now: dict[str, int]) -> None:
        """Deal the blocks this epoch has left to this run's ranks and workers (:mod:`jpeglm.data_modules.elastic`)."""
        earlier = obj.get("elastic", {"segments": [], "start": 0})
        counts = segment_counts(obj, saved, self._batches_in_epoch - earlier["start"])
        segments = [*earlier["segments"], {"topology": saved, "counts": counts}]
        self._elastic = ElasticEpoch(obj["current_epoch"], segments, self._batches_in_epoch)
        self._elastic.plan(self.dataset, now, distributed_position(members_of(self.dataset)[0])[0])
        self.current_epoch, self.restore, self._resume_pending = obj["current_epoch"] - 1, False, True
        e = self._elastic
        self.elastic_report = {"epoch": e.epoch, "remaining": e.remaining, "dropped": e.dropped, "batches": e.length}
        rank_zero_info(
            f"resuming epoch {e.epoch} on {now['world_size']} rank(s) x {now['num_workers']} worker(s) (saved on "
            f"{saved['world_size']} x {saved['num_workers']}): {e.remaining} blocks left, dealt anew; {e.dropped} "
            f"dropped so that every rank gets as many; the epoch ends after {e.length} batches"
        )


def validation_blocks(split_dir: Path, block_size: int) -> int:
    """Blocks of a split with every chunk's last, partial block padded (validation reads every id)."""
    index = json.loads((Path(split_dir) / "index.json").read_text())
    return sum(-(-chunk["dim"] // block_size) for chunk in index["chunks"])


def validation_report(dataset: Any, loader: ResumableLoader) -> dict[str, int]:
    """What a validation loader covers, all ranks together: ``blocks`` (pad-filled ones included), ``tokens`` (the
    split's ids), ``padded_tokens`` (pad ids filling up each chunk's last block; no target), ``left_out_blocks``
    (left out so that every rank gets as many: fewer than ranks * batch size, none on one rank)."""
    report = {"blocks": 0, "tokens": 0, "padded_tokens": 0, "left_out_blocks": 0}
    for member in members_of(dataset):
        served = member.get_len(max(loader.num_workers, 1), loader.batch_size)  # this rank's, every rank alike
        chunks = json.loads((local_dir(member) / "index.json").read_text())["chunks"]
        blocks = sum(-(-chunk["dim"] // member.block_size) for chunk in chunks)
        tokens = sum(chunk["dim"] for chunk in chunks)
        report["blocks"] += blocks
        report["tokens"] += tokens
        report["padded_tokens"] += blocks * member.block_size - tokens
        report["left_out_blocks"] += blocks - served * distributed_position(member)[1]
    return report


def saved_topology(obj: dict[str, Any], now: dict[str, int]) -> dict[str, int]:
    """The topology a loader state was saved on; older states: from litdata's own state (else ``now``)."""
    if "topology" in obj:
        return obj["topology"]
    state = obj.get("dataset") or {}
    state = state if "world_size" in state else next(iter(state.values()), {})  # a mixture: its first member's
    if not isinstance(state, dict) or "world_size" not in state:
        return now
    return topology(state["world_size"], state["num_workers"], state["batch_size"], now["num_nodes"])


def segment_counts(obj: dict[str, Any], saved: dict[str, int], batches: int) -> dict[int, list[int]]:
    """Blocks each worker took from each member since the segment began (the same on every rank).

    A mixture's counts are litdata's (per worker and member); one dataset's workers took whole batches in turn.
    """
    yielded = obj.get("num_samples_yielded")
    if isinstance(yielded, dict):
        return {int(worker): list(counts) for worker, counts in yielded.items()}
    size, workers = saved["batch_size"], saved["num_workers"]
    return {worker: [size * len(range(worker, batches, workers))] for worker in range(workers)}


class StreamingDataModule(LightningDataModule):
    """What every jpeglm data module shares: loaders of ``{"input_ids", "modality"}`` batches and exact resume.

    Subclasses build the datasets (:meth:`_train_dataset`, :meth:`_val_dataset`) and say the vocabulary size.
    """

    def __init__(self, seq_len: int, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {num_workers}")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._train_loader: ResumableLoader | None = None
        self._loader_state: dict[str, Any] | None = None
        self._token_bytes: list[int] | None = None
        #: what the last validation loader covers (:func:`validation_report`), None before it is built
        self.val_report: dict[str, int] | None = None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def modalities(self) -> list[Modality]:
        """What the ids mean: each modality's tokenizer and id offset (see ``DescribesVocabulary``)."""
        raise NotImplementedError

    def token_byte_lengths(self) -> list[int]:
        """Bytes of codec stream (or UTF-8 text) each id stands for, 0 for special ids: the model's bits per byte."""
        if self._token_bytes is None:
            lengths = [0] * self.vocab_size
            for modality in self.modalities():
                for i in range(NUM_SPECIAL, modality.tokenizer.num_ids):
                    lengths[i + modality.offset] = len(modality.tokenizer.token_bytes(i))
            self._token_bytes = lengths
        return self._token_bytes

    def _train_dataset(self) -> Any:
        raise NotImplementedError

    def _val_dataset(self) -> Any | None:
        raise NotImplementedError

    def _train_length(self, dataset: Any) -> int | None:
        """Batches per epoch when litdata cannot tell (None: litdata's length)."""
        return None

    # ------------------------------------------------------------------ loaders

    def train_dataloader(self) -> ResumableLoader:
        dataset = self._train_dataset()
        loader = ResumableLoader(dataset, self.batch_size, self.num_workers, self._train_length(dataset))
        if len(loader) == 0:
            raise UserError(
                f"the train split yields no batch of {self.batch_size} blocks of seq_len + 1 = {self.seq_len + 1} "
                f"ids per rank and worker: lower seq_len, batch_size or num_workers, or prepare more data"
            )
        state = self._loader_state
        if state is None and self._train_loader is not None:
            state = self._train_loader.state_dict()  # a rebuilt loader continues where the old one stopped
        if state is not None:
            loader.load_state_dict(state)
            self._loader_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> Any:
        dataset = self._val_dataset()
        if dataset is None:
            return []  # Lightning skips validation for an empty list of loaders
        loader = ResumableLoader(dataset, self.batch_size, self.num_workers)
        self.val_report = validation_report(dataset, loader)
        if self.val_report["padded_tokens"] or self.val_report["left_out_blocks"]:
            r = self.val_report
            rank_zero_info(
                f"validation: {r['tokens']} ids in {r['blocks']} blocks of {self.seq_len + 1}; {r['padded_tokens']} "
                f"pad ids (no targets) fill up the last block of each chunk; {r['left_out_blocks']} blocks left out "
                f"so that every rank gets as many"
            )
        return loader

    # ------------------------------------------------------------------ exact resume

    def state_dict(self) -> dict[str, Any]:
        """The train loader's position (goes into every Lightning checkpoint)."""
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        return {} if self._loader_state is None else {"train_loader": self._loader_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a position from a checkpoint; it is applied to the train loader (now, or when it is built)."""
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._loader_state = state


class PreparedDataModule(StreamingDataModule):
    """Blocks of ``seq_len + 1`` ids from one prepared directory: :class:`CodecDataModule` without its schema.

    :class:`CodecDataModule` takes the directory from the user; ``SyntheticDataModule`` makes one. Both keep
    their own constructor arguments as hyperparameters.
    """

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int,
        batch_size: int,
        num_workers: int,
        shuffle: bool,
        seed: int,
        caption_dropout: float = 0.1,
        storage: S3Options | None = None,
    ):
        super().__init__(seq_len, batch_size, num_workers, seed)
        if not 0.0 <= caption_dropout <= 1.0:
            raise UserError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        # a URL stays a string: Path("s3://b/p") would collapse its "//"
        self.data_dir = data_dir if is_remote(data_dir) else Path(data_dir).expanduser()
        self.storage = storage
        self.shuffle = shuffle
        self.caption_dropout = caption_dropout

    @cached_property
    def dataset(self) -> PreparedDataset:
        """The prepared dataset's description (``dataset.json``), read once (for a URL: fetched into the cache)."""
        return read_dataset(self.data_dir, self.storage)

    @property
    def vocab_size(self) -> int:
        """Ids the model must embed: the tokenizer's ``num_ids``."""
        return self.dataset.num_ids

    @property
    def modality_id(self) -> int:
        """Tag id of the dataset's modality (3 image/jpeg, 4 video/avc, 5 text)."""
        return MODALITIES[self.dataset.modality]

    @cached_property
    def tokenizer(self) -> CodecTokenizer:
        """The dataset's tokenizer (to decode samples), read once."""
        return self.dataset.tokenizer

    @cached_property
    def codec(self) -> Any:
        """The codec that made the dataset's byte streams (None for text), checked against this installation."""
        return self.tokenizer.codec

    def modalities(self) -> list[Modality]:
        """The dataset's modality at offset 0 (and, for captioned images, the captions' text modality after it)."""
        return dataset_modalities(self.dataset)

    def setup(self, stage: str) -> None:
        """Check that the train split has blocks of ``seq_len + 1`` ids."""
        check_blocks(self._train_dir(), self.seq_len)

    def _train_dir(self) -> Path:
        directory = self.dataset.split_dir("train")
        if directory is None:
            raise UserError(f"{self.data_dir} has an empty train split: nothing to train on")
        return directory

    def _train_dataset(self) -> TokenBlocks:
        dropout = self.caption_dropout if getattr(self.dataset, "captions", None) else 0.0
        self._train_dir()  # an empty train split is an error
        return TokenBlocks(
            **self.dataset.stream_source("train"), block_size=self.seq_len + 1, modality_id=self.modality_id,
            shuffle=self.shuffle, seed=self.seed, caption_dropout=dropout,
        )  # fmt: skip

    def _val_dataset(self) -> TokenBlocks | None:
        directory = self.dataset.split_dir("val")
        if directory is None or validation_blocks(directory, self.seq_len + 1) == 0:
            return None  # no validation
        source = self.dataset.stream_source("val")
        return TokenBlocks(
            **source, block_size=self.seq_len + 1, modality_id=self.modality_id, seed=self.seed, pad_tail=True,
            drop_last=False, dtype=self.dataset.dtype,
        )  # fmt: skip


class CodecDataModule(PreparedDataModule):
    """Blocks of ``seq_len + 1`` token ids from one prepared dataset (``jpeglm prepare``), with exact resume.

    Batches are ``{"input_ids": LongTensor (B, seq_len + 1), "modality": LongTensor (B,)}``; ``modality`` is
    the tag id of the data's modality (3 image/jpeg, 4 video/avc, 5 text). :attr:`vocab_size`,
    :attr:`tokenizer` and :attr:`codec` are readable before ``setup`` (they read small files once), so the
    CLI can link the vocabulary size to the model and callbacks can decode samples.

    Args:
        data_dir: a directory written by ``jpeglm prepare`` (with ``dataset.json``, ``train/``, ``tokenizer/``), or
            such a dataset in object storage, ``s3://bucket/prefix`` (its small files are fetched into
            ``$JPEGLM_CACHE``, default ``~/.cache/jpeglm``; litdata streams the chunks).
        seq_len: tokens the model sees per sequence; blocks hold ``seq_len + 1`` ids (inputs and targets).
        batch_size: sequences per batch on each rank.
        num_workers: loader worker processes per rank (0: load in the training process).
        shuffle: shuffle the training blocks (per epoch, from ``seed``); validation is never shuffled.
        seed: seed of the shuffle and of the caption dropout.
        caption_dropout: for captioned images (``jpeglm prepare --captions``), the share of training samples whose
            caption is dropped (``bos, image tag, image, eos``), so the model also learns the unconditional
            distribution that classifier-free guidance needs; decided per sample from the seed, so exact resume
            holds. Validation keeps every caption. No effect on other data.
        storage: how to reach a ``data_dir`` in object storage (``s3://bucket/prefix``): endpoint, region and
            credentials (``jpeglm.storage.S3Options``); unset fields come from ``AWS_ENDPOINT_URL``,
            ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``. No effect on a local directory.
    """

    def __init__(
        self,
        data_dir: str,
        seq_len: int,
        batch_size: int,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 42,
        caption_dropout: float = 0.1,
        storage: S3Options | None = None,
    ) -> None:
        super().__init__(data_dir, seq_len, batch_size, num_workers, shuffle, seed, caption_dropout, storage)
        self.save_hyperparameters(ignore=["storage"])  # credentials stay out of checkpoints
