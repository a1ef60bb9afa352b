"""Gallery and contact-sheet layout (jpeglm/pictures.py): small panels enlarged, every panel framed."""

import numpy as np

from jpeglm.codecs import AvcCodec
from jpeglm.codecs.base import DecodedVideo
from jpeglm.pictures import BORDER, BORDER_COLOR, GAP, enlargement, framed, grid


def test_small_panels_are_enlarged_by_a_whole_factor_with_nearest_neighbour():
    assert enlargement([np.zeros((64, 64, 3), np.uint8)]) == 2  # 128 px
    assert enlargement([np.zeros((48, 404, 3), np.uint8)]) == 3  # a strip of 64x48 frames: 144 px
    assert enlargement([np.zeros((256, 256, 3), np.uint8)]) == 1  # the paper's size: as it is
    panel = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = framed(panel, 2)
    assert big.shape == (4 + 2 * BORDER, 6 + 2 * BORDER, 3)
    inside = big[BORDER:-BORDER, BORDER:-BORDER]
    assert np.array_equal(inside[::2, ::2], panel)  # each pixel a 2x2 block, no blending
    assert np.array_equal(inside[1::2, 1::2], panel)
    assert (big[0] == BORDER_COLOR).all()
    assert (big[:, -1] == BORDER_COLOR).all()


def test_a_grid_is_scaled_as_a_whole_and_each_panel_framed():
    small, large = np.zeros((32, 32, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)
    picture = grid([[small, large], [large]])  # one factor (2, from the tallest) for all: sizes stay relative
    side = 2 * 64 + 2 * BORDER
    assert picture.shape == (2 * side + GAP, (2 * 32 + 2 * BORDER) + GAP + side, 3)
    assert (picture[side : side + GAP] == 255).all()  # white between the rows
    assert (picture[: 2 * 32 + 2 * BORDER, 2 * 32 + 2 * BORDER :][:, :GAP] == 255).all()  # and between panels


def test_video_samples_are_told_apart_from_their_frames():
    codec = AvcCodec(width=64, height=48, fps=3, seconds=2)
    frames = np.full((6, 48, 64, 3), 30, np.uint8)
    strip = codec.preview(DecodedVideo(frames, True, 1.0))  # frames with white gaps between them
    picture = grid([[strip, strip]])
    scale = 3
    top = picture[BORDER + 1]  # a row of pixels through both clips
    clip = 6 * 64 * scale + 5 * 4 * scale + 2 * BORDER
    assert picture.shape[1] == 2 * clip + GAP
    assert (top[clip - BORDER : clip] == BORDER_COLOR).all()  # the first clip's frame ends ...
    assert (top[clip : clip + GAP] == 255).all()  # ... a gap ...
    assert (top[clip + GAP : clip + GAP + BORDER] == BORDER_COLOR).all()  # ... and the second clip's begins
    between_frames = top[BORDER + 64 * scale : BORDER + 64 * scale + 4 * scale]
    assert (between_frames == 255).all()  # frames: white only, no frame around each
