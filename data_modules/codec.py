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

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningDataModule
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

from jpeglm._compat import ResumeAtWorkerCounts
from jpeglm.errors import UserError
from jpeglm.shards import PreparedDataset, check_blocks, count_blocks, read_dataset
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
    ) -> None:
        super().__init__(
            input_dir=str(input_dir),
            item_loader=TokensLoader(block_size=block_size),
            shuffle=shuffle,
            drop_last=True,  # every rank and worker gets the same number of blocks
            seed=seed,
        )
        self.modality_id = modality_id
        self.offset = offset
        self.caption_dropout = caption_dropout
        self.samples_per_worker: dict[int, int] | None = None

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

    def __len__(self) -> int:
        return super().__len__() if self._length is None else self._length

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
            if self._length is not None and self._batches_in_epoch >= self._length:
                return

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "batches_in_epoch": self._batches_in_epoch}

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._batches_in_epoch = obj.get("batches_in_epoch", 0)
        # mid-epoch: the next `__iter__` continues from the state; before or after an epoch: it starts the next one
        self._resume_pending = self.restore = 0 < self._batches_in_epoch < len(self)


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
        return ResumableLoader(dataset, self.batch_size, self.num_workers)

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
    ):
        super().__init__(seq_len, batch_size, num_workers, seed)
        if not 0.0 <= caption_dropout <= 1.0:
            raise UserError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.data_dir = Path(data_dir).expanduser()
        self.shuffle = shuffle
        self.caption_dropout = caption_dropout

    @cached_property
    def dataset(self) -> PreparedDataset:
        """The prepared dataset's description (``dataset.json``), read once."""
        return read_dataset(self.data_dir)

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
        return TokenBlocks(
            self._train_dir(), self.seq_len + 1, self.modality_id, shuffle=self.shuffle, seed=self.seed,
            caption_dropout=dropout,
        )  # fmt: skip

    def _val_dataset(self) -> TokenBlocks | None:
        directory = self.dataset.split_dir("val")
        if directory is None or count_blocks(directory, self.seq_len + 1) == 0:
            return None  # no validation (a tiny dataset's val split may hold less than one block)
        return TokenBlocks(directory, self.seq_len + 1, self.modality_id, shuffle=False, seed=self.seed)


class CodecDataModule(PreparedDataModule):
    """Blocks of ``seq_len + 1`` token ids from one prepared dataset (``jpeglm prepare``), with exact resume.

    Batches are ``{"input_ids": LongTensor (B, seq_len + 1), "modality": LongTensor (B,)}``; ``modality`` is
    the tag id of the data's modality (3 image/jpeg, 4 video/avc, 5 text). :attr:`vocab_size`,
    :attr:`tokenizer` and :attr:`codec` are readable before ``setup`` (they read small files once), so the
    CLI can link the vocabulary size to the model and callbacks can decode samples.

    Args:
        data_dir: a directory written by ``jpeglm prepare`` (with ``dataset.json``, ``train/``, ``tokenizer/``).
        seq_len: tokens the model sees per sequence; blocks hold ``seq_len + 1`` ids (inputs and targets).
        batch_size: sequences per batch on each rank.
        num_workers: loader worker processes per rank (0: load in the training process).
        shuffle: shuffle the training blocks (per epoch, from ``seed``); validation is never shuffled.
        seed: seed of the shuffle and of the caption dropout.
        caption_dropout: for captioned images (``jpeglm prepare --captions``), the share of training samples whose
            caption is dropped (``bos, image tag, image, eos``), so the model also learns the unconditional
            distribution that classifier-free guidance needs; decided per sample from the seed, so exact resume
            holds. Validation keeps every caption. No effect on other data.
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
    ) -> None:
        super().__init__(data_dir, seq_len, batch_size, num_workers, shuffle, seed, caption_dropout)
        self.save_hyperparameters()
