"""Encoding + tokenizing images vs the bare Pillow floor, measured in the same run.

Sources are ImageNet-sized JPEGs (about 500x375, quality 90) cut from the real photographs in
tests/fixtures/photos (random crops, flips, both orientations), written to a temporary directory.

    floor: Pillow open -> RGB -> center crop -> resize 256 -> the paper's save call   (per file)
    ours:  JpegCodec.encode(path) per file, then CodecTokenizer.encode_batch on all streams

Prints the ratio ours / floor (target <= 1.5), mean bytes and tokens per image, and the tokenizer's
throughput (batch and per-item loop). Each timing is the best of --repeats runs, since machines are shared.

    python benchmarks/bench_codec.py [--images 240] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pillow_floor import floor

from jpeglm.codecs import JpegCodec
from jpeglm.tokenizer import CodecTokenizer

PHOTOS = sorted((Path(__file__).parent.parent / "tests" / "fixtures" / "photos").glob("*.jpg"))


def make_sources(directory: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    paths = []
    for i in range(count):
        im = photos[i % len(photos)]
        scale = rng.uniform(0.8, 1.0)
        w, h = int(im.width * scale), int(im.height * scale)
        left, top = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
        crop = im.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        size = (500, 375) if rng.random() < 0.75 else (375, 500)  # ImageNet's common shapes
        path = directory / f"src_{i:04d}.jpg"
        crop.resize(size, Image.LANCZOS).save(path, quality=90)
        paths.append(path)
    return paths


def ours(codec: JpegCodec, tokenizer: CodecTokenizer, paths: list[Path]) -> list[list[int]]:
    return tokenizer.encode_batch([codec.encode(p) for p in paths])


def best_of(repeats: int, fn, *args) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240, help="source images to make and encode.")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the best counts.")
    args = parser.parse_args()

    codec = JpegCodec()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_sources(Path(tmp), args.images)
        streams = [codec.encode(p) for p in paths]  # also warms the page cache for both sides
        tokenizer = CodecTokenizer.train(streams, "jpeg", 320, codec_spec=codec.spec)
        assert floor(paths) == streams, "the codec must write the floor's exact bytes"

        t_floor, _ = best_of(args.repeats, floor, paths)
        t_ours, ids = best_of(args.repeats, ours, codec, tokenizer, paths)
        t_batch, _ = best_of(args.repeats, tokenizer.encode_batch, streams)
        t_loop, _ = best_of(args.repeats, lambda: [tokenizer.encode(s) for s in streams])

    n_bytes = sum(map(len, streams))
    n_tokens = sum(map(len, ids))
    print(f"images: {len(paths)} ImageNet-sized JPEG sources from {len(PHOTOS)} photos")
    print(f"floor (Pillow open/crop/resize/save): {t_floor * 1e3 / len(paths):7.2f} ms/image")
    print(f"ours (encode + tokenize):             {t_ours * 1e3 / len(paths):7.2f} ms/image")
    print(f"ratio ours/floor: {t_ours / t_floor:.3f}  (target <= 1.5)")
    print(
        f"mean bytes per image: {n_bytes / len(paths):.0f}, mean tokens per image: {n_tokens / len(paths):.0f} "
        f"({n_tokens / n_bytes:.3f} tokens per byte, vocab {tokenizer.vocab_size})"
    )
    print(
        f"tokenizer: {n_bytes / t_batch / 1e6:.1f} MB/s batch (encode_batch), "
        f"{n_bytes / t_loop / 1e6:.1f} MB/s per-item loop"
    )


if __name__ == "__main__":
    main()
