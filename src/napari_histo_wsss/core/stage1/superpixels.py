"""Superpixel smoothing of class maps (docs/algorithms.md 12).

CAMs come from feature maps of stride 16-32 and are upsampled bilinearly, so their boundaries
are blobs that ignore the tissue. Averaging each class map inside colour-coherent superpixels
(SLIC on the H&E patch) snaps those boundaries to the tissue's own edges before the argmax,
without any training. Averaging is linear, so it commutes with the layer fusion and the
scale mean that follow.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.segmentation import slic

#: SLIC's colour-vs-space trade-off in Lab units; 30 keeps superpixels compact on H&E,
#: where stroma's pale texture otherwise makes long thin segments.
COMPACTNESS = 30.0


def superpixels(image: np.ndarray, size: int) -> np.ndarray:
    """SLIC segments of an (H, W, 3) uint8 image, about ``size`` px across: (H, W) int64,
    labels 0..K-1."""
    height, width = image.shape[:2]
    count = max(1, round(height * width / float(size * size)))
    segments = slic(image, n_segments=count, compactness=COMPACTNESS, start_label=0,
                     channel_axis=-1)
    _, dense = np.unique(segments, return_inverse=True)
    return dense.reshape(height, width).astype(np.int64)


def average_within(maps: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Each channel of ``maps`` (C, H, W) replaced by its mean over each segment of
    ``segments`` (H, W) int64 labels 0..K-1."""
    channels = maps.shape[0]
    flat_segments = segments.flatten().to(maps.device)
    count = int(flat_segments.max()) + 1
    sums = torch.zeros(channels, count, dtype=maps.dtype, device=maps.device)
    sums.index_add_(1, flat_segments, maps.flatten(1))
    sizes = torch.bincount(flat_segments, minlength=count).to(maps.dtype)
    return (sums / sizes).index_select(1, flat_segments).view_as(maps)


def batch_superpixels(images: np.ndarray, size: int) -> list[torch.Tensor]:
    """Segments of each (H, W, 3) image of a batch, computed once for all its maps."""
    return [torch.from_numpy(superpixels(image, size)) for image in images]


def smooth_maps(maps: torch.Tensor, segments: list[torch.Tensor]) -> torch.Tensor:
    """(N, C, H, W) class maps averaged within their images' ``segments``."""
    return torch.stack([average_within(image_maps, image_segments)
                        for image_maps, image_segments in zip(maps, segments, strict=True)])
