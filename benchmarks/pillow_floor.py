"""The Pillow floor of encoding one image the paper's way, in a module that imports Pillow alone.

What a user would write instead of jpeglm: open -> RGB -> center crop -> resize 256 (bilinear) -> the paper's save
call (quality 25, 4:2:0, abbreviated stream, a restart marker after every MCU). Its own module so the worker
processes of bench_prepare.py's multiprocessing floor import nothing else (no jpeglm, no torch).
"""

from __future__ import annotations

import io
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
