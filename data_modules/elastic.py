"""Elastic resume: finish an epoch on another number of ranks or loader workers, no block seen twice, none lost
but the fewer than ``world_size`` left over so that every rank gets as many (counted).

litdata resumes a position only on the topology (world size, loader workers, batch size) that saved it; its own
elastic path (litdata 0.2.76) rounds the consumed prefix down to a whole global batch of the new topology (blocks
are seen twice), assumes every worker of every rank took whole batches in lockstep, and refuses mixtures. jpeglm
does it itself, from what a checkpoint holds:

1. The epoch's first *segment* is litdata's own assignment for the saved topology and seed
   (:func:`jpeglm._compat.epoch_plan`): for every rank and worker, the blocks it yields, in order. The blocks an
   uninterrupted run takes are put in one global order (:func:`lockstep`: step by step, rank by rank, each rank's
   workers in turn, as the DataLoader takes them).
2. The blocks already taken are each worker's first ``counts[worker]`` blocks, on every rank (every rank takes the
   same number of batches; a mixture's workers draw their members alike on every rank, so rank 0's counts hold for
   all). What is left keeps the global order.
3. The rest is dealt to the new topology (:func:`restripe`): global batch ``g`` to rank ``g % world_size``, a rank's
   ``j``-th batch to worker ``j % num_workers`` (the order the DataLoader takes them), the last blocks split evenly
   over the ranks; fewer than ``world_size`` blocks are dropped so that every rank gets as many (counted and
   reported). A checkpoint taken in such an epoch records its segments, so a resume from it (on any topology)
   replays them all and starts another segment.
4. The next epoch is litdata's own, on the new topology.

With the same world size and batch size, each rank then takes the blocks an uninterrupted run would have, in the
same order (only the workers changed). With another world size the blocks keep their global order, but each step's
global batch holds ``new world size * batch size`` of them. A mixture's member draws restart from the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from litdata import CombinedStreamingDataset

from jpeglm._compat import combined_members, combined_weights, epoch_plan

__all__ = ["ElasticEpoch", "draws_until_exhausted", "lockstep", "members_of", "remaining_blocks", "restripe"]

_EMPTY = np.zeros(0, dtype=np.int64)


def topology(world_size: int, num_workers: int, batch_size: int, num_nodes: int = 1) -> dict[str, int]:
    """The loader topology a position is relative to (``num_workers`` 0 counts as 1, as litdata counts it)."""
    return {
        "world_size": int(world_size),
        "num_workers": max(int(num_workers), 1),
        "batch_size": int(batch_size),
        "num_nodes": int(num_nodes),
    }


def members_of(dataset: Any) -> list[Any]:
    """The ``TokenBlocks`` a loader reads: a mixture's members, or the dataset itself."""
    return combined_members(dataset) if isinstance(dataset, CombinedStreamingDataset) else [dataset]


def _batches(blocks: np.ndarray | list[int], batch_size: int) -> list[np.ndarray]:
    blocks = np.asarray(blocks, dtype=np.int64)
    return [blocks[i : i + batch_size] for i in range(0, len(blocks), batch_size)]


def lockstep(plans: list[Any], world_size: int, num_workers: int, batch_size: int) -> np.ndarray:
    """All blocks of ``plans`` (one list per ``rank * num_workers + worker``) in the order a run takes them.

    Each rank takes its workers' batches in turn (a worker with none left is skipped, as the DataLoader does); at
    each step every rank takes one batch, rank 0 first.
    """
    ranks = []
    for rank in range(world_size):
        workers = [_batches(plans[rank * num_workers + w], batch_size) for w in range(num_workers)]
        rounds = max((len(batches) for batches in workers), default=0)
        ranks.append([batches[j] for j in range(rounds) for batches in workers if j < len(batches)])
    steps = max((len(batches) for batches in ranks), default=0)
    order = [batches[s] for s in range(steps) for batches in ranks if s < len(batches)]
    return np.concatenate(order) if order else _EMPTY


def restripe(order: np.ndarray, world_size: int, num_workers: int, batch_size: int) -> tuple[list[np.ndarray], int]:
    """Deal ``order`` to a topology: ``(blocks of each rank * num_workers + worker, blocks dropped)``.

    Global batch ``g`` goes to rank ``g % world_size``; what is left after the last whole round of batches is split
    evenly over the ranks (each rank's last batch may be short). ``len(order) % world_size`` blocks are dropped,
    so that every rank has as many. A rank's ``j``-th batch goes to worker ``j % num_workers``.
    """
    kept = len(order) - len(order) % world_size
    rounds = kept // (world_size * batch_size)
    full = order[: rounds * world_size * batch_size].reshape(rounds, world_size, batch_size)
    tail = order[rounds * world_size * batch_size : kept].reshape(world_size, -1)
    plans = []
    for rank in range(world_size):
        batches = _batches(np.concatenate([full[:, rank, :].reshape(-1), tail[rank]]), batch_size)
        for worker in range(num_workers):
            mine = batches[worker::num_workers]
            plans.append(np.concatenate(mine) if mine else _EMPTY)
    return plans, len(order) - kept


