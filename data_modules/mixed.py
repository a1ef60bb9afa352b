"""Mix several prepared datasets (JPEG, AVC, text) in one stream, each with its own BPE, without id collisions.

Every jpeglm tokenizer shares one id layout (jpeglm/tokenizer.py): ids 0..7 are the specials (pad, bos, eos,
the modality tags), then the member's BPE symbols. Mixing keeps the specials and moves each member's BPE ids
into a block of its own::

    member 0: ids 8 .. num_ids_0 - 1                      offset 0
    member 1: ids num_ids_0 .. num_ids_0 + num_ids_1 - 9   offset num_ids_0 - 8
    ...                                                    offset = sum of earlier members' (num_ids - 8)

so ``vocab_size = 8 + sum(num_ids - 8)``. A sampled sequence is decoded by finding its member
(:meth:`MixedDataModule.member_of`), undoing the shift (:meth:`MixtureMember.unshift`) and decoding with that
member's tokenizer and codec (:meth:`MixtureMember.decode`).

Each block of ``seq_len + 1`` ids comes from one member, drawn at random with the given weights
(``litdata.CombinedStreamingDataset``); batches carry each sequence's modality tag.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_warn
from litdata import CombinedStreamingDataset

from jpeglm._compat import combined_members, combined_weights, local_dir, samples_yielded, world_size
from jpeglm.data_modules.codec import StreamingDataModule, TokenBlocks, validation_blocks
from jpeglm.errors import UserError
from jpeglm.shards import PreparedDataset, check_blocks, count_blocks, read_dataset
from jpeglm.storage import S3Options, is_remote
from jpeglm.tokenizer import MODALITIES, NUM_SPECIAL, CodecTokenizer
from jpeglm.vocabulary import Modality, dataset_modalities

__all__ = ["MixedBlocks", "MixedDataModule", "MixtureMember"]


@dataclass(frozen=True)
class MixtureMember:
    """One member of a mixture (a prepared dataset): where its ids sit in the mixed vocabulary, and how to decode them.

    Attributes:
        path: the prepared directory (or its ``s3://`` URL).
        modality: "jpeg", "avc" or "text".
        modality_id: the modality's tag id (3, 4 or 5).
        weight: share of sequences drawn from this member (normalized).
        offset: added to the member's BPE ids (>= 8) in the mixed vocabulary.
        num_ids: ids of the member's own tokenizer; its BPE ids occupy ``[8 + offset, num_ids + offset)``.
        dataset: the prepared dataset (its ``tokenizer`` and ``codec`` decode samples).
    """

    path: Path | str
    modality: str
    modality_id: int
    weight: float
    offset: int
    num_ids: int
    dataset: PreparedDataset

    @property
    def id_range(self) -> tuple[int, int]:
        """The member's BPE ids in the mixed vocabulary: ``[start, stop)``."""
        return NUM_SPECIAL + self.offset, self.num_ids + self.offset

    @cached_property
    def tokenizer(self) -> CodecTokenizer:
        """The member's own tokenizer (its ids are unshifted)."""
        return self.dataset.tokenizer

    @cached_property
    def codec(self) -> Any:
        """The codec that made the member's streams (None for text)."""
        return self.tokenizer.codec

    def unshift(self, ids: np.ndarray) -> np.ndarray:
        """Mixed ids back into the member tokenizer's ids (special ids stay; other members' ids become pad)."""
        ids = np.asarray(ids, dtype=np.int64)
        start, stop = self.id_range
        inside = (ids >= start) & (ids < stop)
        return np.where(ids < NUM_SPECIAL, ids, np.where(inside, ids - self.offset, 0))

    def decode(self, ids: np.ndarray) -> bytes:
        """The bytes that mixed ids of this member stand for (ids of other members are dropped)."""
        return self.tokenizer.decode(self.unshift(ids))


class MixedBlocks(CombinedStreamingDataset):
    """litdata's weighted mixture, resuming every worker of every member at the block where it stopped.

    A resumed loader hands the mixture each worker's count of blocks drawn per member; passing them on to the
    members (:attr:`TokenBlocks.samples_per_worker`) replaces litdata's split of one total over the workers,
    which is wrong for a mixture with more than one worker. An elastic resume (another topology) deals each
    member's remaining blocks itself (:mod:`jpeglm.data_modules.elastic`) and replays the member draws from
    :attr:`draw_seed`.
    """

    def __init__(self, datasets: list[Any], weights: list[float], seed: int, iterate_over_all: bool = False) -> None:
        super().__init__(datasets, seed=seed, weights=weights, iterate_over_all=iterate_over_all)
        self.draw_seed = seed  # every worker draws its members from random.Random(draw_seed)

    def __iter__(self) -> Any:
        counts = samples_yielded(self)  # {worker: [blocks per member]} of a loaded state, else None
        for index, dataset in enumerate(combined_members(self)):
            dataset.samples_per_worker = None if counts is None else {w: c[index] for w, c in counts.items()}
        return super().__iter__()


class MixedDataModule(StreamingDataModule):
    """Blocks of ``seq_len + 1`` ids drawn from several prepared datasets with given weights, with exact resume.

    Batches are ``{"input_ids": LongTensor (B, seq_len + 1), "modality": LongTensor (B,)}``; ids are in the
    mixed vocabulary (module docstring) and ``modality`` is each sequence's tag id. An epoch ends when one
    member runs out (litdata ``iterate_over_all=False``); its length in batches is fixed in advance to what
    every rank and worker surely delivers (see :meth:`_train_length`), so all ranks stop at the same step.
    Validation goes over every member's val split once, unshuffled.

    As in litdata, every worker of every rank draws its members from the same ``random.Random(seed)``, anew each
    epoch: the shares are right over an epoch, but the i-th batch of each worker mixes its members alike.

    Args:
        data_dirs: prepared dataset directories (``jpeglm prepare``) or their ``s3://bucket/prefix`` URLs, the
            members of the mixture, in the order that fixes the id offsets.
        weights: share of sequences drawn from each member (normalized to sum to 1).
        seq_len: tokens the model sees per sequence; blocks hold ``seq_len + 1`` ids.
        batch_size: sequences per batch on each rank.
        num_workers: loader worker processes per rank (0: load in the training process).
        seed: seed of the shuffles and of the member draws.
        sources: deprecated name of ``data_dirs`` (recipes written before 0.2); give one of the two.
        caption_dropout: share of a captioned member's training samples whose caption is dropped (see
            :class:`~jpeglm.data_modules.CodecDataModule`); no effect on other members.
        storage: how to reach members in object storage (``jpeglm.storage.S3Options``; unset fields come from the
            AWS environment variables), as for :class:`~jpeglm.data_modules.CodecDataModule`.
    """

    def __init__(
        self,
        data_dirs: list[str] | None = None,
        weights: list[float] | None = None,
        seq_len: int = 12288,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 42,
        sources: list[str] | None = None,
        caption_dropout: float = 0.1,
        storage: S3Options | None = None,
    ) -> None:
        super().__init__(seq_len, batch_size, num_workers, seed)
        self.storage = storage
        if not 0.0 <= caption_dropout <= 1.0:
            raise UserError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.caption_dropout = caption_dropout
        if sources is not None:
            if data_dirs is not None:
                raise UserError("give data_dirs only (sources is its deprecated name)")
            rank_zero_deprecation("MixedDataModule(sources=...) is deprecated: call it data_dirs")
            data_dirs = sources
        if not data_dirs:
            raise UserError("data_dirs is empty: give at least one prepared dataset directory")
        weights = [1.0] * len(data_dirs) if weights is None else weights
        if len(weights) != len(data_dirs):
            raise UserError(f"{len(data_dirs)} data_dirs but {len(weights)} weights: give one weight per directory")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"weights must be >= 0 with a positive sum, got {weights}")
        self.save_hyperparameters(ignore=["storage"])  # credentials stay out of checkpoints
        self.data_dirs = [s if is_remote(s) else Path(s).expanduser() for s in data_dirs]  # a URL stays a string
        self.weights = [w / sum(weights) for w in weights]

    @cached_property
    def members(self) -> list[MixtureMember]:
        """Each member's modality, weight, id offset and tokenizer, in the order given."""
        infos, offset = [], 0
        for path, weight in zip(self.data_dirs, self.weights, strict=True):
            dataset = read_dataset(path, self.storage)
            infos.append(
                MixtureMember(
                    path, dataset.modality, MODALITIES[dataset.modality], weight, offset, dataset.num_ids, dataset
                )
            )
            offset += dataset.num_ids - NUM_SPECIAL
        return infos

    @property
    def offsets(self) -> list[int]:
        """The id offset of each member's BPE ids."""
        return [info.offset for info in self.members]

    @property
    def vocab_size(self) -> int:
        """Ids the model must embed: ``8 + sum(num_ids - 8)`` over the members."""
        return NUM_SPECIAL + sum(info.num_ids - NUM_SPECIAL for info in self.members)

    def modalities(self) -> list[Modality]:
        """Every member's modalities (a captioned member's captions included), tokenizers and id offsets, in order."""
        return [modality for m in self.members for modality in dataset_modalities(m.dataset, m.offset)]

    def member_of(self, ids: np.ndarray) -> MixtureMember | None:
        """The member whose BPE ids a sequence holds (the most of), or None for a sequence of special ids only."""
        ids = np.asarray(ids).reshape(-1)
        counts = [np.count_nonzero((ids >= a) & (ids < b)) for a, b in (s.id_range for s in self.members)]
        return self.members[int(np.argmax(counts))] if max(counts) else None

    def setup(self, stage: str) -> None:
        """Check that every member with a positive weight has blocks of ``seq_len + 1`` ids.

        Warns about a member whose validation split holds fewer blocks than a batch: litdata drops each member's
        last partial batch, so that member never reaches validation and its per-modality curves stay NaN.
        """
        for info in self.members:
            if info.weight > 0:
                check_blocks(self._split_dir(info, "train"), self.seq_len)
            directory = info.dataset.split_dir("val")
            blocks = count_blocks(directory, self.seq_len + 1) if directory is not None else 0
            if blocks < self.batch_size:
                rank_zero_warn(
                    f"mixture member {info.path} ({info.modality}) has {blocks} validation blocks of "
                    f"{self.seq_len + 1} ids, fewer than a batch ({self.batch_size}): it is left out of validation "
                    f"and val/loss_{info.modality} is NaN; give it more data or a larger validation share"
                )

    def _split_dir(self, info: MixtureMember, split: str) -> Path:
        directory = info.dataset.split_dir(split)
        if directory is None:
            raise UserError(f"mixture member {info.path} has an empty {split} split")
        return directory

    def _stream_source(self, info: MixtureMember, split: str) -> dict[str, Any]:
        self._split_dir(info, split)  # an empty split is an error
        return info.dataset.stream_source(split)

    def _train_dataset(self) -> MixedBlocks:
        used = [(index, info) for index, info in enumerate(self.members) if info.weight > 0]
        datasets = [
            TokenBlocks(
                **self._stream_source(info, "train"),
                block_size=self.seq_len + 1,
                modality_id=info.modality_id,
                offset=info.offset,
                shuffle=True,
                seed=self.seed + index,  # members of the same size must not shuffle alike
                caption_dropout=self.caption_dropout if getattr(info.dataset, "captions", None) else 0.0,
            )
            for index, info in used
        ]
        return MixedBlocks(datasets, weights=[info.weight for _, info in used], seed=self.seed, iterate_over_all=False)

    def _val_dataset(self) -> CombinedStreamingDataset | None:
        datasets = []
        for info in self.members:
            directory = info.dataset.split_dir("val")
            if directory is not None and validation_blocks(directory, self.seq_len + 1):
                source = info.dataset.stream_source("val")
                datasets.append(TokenBlocks(**source, block_size=self.seq_len + 1, modality_id=info.modality_id,
                                            offset=info.offset, pad_tail=True, drop_last=False,
                                            dtype=info.dataset.dtype))  # fmt: skip
        # iterate_over_all: every member's val split once, in full
        return CombinedStreamingDataset(datasets, seed=self.seed, iterate_over_all=True) if datasets else None

    def _train_length(self, dataset: CombinedStreamingDataset) -> int:
        """Batches per epoch: what every rank and worker delivers before its first member runs out.

        litdata gives each rank the same number of blocks of each member, split over the workers in whole
        batches (the last worker gets the fewest), and draws the member of every sample from
        ``random.Random(seed)`` in every worker. Replaying those draws against the last worker's share gives
        the batches it yields before a member runs out; every worker yields at least as many, so an epoch of
        ``num_workers`` times that many batches ends on every rank at the same step, with full batches only.
        """
        workers = max(self.num_workers, 1)
        ranks = world_size(combined_members(dataset)[0])
        shares = [
            (count_blocks(local_dir(d), self.seq_len + 1) // self.batch_size // ranks // workers) * self.batch_size
            for d in combined_members(dataset)
        ]
        rng, drawn = random.Random(self.seed), [0] * len(shares)
        members, weights = list(range(len(shares))), combined_weights(dataset)
        while True:
            (member,) = rng.choices(members, weights=weights, k=1)  # as litdata's _CombinedDatasetIterator draws
            if drawn[member] == shares[member]:
                break
            drawn[member] += 1
        return workers * (sum(drawn) // self.batch_size)
