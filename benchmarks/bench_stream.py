"""Training DataLoader throughput vs a raw sequential read of the same shard files, measured in the same run.

Shards of random token ids (items of ~5K ids, the paper's tokens per image, uint16) are written straight with
litdata's ``BinaryWriter`` into a temporary directory in the layout ``jpeglm prepare`` writes (64 MiB chunks),
then read two ways:

    raw:    np.fromfile over every chunk file, in order (the floor: bytes off the page cache)
    loader: one epoch of CodecDataModule.train_dataloader() (shuffled blocks of seq_len + 1 ids, int64 batches)
    ipc:    with workers, a bare torch DataLoader whose workers send ready-made batches of the same shape: the
            floor of torch's worker-to-trainer transfer, which no dataset code can beat

Prints tokens/s of each, the loader's tokens/s per worker, and the ratio loader time / raw time for the same
number of tokens (targets: >= 500K tokens/s per worker, <= 1.3x). Each timing is the best of --repeats runs,
after one untimed pass that warms the page cache.

    python benchmarks/bench_stream.py [--tokens 50_000_000] [--seq-len 4095] [--batch-size 8] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from litdata.streaming.item_loader import TokensLoader
from litdata.streaming.writer import BinaryWriter

from jpeglm.data_modules import CodecDataModule


def write_shards(directory: Path, tokens: int, seed: int = 0) -> int:
    """A prepared-dataset layout with about ``tokens`` random ids in the train split; returns the ids written."""
    rng = np.random.default_rng(seed)
    writer = BinaryWriter(str(directory / "train"), chunk_bytes=64 * 2**20, item_loader=TokensLoader())
    written, index = 0, 0
    while written < tokens:
        item = rng.integers(8, 328, int(rng.integers(3000, 7000)), dtype=np.uint16)
        writer.add_item(index, item)
        written, index = written + len(item), index + 1
    writer.done()
    writer.merge()
    splits = {"train": {"items": index, "tokens": written}, "val": {"items": 0, "tokens": 0}}
    meta = {"format": 1, "modality": "jpeg", "num_ids": 328, "dtype": "uint16", "splits": splits, "fingerprint": ""}
    (directory / "dataset.json").write_text(json.dumps(meta))
    return written


def raw_read(split: Path) -> tuple[int, float]:
    """Tokens and seconds of reading every chunk file in order with np.fromfile."""
    start, total = time.perf_counter(), 0
    for chunk in json.loads((split / "index.json").read_text())["chunks"]:
        total += np.fromfile(split / chunk["filename"], dtype=np.uint16).size
    return total, time.perf_counter() - start


def loader_read(data_dir: Path, seq_len: int, batch_size: int, workers: int) -> tuple[int, float]:
    """Tokens and seconds of one epoch of the training loader (worker start-up included)."""
    module = CodecDataModule(str(data_dir), seq_len=seq_len, batch_size=batch_size, num_workers=workers)
    module.setup("fit")
    loader = module.train_dataloader()
    start, total = time.perf_counter(), 0
    for batch in loader:
        total += batch["input_ids"].numel()
    return total, time.perf_counter() - start


class _ReadyBlocks(torch.utils.data.IterableDataset):
    """Yields the same ready-made block over and over: measures only the DataLoader's own cost."""

    def __init__(self, blocks: int, block_size: int) -> None:
        self.blocks, self.block_size = blocks, block_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        block = np.arange(self.block_size, dtype=np.int64)
        for _ in range(self.blocks // (info.num_workers if info else 1)):
            yield {"input_ids": torch.from_numpy(block.copy())}


def ipc_floor(tokens: int, seq_len: int, batch_size: int, workers: int) -> tuple[int, float]:
    """Tokens and seconds of a bare DataLoader moving ``tokens`` ids in batches like the training loader's."""
    loader = torch.utils.data.DataLoader(
        _ReadyBlocks(tokens // (seq_len + 1), seq_len + 1), batch_size=batch_size, num_workers=workers
    )
    start, total = time.perf_counter(), 0
    for batch in loader:
        total += batch["input_ids"].numel()
    return total, time.perf_counter() - start


def best(fn, repeats: int) -> tuple[int, float]:
    runs = [fn() for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000_000)
    parser.add_argument("--seq-len", type=int, default=4095)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        start = time.perf_counter()
        written = write_shards(data_dir, args.tokens)
        chunks = len(list((data_dir / "train").glob("chunk-*.bin")))
        print(f"wrote {written / 1e6:.1f}M tokens in {chunks} chunks in {time.perf_counter() - start:.1f} s")
        raw_read(data_dir / "train")  # warm the page cache
        raw_tokens, raw_s = best(lambda: raw_read(data_dir / "train"), args.repeats)
        raw_rate = raw_tokens / raw_s
        print(f"raw np.fromfile:  {raw_rate / 1e6:9.1f}M tokens/s  ({raw_tokens / 1e6:.1f}M tokens in {raw_s:.3f} s)")
        for workers in args.workers:
            tokens, seconds = best(
                lambda w=workers: loader_read(data_dir, args.seq_len, args.batch_size, w), args.repeats
            )
            rate = tokens / seconds
            per_worker = rate / max(workers, 1)
            ratio = seconds / (tokens / raw_rate)  # loader time / raw time for the same number of tokens
            print(
                f"loader, {workers} workers: {rate / 1e6:9.1f}M tokens/s  ({per_worker / 1e6:.1f}M per worker, "
                f"{tokens / 1e6:.1f}M tokens in {seconds:.3f} s)  ratio loader/raw {ratio:.1f}x"
            )
            if workers:
                floor_tokens, floor_s = best(
                    lambda w=workers, t=tokens: ipc_floor(t, args.seq_len, args.batch_size, w), args.repeats
                )
                print(
                    f"  ipc floor, {workers} workers: {floor_tokens / floor_s / 1e6:6.1f}M tokens/s  "
                    f"ratio loader/floor {seconds / floor_s * floor_tokens / tokens:.2f}x"
                )


if __name__ == "__main__":
    main()
