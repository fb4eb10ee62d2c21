"""Stain augmentation: H&E colour jitter in haematoxylin-eosin-DAB space (docs/algorithms.md 12).

Scanners, stain batches and fading shift H&E colours between labs and slides far more than
brightness or hue jitter in RGB models: the shift is per stain. Scaling and offsetting each
stain's optical density (Tellez et al., 2018) simulates it while keeping tissue structure, so a
model trained on one lab's patches holds on another's. The colour deconvolution matrices are
scikit-image's (Ruifrok & Johnston); the arithmetic runs in torch so a whole batch is jittered
at once, on any device.
"""

from __future__ import annotations

import math

import torch
from skimage.color import hed_from_rgb, rgb_from_hed

#: Per-stain optical-density scale ~ U(1 - s, 1 + s) and offset ~ U(-b, b). Stain densities of
#: H&E patches span about 0-0.15 (haematoxylin) and 0-0.06 (eosin), so these move colours
#: visibly without inventing stains ("HED-light" strength).
STAIN_SCALE = 0.15
STAIN_OFFSET = 0.01

#: scikit-image's floor for the optical density: log(1e-6).
_LOG_FLOOR = math.log(1e-6)


def hed_jitter(x: torch.Tensor, generator: torch.Generator, scale: float = STAIN_SCALE,
               offset: float = STAIN_OFFSET) -> torch.Tensor:
    """(N, 3, H, W) RGB on 0-255 -> the same batch with each image's stains jittered.

    Background white has zero density and stays white; every image draws its own factors.
    """
    n = x.shape[0]
    dtype, device = torch.float32, x.device
    to_hed = torch.as_tensor(hed_from_rgb, dtype=dtype, device=device)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=dtype, device=device)
    rgb = (x.to(dtype) / 255.0).clamp_min(1e-6).permute(0, 2, 3, 1)  # (N, H, W, 3)
    stains = (torch.log(rgb) / _LOG_FLOOR) @ to_hed
    factors = 1 + scale * (2 * torch.rand(n, 1, 1, 3, generator=generator) - 1)
    shifts = offset * (2 * torch.rand(n, 1, 1, 3, generator=generator) - 1)
    stains = stains * factors.to(device) + shifts.to(device)
    jittered = torch.exp((stains * _LOG_FLOOR) @ to_rgb).clamp(0, 1)
    return (jittered * 255.0).permute(0, 3, 1, 2).to(x.dtype)
