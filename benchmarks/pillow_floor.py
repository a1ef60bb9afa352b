"""The Pillow floor of encoding one image the paper's way, in a module that imports Pillow alone.

What a user would write instead of jpeglm: open -> RGB -> center crop -> resize 256 (bilinear) -> the paper's save
call (quality 25, 4:2:0, abbreviated stream, a restart marker after every MCU). Its own module, importing Pillow
alone, so that bench_prepare.py's multiprocessing floor (``python pillow_floor.py DIR --workers N``: every .jpg of
DIR over a spawned pool, in batches of 16) starts the way a user's script would, without jpeglm or torch.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
from pathlib import Path

from PIL import Image


def floor(paths: list[Path]) -> list[bytes]:
    out = []
    for path in paths:
        im = Image.open(path).convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((256, 256), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=25, subsampling="4:2:0", streamtype=2, restart_marker_blocks=1)
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--workers", type=int, required=True)
    args = parser.parse_args()
    paths = sorted(args.directory.glob("*.jpg"))
    batches = [paths[i : i + 16] for i in range(0, len(paths), 16)]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        written = sum(len(s) for streams in pool.imap(floor, batches, chunksize=1) for s in streams)
    print(f"{len(paths)} images, {written} bytes")


if __name__ == "__main__":
    main()
