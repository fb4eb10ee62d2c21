"""The tissue mask finds H&E tissue on glass, drops specks and fills small holes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_histo_wsss.core.wsi.slides import open_slide
from napari_histo_wsss.core.wsi.tissue import TissueMask, tissue_mask, tissue_mask_from_rgb

PINK = (200, 120, 170)
GLASS = (242, 242, 240)


def test_pink_tissue_on_glass():
    image = np.empty((200, 300, 3), np.uint8)
    image[:] = GLASS
    image[40:160, 60:220] = PINK
    image[90:94, 120:124] = GLASS  # a 4x4 hole inside the tissue: filled
    image[10:12, 10:12] = PINK  # a 2x2 speck of dust on the glass: dropped
    mask = tissue_mask_from_rgb(image)
    assert mask.dtype == bool
    assert mask[40:160, 60:220].all()
    assert not mask[10:12, 10:12].any()
    assert mask.sum() == 120 * 160


def test_blank_glass_has_no_tissue():
    image = np.full((100, 100, 3), GLASS, np.uint8)
    image += np.random.default_rng(0).integers(0, 3, image.shape, dtype=np.uint8)
    assert not tissue_mask_from_rgb(image).any()


def test_real_slide_mask_and_box_queries(sample_slide_path):
    with open_slide(sample_slide_path) as slide:
        result = tissue_mask(slide, max_side=512)
    assert isinstance(result, TissueMask)
    assert max(result.mask.shape) <= 512
    assert result.downsample == pytest.approx(2967 / result.mask.shape[0], rel=0.01)
    assert 0.25 < result.fraction < 0.5  # a strip of skin on a mostly empty region
    # the region's left edge is glass, its lower middle is dermis (level-0 pixel boxes)
    assert not result.any_tissue(1500, 0, 1800, 300)
    assert result.any_tissue(2500, 1000, 2700, 1200)
