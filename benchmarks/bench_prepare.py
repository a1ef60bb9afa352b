"""`jpeglm prepare` against a multiprocessing Pillow floor over the same files and workers, in the same run.

Sources are ImageNet-sized JPEGs cut from the real photographs in tests/fixtures/photos (bench_codec.py's
make_sources), written to a temporary directory; the tokenizer is trained once beforehand and given with
--tokenizer, so both sides do per-image work only.

    floor:      `python pillow_floor.py SRC --workers W`: a spawned multiprocessing.Pool of W workers, each file
                Pillow open -> RGB -> center crop -> resize 256 -> the paper's save call (quality 25, 4:2:0, a
                restart marker per MCU), in batches of 16
    prepare:    `jpeglm prepare --input SRC --tokenizer TOK --num-workers W` end to end, as a command: start-up,
                finding the inputs, workers encoding and tokenizing, litdata chunks, merge, report
    per image:  one process, prepare's worker call (jpeglm.prepare._process: JpegCodec.encode per file, then one
                CodecTokenizer.encode_batch per batch of 16) against the floor's per-file work

Prints items/s of both sides and the ratios: prepare / floor end to end (target >= 0.75) and encode + tokenize /
floor per image (target <= 1.3). Each timing is the best of --repeats runs, since machines are shared.

    python benchmarks/bench_prepare.py [--images 1024] [--workers N (default: all cores)] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_codec import best_of, make_sources
from pillow_floor import floor

from jpeglm.codecs import JpegCodec
from jpeglm.inputs import find_inputs
from jpeglm.prepare import _BATCH, _init_worker, _process
from jpeglm.tokenizer import CodecTokenizer

HERE = Path(__file__).parent


def floor_run(source: Path, workers: int) -> None:
    """The floor as a user runs a script: ``python pillow_floor.py SOURCE --workers W``."""
    subprocess.run([sys.executable, str(HERE / "pillow_floor.py"), str(source), "--workers", str(workers)], check=True)


def prepare_run(source: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    """``jpeglm prepare`` as a user runs it (a fresh output each time); returns its report."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "jpeglm.cli", "prepare", "--modality", "jpeg", "--input", str(source)]
    command += ["--output", str(out), "--tokenizer", str(tokenizer), "--num-workers", str(workers), "--no-progress"]
    subprocess.run(command, check=True, capture_output=True)
    return json.loads((out / "prepare_report.json").read_text())


def worker_call(items: list) -> int:
    """What one prepare worker does for these inputs (after :func:`jpeglm.prepare._init_worker`): tokens."""
    return sum(len(s.ids) for i in range(0, len(items), _BATCH) for s in _process(items[i : i + _BATCH]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="source images to make and prepare.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes on both sides.")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side; the best counts.")
    args = parser.parse_args()

    codec = JpegCodec()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        paths = make_sources(tmp / "src", args.images)
        streams = floor(paths)  # also warms the page cache for both sides
        tokenizer = CodecTokenizer.train(streams[:256], "jpeg", 320, codec_spec=codec.spec)
        tokenizer.save(tmp / "tokenizer")

        t_floor, _ = best_of(args.repeats, floor_run, tmp / "src", args.workers)
        src, tok_dir = tmp / "src", tmp / "tokenizer"
        t_prepare, report = best_of(args.repeats, prepare_run, src, tok_dir, tmp / "out", args.workers)
        assert report["items_written"] == len(paths), report["skipped"][:3]

        _init_worker({"tokenizer": str(tmp / "tokenizer"), "dtype": "uint16", "captions": None})
        t_floor1, _ = best_of(args.repeats, floor, paths)
        t_worker, tokens = best_of(args.repeats, worker_call, find_inputs([tmp / "src"], "jpeg").items)

    n = len(paths)
    print(f"images: {n} ImageNet-sized JPEG sources, {args.workers} workers on {os.cpu_count()} cores")
    print("| measure | floor | jpeglm | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| end to end, items/s | {n / t_floor:.1f} | {n / t_prepare:.1f} | "
        f"{t_floor / t_prepare:.3f} (prepare / floor items/s) | >= 0.75 |"
    )
    print(
        f"| per image, one process, ms | {t_floor1 * 1e3 / n:.2f} | {t_worker * 1e3 / n:.2f} | "
        f"{t_worker / t_floor1:.3f} (encode + tokenize / floor) | <= 1.3 |"
    )
    print(f"tokens per image: {tokens / n:.0f}; prepare wrote {report['total_tokens']} tokens in {t_prepare:.2f} s")


if __name__ == "__main__":
    main()
