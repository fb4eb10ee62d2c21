"""Hostile slides: huge declared sizes are read in bounded time and memory, or refused in one line.

The files are real TIFFs written with tifffile: a 200,000 x 200,000 px single-level image in a few
MB, because only some tiles are stored (the others have offset and byte count 0).
"""

from __future__ import annotations

import tracemalloc
import zlib
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile

from napari_histo_wsss._reader import read_slide
from napari_histo_wsss.core.errors import SlideError
from napari_histo_wsss.core.wsi.slides import (
    MAX_SAMPLED_CHUNKS,
    open_slide,
    read_thumbnail,
    sample_positions,
)
from napari_histo_wsss.core.wsi.tissue import tissue_mask

WSI = Path(__file__).resolve().parents[3] / "shared" / "data" / "wsi"
SIDE = 200_000
TILE = 512
PINK = (200, 120, 170)
BAND_ROWS = range(200, 212)  # tile rows holding "tissue": level-0 rows 102,400-108,544


def stored_tiles(side: int, present):
    """The zlib-compressed tiles of a side x side image: pink where ``present(row, col)``,
    else left out (byte count 0)."""
    tile = zlib.compress(np.full((TILE, TILE, 3), PINK, np.uint8).tobytes())
    tiles_per_side = -(-side // TILE)
    for row in range(tiles_per_side):
        for col in range(tiles_per_side):
            yield tile if present(row, col) else b""


def write_declared_huge(path: Path, present) -> Path:
    """A SIDE x SIDE RGB tiled TIFF storing only the tiles where ``present(row, col)``."""
    tifffile.imwrite(path, stored_tiles(SIDE, present), shape=(SIDE, SIDE, 3), dtype=np.uint8,
                     tile=(TILE, TILE), photometric="rgb", compression="zlib")
    return path


@pytest.fixture(scope="module")
def banded_slide(tmp_path_factory) -> Path:
    """A pink band of stored tiles across glass (3% of the tiles): a plausible sparse slide."""
    path = tmp_path_factory.mktemp("huge") / "banded.tif"
    return write_declared_huge(path, lambda row, col: row in BAND_ROWS)


def test_four_tiles_claiming_200k_squared_are_refused_in_one_line(tmp_path):
    path = write_declared_huge(tmp_path / "hostile.tif", lambda row, col: row < 2 and col < 2)
    assert path.stat().st_size < 5_000_000
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: level 0 declares 200000 x 200000 px")
    assert "only 4 of its 152881 tiles" in message and "\n" not in message
    assert read_slide(str(path)) == [(None,)]  # napari: one notification, nothing added


def test_thumbnail_and_tissue_mask_of_a_huge_single_level_slide_stay_small(banded_slide):
    tracemalloc.start()
    try:
        with open_slide(banded_slide) as slide:
            thumbnail = read_thumbnail(slide, max_side=1024)
            mask = tissue_mask(slide, max_side=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 400 * 2**20  # level 0 alone would be 120 GB
    assert thumbnail.shape == (1020, 1020, 3) and thumbnail.dtype == np.uint8
    assert mask.level0_shape == (SIDE, SIDE)
    band_top, band_bottom = BAND_ROWS.start * TILE, BAND_ROWS.stop * TILE
    assert mask.any_tissue(band_top + 1000, 0, band_bottom - 1000, SIDE)
    assert not mask.any_tissue(0, 0, band_top - 2000, SIDE)  # missing tiles read as glass
    assert not mask.any_tissue(band_bottom + 2000, 0, SIDE, SIDE)
    assert (thumbnail[:100] == 255).all()


def test_sampled_reads_decode_a_bounded_number_of_chunks():
    rows = sample_positions(0, 1020, 196, SIDE, TILE)
    assert len(rows) == 1020 and (np.diff(rows // TILE) >= 0).all()
    assert len(np.unique(rows // TILE)) == MAX_SAMPLED_CHUNKS  # of 391 tile rows
    assert rows.max() < SIDE
    small = sample_positions(0, 100, 4, 400, 64)  # under the budget: exact centres
    np.testing.assert_array_equal(small, np.arange(100) * 4 + 2)


def test_reader_coarsest_level_has_a_small_graph_and_shows_the_band(banded_slide):
    [(levels, kwargs, layer_type)] = read_slide(str(banded_slide))
    assert layer_type == "image" and kwargs["multiscale"] and len(levels) == 10
    coarsest = levels[-1]
    assert coarsest.shape == (390, 390, 3)
    for level in levels[1:]:  # one task per block, never a chain over level 0
        assert len(level.__dask_graph__()) == level.npartitions
    assert len(coarsest.__dask_graph__()) < 10
    pixels = coarsest.compute()
    # one pixel per tile row (stride 512), 390 tile rows thinned to 64: the band may shift by
    # up to half the thinning step (3 rows), never more
    pink_rows = np.flatnonzero((pixels == PINK).all(axis=(1, 2)))
    assert len(pink_rows) >= 6
    assert BAND_ROWS.start - 4 <= pink_rows.min() and pink_rows.max() < BAND_ROWS.stop + 4
    outside = np.ones(len(pixels), bool)
    outside[BAND_ROWS.start - 4 : BAND_ROWS.stop + 4] = False
    assert (pixels[outside] == 255).all()


def test_pyramid_missing_its_coarse_levels_gets_lazy_ones(tmp_path):
    """Level 1 of 100,000 px is the coarsest stored level: napari must not start there."""
    path = tmp_path / "two-levels.tif"
    options = dict(dtype=np.uint8, tile=(TILE, TILE), photometric="rgb", compression="zlib")
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        tiff.write(stored_tiles(SIDE, lambda row, col: row in BAND_ROWS),
                   shape=(SIDE, SIDE, 3), subifds=1, **options)
        half = range(BAND_ROWS.start // 2, BAND_ROWS.stop // 2)
        tiff.write(stored_tiles(SIDE // 2, lambda row, col: row in half),
                   shape=(SIDE // 2, SIDE // 2, 3), subfiletype=1, **options)
    with open_slide(path) as slide:
        assert [level.shape[0] for level in slide.levels] == [SIDE // 2**k for k in range(10)]
        assert len(slide.levels[-1].__dask_graph__()) == 1
        mask = tissue_mask(slide, max_side=1024)
    band_top, band_bottom = BAND_ROWS.start * TILE, BAND_ROWS.stop * TILE
    assert mask.any_tissue(band_top + 1000, 0, band_bottom - 1000, SIDE)
    assert not mask.any_tissue(0, 0, band_top - 2000, SIDE)


def test_sparse_tiles_read_as_white_glass(tmp_path):
    path = tmp_path / "sparse.tif"
    tile = np.full((64, 64, 3), PINK, np.uint8)
    tiles = (None if (row + col) % 2 else tile for row in range(4) for col in range(4))
    tifffile.imwrite(path, tiles, shape=(256, 256, 3), dtype=np.uint8, tile=(64, 64),
                     photometric="rgb")
    with open_slide(path) as slide:
        pixels = slide.levels[0].compute()
    assert (pixels[:64, :64] == PINK).all() and (pixels[:64, 64:128] == 255).all()


def _former_thumbnail(slide, max_side):
    """The thumbnail as read before sampled reads existed: a block mean of the chosen level,
    with a single-level file's levels made by chained 2x2 means of level 0."""
    levels = [slide.levels[0]]
    if len(slide._sources) and all(source is None for source in slide._sources[1:]):
        current = slide.levels[0]
        for _ in slide.levels[1:]:
            current = da.coarsen(np.mean, current, {0: 2, 1: 2}, trim_excess=True)
            current = current.round().astype(np.uint8)
            levels.append(current)
    else:
        levels = slide.levels
    candidates = [k for k, level in enumerate(levels) if max(level.shape[:2]) >= max_side]
    array = levels[candidates[-1] if candidates else 0]
    factor = max(1, -(-max(array.shape[:2]) // max_side))
    if factor > 1:
        array = da.coarsen(np.mean, array, {0: factor, 1: factor}, trim_excess=True)
        array = array.round().astype(np.uint8)
    return array.compute()


@pytest.mark.parametrize("max_side", [300, 1024, 2048])
@pytest.mark.parametrize("name", ["sample", "cmu-1-small-region-pyramid.tif",
                                  "cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"])
def test_normal_slides_give_the_same_thumbnails_as_before(sample_slide_path, name, max_side):
    path = sample_slide_path if name == "sample" else WSI / name
    if not path.exists():
        pytest.skip("needs ../shared/data/wsi")
    with open_slide(path) as slide:
        np.testing.assert_array_equal(read_thumbnail(slide, max_side),
                                      _former_thumbnail(slide, max_side))
