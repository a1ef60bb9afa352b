"""Pictures of completions for people: contact sheets and gallery grids, ``prompt | completion | original``.

Shared by the sample gallery (TensorBoard) and ``jpeglm generate`` (``contact_sheet.png``). Each panel is a
codec's ``preview`` of a decoded stream: the image, or a video's frames side by side.

Two things make a grid readable at a glance:

- Small pictures are enlarged. A grid whose tallest panel is under :data:`MIN_PANEL_HEIGHT` (128) pixels is
  scaled up by the smallest whole factor that reaches it, with nearest-neighbour scaling (each pixel becomes a
  k x k block, so JPEG blocks and macroblocks stay sharp): a 64x64 picture is shown at 128x128, a strip of
  64x48 video frames 144 high. One factor for the whole grid, so panels keep their relative sizes. 128 rather
  than more: a row of three video strips is already about 3,600 pixels wide at 3x.
- Every panel has a :data:`BORDER`-pixel dark grey frame around it and :data:`GAP` pixels of white between it
  and the next. A video's frames are separated by white only (``PREVIEW_GAP``, 4 pixels, enlarged with the
  strip: 12 at 3x), so one framed box is one clip and clips sit further apart than frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jpeglm.codecs import Codec
    from jpeglm.generation import Completion

GAP = 16
"""Pixels of white between panels and between rows."""
BORDER = 3
"""Pixels of the dark grey frame drawn around every panel (outside it)."""
BORDER_COLOR = (64, 64, 64)
MIN_PANEL_HEIGHT = 128
"""Grids whose tallest panel is lower than this are enlarged by a whole factor (nearest neighbour) to reach it."""


def picture(codec: Codec, stream: bytes) -> np.ndarray:
    """(H, W, 3) uint8 of a stream's best-effort decode (a video as a strip of frames)."""
    return codec.preview(codec.decode(stream))


def completion_row(codec: Codec, completion: Completion) -> list[np.ndarray]:
    """The panels of one completion: ``prompt | completion | original``, without the parts it lacks.

    An unconditional sample has no prompt panel; one whose prompt was given already cut has no original.
    """
    panels = [codec.preview(completion.decoded)]
    if completion.prompt:
        panels.insert(0, picture(codec, completion.prompt))
    if completion.original is not None:
        panels.append(picture(codec, completion.original))
    return panels


def enlargement(panels: list[np.ndarray], min_height: int = MIN_PANEL_HEIGHT) -> int:
    """The whole factor that makes the tallest panel at least ``min_height`` pixels high (1: big enough)."""
    tallest = max(p.shape[0] for p in panels)
    return max(1, -(-min_height // max(tallest, 1)))


def framed(panel: np.ndarray, scale: int = 1) -> np.ndarray:
    """A panel enlarged ``scale`` times (nearest neighbour) inside a ``BORDER``-pixel grey frame: (H, W, 3) uint8."""
    if scale > 1:
        panel = panel.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = panel.shape[:2]
    out = np.empty((h + 2 * BORDER, w + 2 * BORDER, 3), np.uint8)
    out[:] = BORDER_COLOR
    out[BORDER : BORDER + h, BORDER : BORDER + w] = panel
    return out


def row(panels: list[np.ndarray]) -> np.ndarray:
    """Panels side by side, top-aligned, white gaps between them: (H, W, 3) uint8 (panels as given: no frame)."""
    h = max(p.shape[0] for p in panels)
    gap = np.full((h, GAP, 3), 255, np.uint8)
    parts = []
    for p in panels:
        parts += [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255), gap]
    return np.concatenate(parts[:-1], axis=1)


def grid(rows: list[list[np.ndarray]], min_height: int = MIN_PANEL_HEIGHT) -> np.ndarray:
    """Panels laid out in rows (each row left to right), each framed, white gaps between them: (H, W, 3) uint8.

    Enlarged as a whole when its panels are small (module docstring): a panel of ``h x w`` pixels takes
    ``(k h + 2 BORDER) x (k w + 2 BORDER)`` with ``k = enlargement(panels, min_height)``.
    """
    scale = enlargement([p for r in rows for p in r], min_height)
    lines = [row([framed(p, scale) for p in r]) for r in rows]
    w = max(line.shape[1] for line in lines)
    gap = np.full((GAP, w, 3), 255, np.uint8)
    parts = []
    for line in lines:
        parts += [np.pad(line, ((0, 0), (0, w - line.shape[1]), (0, 0)), constant_values=255), gap]
    return np.concatenate(parts[:-1], axis=0)


def caption_panel(text: str, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: ``text`` in black on white, wrapped to the width (Pillow's built-in bitmap font),
    cut with "..." when it does not fit. The first panel of a gallery's caption rows."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=10) if hasattr(ImageFont, "FreeTypeFont") else ImageFont.load_default()
    image = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    lines, line = [], ""
    for word in text.split():
        if line and pen.textlength(f"{line} {word}", font=font) > width - 4:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    fit = max(1, (height - 2) // 11)
    if len(lines) > fit:
        lines = [*lines[: fit - 1], lines[fit - 1] + " ..."]
    for index, text_line in enumerate(lines):
        pen.text((2, 1 + 11 * index), text_line, fill=(0, 0, 0), font=font)
    return np.asarray(image)


def caption_rows(codec: Codec, columns: list[list[Completion]]) -> list[list[np.ndarray]]:
    """Rows of ``caption | sample at the first scale | at the next ...``: ``columns[j][i]`` is caption ``i`` drawn at
    scale ``j``."""
    rows = []
    for samples in zip(*columns, strict=True):
        pictures = [codec.preview(c.decoded) for c in samples]
        height = max(p.shape[0] for p in pictures)
        rows.append([caption_panel(samples[0].caption or "", height, 160 * height // 64), *pictures])
    return rows
