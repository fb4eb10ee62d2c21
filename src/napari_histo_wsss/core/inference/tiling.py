"""Seam-free tiled prediction: a window grid with a halo, blend weights, and a row blender.

The grid puts window ``(r, c)`` at ``(r * stride, c * stride)`` with side ``tile``, where
``stride = tile - 2 * halo``; output block ``(r, c)`` is ``[r * stride, (r + 1) * stride)`` on
each axis. Neighbouring windows overlap by ``2 * halo``, and every output pixel away from the
image border sees at least ``halo`` pixels of context on each side. Because ``halo <= tile / 4``,
block ``(r, c)`` only receives predictions from windows ``(r - 1 .. r, c - 1 .. c)``: once a
row of windows is in, that row of blocks is final. :class:`RowBlender` relies on this to
stream a band of columns row by row with memory proportional to the band, not the image.

Blend modes: ``crop`` keeps each window's centre (like dask ``map_overlap(trim=True)``);
``linear`` ramps weights across the overlap so they sum to one; ``gaussian`` weights by a
Gaussian of the distance to the window centre (sigma = tile / 8). Weighted sums are divided by
the summed weights, so a pixel seen by a single window gets exactly that window's prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import ConfigError
from ..registry import Registry

#: Blend modes by name: ``profile(tile, halo, first) -> (tile,)`` weights along one axis of a
#: window (``first``: the window starts at the image's edge); a window's weights are the outer
#: product of its row and column profiles.
BLEND_MODES: Registry[Callable[[int, int, bool], np.ndarray]] = Registry("blend mode")

PredictBatch = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TileGrid:
    """Windows of ``tile`` pixels every ``stride`` pixels over a ``height x width`` image."""

    height: int
    width: int
    tile: int
    halo: int

    def __post_init__(self):
        if self.tile < 8:
            raise ConfigError(f"tile must be at least 8 pixels, got {self.tile}")
        if self.halo < 0 or 4 * self.halo > self.tile:
            raise ConfigError(
                f"halo must be between 0 and a quarter of the tile ({self.tile // 4}), "
                f"got {self.halo}"
            )
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"cannot tile an empty image ({self.height} x {self.width})")

    @property
    def stride(self) -> int:
        return self.tile - 2 * self.halo

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.stride)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.stride)

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left corner of window ``(row, col)``; the window may run past the image."""
        return row * self.stride, col * self.stride

    def block(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of output block ``(row, col)``, clipped to the image."""
        y0, x0 = row * self.stride, col * self.stride
        return y0, min(y0 + self.stride, self.height), x0, min(x0 + self.stride, self.width)

    def windows(self) -> Iterator[tuple[int, int]]:
        for row in range(self.rows):
            for col in range(self.cols):
                yield row, col


def blend_window(
    blend: str, tile: int, halo: int, first_row: bool = False, first_col: bool = False
) -> np.ndarray:
    """``(tile, tile)`` float32 weights of one window; ``first_*`` mark the image's top/left.

    Only ``crop`` needs the flags: the first window's margin has no earlier neighbour, so it
    keeps it. The other modes have positive weights everywhere and need no special case.
    """
    BLEND_MODES.check(blend)
    return _blend_window(blend, tile, halo, first_row, first_col).copy()


@lru_cache(maxsize=32)
def _blend_window(blend: str, tile: int, halo: int, first_row: bool, first_col: bool):
    rows = _profile(blend, tile, halo, first_row)
    cols = _profile(blend, tile, halo, first_col)
    return np.outer(rows, cols).astype(np.float32)


def _profile(blend: str, tile: int, halo: int, first: bool) -> np.ndarray:
    return BLEND_MODES.get(blend)(tile, halo, first)


def _centres(tile: int) -> np.ndarray:
    return np.arange(tile, dtype=np.float64) + 0.5


@BLEND_MODES.register("crop")
def crop_profile(tile: int, halo: int, first: bool) -> np.ndarray:
    """Each window's centre only; the first window also keeps its outer margin."""
    if halo == 0:
        return np.ones(tile)
    position = _centres(tile)
    profile = ((position > halo) & (position < tile - halo)).astype(np.float64)
    if first:
        profile[: tile - halo] = 1.0
    return profile


@BLEND_MODES.register("linear")
def linear_profile(tile: int, halo: int, first: bool) -> np.ndarray:
    """Ramps across the overlap that sum to one between neighbours."""
    if halo == 0:
        return np.ones(tile)
    position = _centres(tile)
    ramp_up = position / (2 * halo)
    ramp_down = (tile - position) / (2 * halo)
    return np.minimum(1.0, np.minimum(ramp_up, ramp_down))


@BLEND_MODES.register("gaussian")
def gaussian_profile(tile: int, halo: int, first: bool) -> np.ndarray:
    """A Gaussian of the distance to the window centre, sigma = tile / 8."""
    sigma = tile / 8.0
    return np.exp(-0.5 * ((_centres(tile) - tile / 2.0) / sigma) ** 2)


class RowBlender:
    """Blends window predictions over a band of block columns, one row of windows at a time.

    Add every window of row ``r`` whose column lies in ``window_cols`` (skipped windows simply
    are not added), then call :meth:`finish_row`: it returns the blended ``(C, h, w)`` values
    of block row ``r`` over the band and the mask of pixels any window covered, and carries the
    overlap into row ``r + 1``.
    """

    def __init__(self, grid: TileGrid, channels: int, blend: str, col_start: int, col_stop: int):
        self.grid = grid
        self.blend = blend
        self.col_start, self.col_stop = col_start, col_stop
        first_window_col = max(col_start - 1, 0)
        self.window_cols = range(first_window_col, col_stop)
        self.x_origin = first_window_col * grid.stride
        x_end = (col_stop - 1) * grid.stride + grid.tile
        width = x_end - self.x_origin
        self._sum = np.zeros((channels, grid.tile, width), np.float32)
        self._weight = np.zeros((grid.tile, width), np.float32)
        self.row = None

    def add(self, row: int, col: int, prediction: np.ndarray) -> None:
        """Add window ``(row, col)``'s ``(C, tile, tile)`` prediction."""
        if self.row is None:
            self.row = row
        if row != self.row:
            raise ValueError(f"window row {row} added while row {self.row} is open")
        weights = blend_window(self.blend, self.grid.tile, self.grid.halo, row == 0, col == 0)
        x0 = col * self.grid.stride - self.x_origin
        x1 = x0 + self.grid.tile
        self._sum[:, :, x0:x1] += prediction * weights
        self._weight[:, x0:x1] += weights

    def finish_row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Blended values ``(C, h, w)`` and coverage ``(h, w)`` of block row ``row`` in the band."""
        if self.row not in (None, row):
            raise ValueError(f"finishing row {row} while row {self.row} is open")
        y0, y1, _, _ = self.grid.block(row, 0)
        _, _, band_x0, _ = self.grid.block(0, self.col_start)
        _, _, _, band_x1 = self.grid.block(0, self.col_stop - 1)
        rows, cols = slice(0, y1 - y0), slice(band_x0 - self.x_origin, band_x1 - self.x_origin)
        weight = self._weight[rows, cols]
        covered = weight > 0
        values = np.divide(
            self._sum[:, rows, cols], weight, out=np.zeros_like(self._sum[:, rows, cols]),
            where=covered,
        )
        self._carry_overlap()
        self.row = None
        return values, covered

    def _carry_overlap(self) -> None:
        stride, overlap = self.grid.stride, 2 * self.grid.halo
        self._sum[:, :overlap] = self._sum[:, stride : stride + overlap]
        self._sum[:, overlap:] = 0
        self._weight[:overlap] = self._weight[stride : stride + overlap]
        self._weight[overlap:] = 0


def predict_large_image(
    predict_batch: PredictBatch,
    image: np.ndarray,
    tile: int = 512,
    overlap: int = 64,
    blend: str = "gaussian",
    batch_size: int = 8,
) -> np.ndarray:
    """Class probabilities ``(C, H, W)`` float32 of an in-memory RGB uint8 image, tile by tile.

    ``predict_batch`` maps a uint8 batch ``(N, tile, tile, 3)`` to float32 ``(N, C, tile,
    tile)``. Neighbouring windows share ``overlap`` pixels (``halo = overlap // 2``); the
    image is mirrored past its bottom/right edge to fill the last windows.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    grid = TileGrid(image.shape[0], image.shape[1], tile, overlap // 2)
    blend_window(blend, tile, grid.halo)  # validates the mode before any work
    padded = np.pad(
        image,
        ((0, grid.rows * grid.stride + 2 * grid.halo - grid.height),
         (0, grid.cols * grid.stride + 2 * grid.halo - grid.width), (0, 0)),
        mode="symmetric",
    )
    blender: RowBlender | None = None
    output: np.ndarray | None = None
    windows = list(grid.windows())
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        batch = np.stack([
            padded[y : y + tile, x : x + tile]
            for y, x in (grid.origin(row, col) for row, col in chunk)
        ])
        predictions = np.asarray(predict_batch(batch), dtype=np.float32)
        if output is None:
            channels = predictions.shape[1]
            output = np.zeros((channels, grid.height, grid.width), np.float32)
            blender = RowBlender(grid, channels, blend, 0, grid.cols)
        for (row, col), prediction in zip(chunk, predictions, strict=True):
            blender.add(row, col, prediction)
            if col == grid.cols - 1:
                values, _ = blender.finish_row(row)
                y0, y1, _, _ = grid.block(row, 0)
                output[:, y0:y1] = values
    return output
