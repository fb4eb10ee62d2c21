"""Tiled prediction reproduces whole-image predictions and leaves no seams."""

from __future__ import annotations

import numpy as np
import pytest

from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.inference.tiling import (
    BLEND_MODES,
    RowBlender,
    TileGrid,
    blend_window,
    predict_large_image,
)


def as_channels(batch: np.ndarray) -> np.ndarray:
    """A 'model' whose output is its input: any blending must give the image back."""
    return batch.transpose(0, 3, 1, 2).astype(np.float32)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (301, 457, 3), dtype=np.uint8)


@pytest.mark.parametrize("blend", BLEND_MODES)
@pytest.mark.parametrize(("tile", "overlap"), [(64, 16), (128, 64), (512, 64), (32, 0)])
def test_blending_a_consistent_model_gives_the_whole_image_back(image, blend, tile, overlap):
    output = predict_large_image(as_channels, image, tile, overlap, blend, batch_size=5)
    assert output.shape == (3, 301, 457) and output.dtype == np.float32
    np.testing.assert_allclose(output, image.transpose(2, 0, 1), atol=1e-3)


def test_grid_geometry():
    grid = TileGrid(height=1000, width=700, tile=256, halo=32)
    assert grid.stride == 192
    assert (grid.rows, grid.cols) == (6, 4)
    assert grid.origin(2, 3) == (384, 576)
    assert grid.block(5, 3) == (960, 1000, 576, 700)
    assert len(list(grid.windows())) == 24


@pytest.mark.parametrize(("tile", "halo"), [(256, 65), (256, -1), (4, 0)])
def test_grid_rejects_halos_that_break_the_two_neighbour_rule(tile, halo):
    with pytest.raises(ConfigError):
        TileGrid(100, 100, tile, halo)


def test_unknown_blend_mode():
    with pytest.raises(ConfigError, match="blend"):
        blend_window("median", 64, 8)


def test_linear_weights_sum_to_one_across_an_overlap():
    tile, halo = 64, 8
    stride = tile - 2 * halo
    weights = blend_window("linear", tile, halo)[tile // 2]
    overlap = weights[stride:] + weights[: 2 * halo]  # window k's tail + window k+1's head
    np.testing.assert_allclose(overlap, 1.0, atol=1e-6)
    assert (blend_window("gaussian", tile, halo) > 0).all()
    crop = blend_window("crop", tile, halo, first_row=True, first_col=False)
    assert crop[:halo, halo:-halo].all() and not crop[:, :halo].any()


def window_constant_model(batch: np.ndarray) -> np.ndarray:
    """Each window predicts one value (its mean): neighbouring windows disagree."""
    values = batch.reshape(len(batch), -1).mean(axis=1).astype(np.float32)
    return np.broadcast_to(values[:, None, None, None], (len(batch), 1, *batch.shape[1:3])).copy()


def test_smooth_blends_leave_no_seams_where_crop_does():
    # left half dark, right half bright: windows straddling the middle disagree strongly
    image = np.zeros((128, 512, 3), np.uint8)
    image[:, 256:] = 255
    tile, overlap = 128, 32

    def largest_step(blend):
        output = predict_large_image(window_constant_model, image, tile, overlap, blend)[0]
        return np.abs(np.diff(output, axis=1)).max()

    crop_step = largest_step("crop")
    assert crop_step > 60  # a visible seam between two windows
    assert largest_step("linear") < crop_step / 8  # spread over the 2 * halo overlap
    assert largest_step("gaussian") < crop_step / 3


def test_banded_blending_equals_one_band(image):
    """Slide inference blends bands of columns separately: the seams between bands vanish."""
    grid = TileGrid(image.shape[0], image.shape[1], tile=64, halo=12)
    padded = np.pad(image, ((0, 64), (0, 64), (0, 0)), mode="symmetric")

    def blended(bands):
        output = np.zeros((3, *image.shape[:2]), np.float32)
        for col_start, col_stop in bands:
            blender = RowBlender(grid, 3, "linear", col_start, col_stop)
            for row in range(grid.rows):
                for col in blender.window_cols:
                    y, x = grid.origin(row, col)
                    window = padded[None, y : y + 64, x : x + 64]
                    prediction = window_constant_model(window)[0] + as_channels(window)[0]
                    blender.add(row, col, np.broadcast_to(prediction, (3, 64, 64)))
                values, covered = blender.finish_row(row)
                assert covered.all()
                y0, y1, x0, _ = grid.block(row, col_start)
                output[:, y0:y1, x0 : x0 + values.shape[2]] = values
        return output

    whole = blended([(0, grid.cols)])
    split = blended([(0, 3), (3, 5), (5, grid.cols)])
    np.testing.assert_allclose(split, whole, atol=1e-3)
