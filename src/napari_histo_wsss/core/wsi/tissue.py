"""Where the tissue is: a boolean mask from a slide thumbnail.

Slide inference skips tiles with no tissue, which is usually most of a slide. The mask comes
from a thumbnail (a low pyramid level): H&E tissue is coloured while glass is grey-white, so
pixels must be saturated (Otsu on HSV saturation, clamped so a slide that is mostly tissue
keeps its pale stroma) and not transparent (optical density above that of clean glass).
Specks are removed and small holes filled, in mask pixels scaled to the mask size.
The thumbnail of a huge single-level slide is a bounded sample of level 0 (``read_thumbnail``),
so the mask costs the same on a 200,000 px slide as on a pyramid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .slides import Slide, read_thumbnail

#: Saturation threshold limits: Otsu inside mostly-tissue thumbnails splits pink from purple.
SATURATION_RANGE = (0.04, 0.10)
#: Clean glass has an optical density around 0.04 (RGB ~ 245); pale tissue is above 0.1.
MIN_OPTICAL_DENSITY = 0.08


@dataclass(frozen=True)
class TissueMask:
    """A boolean mask over the whole slide at a coarse resolution.

    ``downsample`` is level-0 pixels per mask pixel (the mean of both axes; ``scale`` keeps them
    apart, which matters for odd level sizes).
    """

    mask: np.ndarray
    level0_shape: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """Level-0 pixels per mask pixel along y and x."""
        return (
            self.level0_shape[0] / self.mask.shape[0],
            self.level0_shape[1] / self.mask.shape[1],
        )

    @property
    def downsample(self) -> float:
        return sum(self.scale) / 2.0

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def any_tissue(self, y0: float, x0: float, y1: float, x1: float) -> bool:
        """Whether the level-0 box ``[y0, y1) x [x0, x1)`` touches tissue."""
        scale_y, scale_x = self.scale
        row0, row1 = max(int(y0 // scale_y), 0), math.ceil(y1 / scale_y)
        col0, col1 = max(int(x0 // scale_x), 0), math.ceil(x1 / scale_x)
        return bool(self.mask[row0:row1, col0:col1].any())


def tissue_mask(slide: Slide, max_side: int = 1024) -> TissueMask:
    """The tissue mask of ``slide`` from a thumbnail at most ``max_side`` pixels long."""
    thumbnail = read_thumbnail(slide, max_side)
    return TissueMask(mask=tissue_mask_from_rgb(thumbnail), level0_shape=slide.shape)


def tissue_mask_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Tissue pixels of an RGB uint8 H&E image (see the module docstring for the rule)."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, disk, remove_small_holes, remove_small_objects

    saturation = rgb2hsv(rgb)[..., 1]
    optical_density = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)
    if saturation.max() > saturation.min():
        threshold = float(np.clip(threshold_otsu(saturation), *SATURATION_RANGE))
    else:
        threshold = SATURATION_RANGE[1]
    mask = (saturation > threshold) & (optical_density > MIN_OPTICAL_DENSITY)
    mask = closing(mask, disk(2))
    speck = max(4, int(mask.size * 5e-5))
    hole = max(16, int(mask.size * 1e-3))
    mask = remove_small_objects(mask, max_size=speck)
    return remove_small_holes(mask, max_size=hole)