def _taken(plans: list[Any], counts: dict[int, list[int]], member: int, num_workers: int) -> np.ndarray:
    """Each worker's first ``counts[worker][member]`` blocks, on every rank."""
    taken = [
        np.asarray(plan, dtype=np.int64)[: counts.get(i % num_workers, [0] * (member + 1))[member]]
        for i, plan in enumerate(plans)
    ]
    return np.concatenate(taken) if taken else _EMPTY


def remaining_blocks(dataset: Any, member: int, segments: list[dict[str, Any]], epoch: int) -> np.ndarray:
    """The blocks of ``dataset`` (member ``member`` of its loader) that ``segments`` of ``epoch`` left, in order."""
    first = segments[0]["topology"]
    world, workers, batch = first["world_size"], first["num_workers"], first["batch_size"]
    plans: list[Any] = epoch_plan(dataset, world, first["num_nodes"], workers, batch, epoch)
    order = lockstep(plans, world, workers, batch)
    for k, segment in enumerate(segments):
        t = segment["topology"]
        if k:
            plans, _ = restripe(order, t["world_size"], t["num_workers"], t["batch_size"])
        order = order[~np.isin(order, _taken(plans, segment["counts"], member, t["num_workers"]))]
    return order


def draws_until_exhausted(shares: list[int], weights: list[float], seed: int) -> list[int]:
    """Blocks a mixture worker draws from each member before one runs out (litdata draws from ``Random(seed)``)."""
    rng, drawn, members = random.Random(seed), [0] * len(shares), list(range(len(shares)))
    while True:
        (member,) = rng.choices(members, weights=weights, k=1)  # as litdata's _CombinedDatasetIterator draws
        if drawn[member] == shares[member]:
            return drawn
        drawn[member] += 1


@dataclass
class ElasticEpoch:
    """An epoch continued on a topology other than (or after one other than) the one it began on.

    Attributes:
        epoch: litdata's epoch number.
        segments: the parts of the epoch already run, oldest first: ``{"topology", "counts"}``, ``counts`` being
            ``{worker: [blocks taken from each member]}`` (the same on every rank).
        start: batches of the epoch taken before this part.
        length: batches of the whole epoch, on every rank (set by :meth:`plan`).
        dropped: blocks left out so that every rank gets as many (set by :meth:`plan`).
        remaining: blocks left to deal over the topology, all members together (set by :meth:`plan`).
    """

    epoch: int
    segments: list[dict[str, Any]]
    start: int
    length: int = 0
    dropped: int = 0
    remaining: int = 0
    shares: list[list[int]] = field(default_factory=list)

    def plan(self, dataset: Any, now: dict[str, int], rank: int) -> None:
        """Give every member of ``dataset`` this rank's blocks for the rest of the epoch (``elastic_blocks``)."""
        world, workers, batch = now["world_size"], now["num_workers"], now["batch_size"]
        members = members_of(dataset)
        self.shares, self.dropped, self.remaining = [], 0, 0
        for index, member in enumerate(members):
            order = remaining_blocks(member, index, self.segments, self.epoch)
            plans, dropped = restripe(order, world, workers, batch)
            member.elastic_blocks = plans[rank * workers : (rank + 1) * workers]
            member.elastic_epoch = self.epoch
            self.shares.append([len(plan) for plan in plans])
            self.dropped += dropped
            self.remaining += len(order)
        if len(members) == 1:  # every rank has as many blocks: ceil(blocks / batch) batches
            batches = -(-sum(self.shares[0][rank * workers : (rank + 1) * workers]) // batch)
        else:  # a mixture stops where its first worker runs out of a member; full batches only
            weights, seed = combined_weights(dataset), dataset.draw_seed
            least = min(
                sum(draws_until_exhausted([share[g] for share in self.shares], weights, seed)) // batch
                for g in range(world * workers)
            )
            batches = workers * least
        self.length = self.start + batches

    def state(self) -> dict[str, Any]:
        """What a checkpoint taken in this epoch records: the earlier segments and where this one began."""
        return {"segments": self.segments, "start": self.start}


def clear(dataset: Any) -> None:
    """Back to litdata's own plan for every member."""
    for member in members_of(dataset):
        member.elastic_blocks = None
