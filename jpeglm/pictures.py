"""Pictures of completions for people: contact sheets and gallery grids, ``prompt | completion | original``.

Shared by the sample gallery (TensorBoard) and ``jpeglm generate`` (``contact_sheet.png``). Each panel is a
codec's ``preview`` of a decoded stream: the image, or a video's frames side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jpeglm.codecs import Codec
    from jpeglm.generation import Completion

GAP = 4
"""Pixels of white between panels and between rows."""


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


def row(panels: list[np.ndarray]) -> np.ndarray:
    """Panels side by side, top-aligned, white gaps between them: (H, W, 3) uint8."""
    h = max(p.shape[0] for p in panels)
    gap = np.full((h, GAP, 3), 255, np.uint8)
    parts = []
    for p in panels:
        parts += [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255), gap]
    return np.concatenate(parts[:-1], axis=1)


def grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Panels laid out in rows (each row left to right), white gaps between them: (H, W, 3) uint8."""
    lines = [row(r) for r in rows]
    w = max(line.shape[1] for line in lines)
    gap = np.full((GAP, w, 3), 255, np.uint8)
    parts = []
    for line in lines:
        parts += [np.pad(line, ((0, 0), (0, w - line.shape[1]), (0, 0)), constant_values=255), gap]
    return np.concatenate(parts[:-1], axis=0)
