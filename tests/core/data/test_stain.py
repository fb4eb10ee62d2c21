"""H&E stain jitter on real patches."""

from __future__ import annotations

import numpy as np
import torch
from skimage.color import rgb2hed

from napari_histo_wsss.core.data.stain import hed_jitter


def _batch(patches, count=4) -> torch.Tensor:
    same_size = [image for image in map(patches.image, range(len(patches)))
                 if image.shape == (160, 160, 3)]
    images = np.stack(same_size[:count])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def test_no_jitter_gives_back_the_image(sample_patches):
    x = _batch(sample_patches)
    same = hed_jitter(x, torch.Generator().manual_seed(0), scale=0.0, offset=0.0)
    assert torch.allclose(same, x, atol=1e-3)


def test_jitter_moves_each_image_by_its_own_stain_factors_and_keeps_structure(sample_patches):
    x = _batch(sample_patches)
    jittered = hed_jitter(x, torch.Generator().manual_seed(3))
    changes = (jittered - x).abs().mean(dim=(1, 2, 3))
    assert (changes > 1.0).all()  # every image's colour moved...
    assert len({round(float(c), 3) for c in changes}) == len(changes)  # ... by its own draw
    for original, moved in zip(x, jittered, strict=True):
        before = rgb2hed(original.permute(1, 2, 0).numpy() / 255.0)[..., 0].ravel()
        after = rgb2hed(moved.permute(1, 2, 0).numpy() / 255.0)[..., 0].ravel()
        # Haematoxylin (nuclei) stays where it was: a per-stain affine change, not noise.
        assert np.corrcoef(before, after)[0, 1] > 0.97


def test_white_background_stays_white_without_offset():
    white = torch.full((2, 3, 8, 8), 255.0)
    jittered = hed_jitter(white, torch.Generator().manual_seed(0), scale=0.3, offset=0.0)
    assert torch.allclose(jittered, white, atol=0.5)
