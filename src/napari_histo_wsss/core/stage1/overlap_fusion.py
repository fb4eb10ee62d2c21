"""Pseudo-masks that agree where training patches overlap.

Patches cut at a stride smaller than their side (WSSS4LUAD: 160 px at stride 80) see the same
tissue two to four times, and their class maps and gates disagree there. Fused, each pixel
takes the mean of its covering patches' class maps and only the classes every covering patch's
gate kept (all of them where those sets share none), so one patch's missed or spurious class
does not decide its overlap alone, and the stitched masks are one consistent map that stage 2
can cut larger windows from (``data.stitching.windows_around_patches``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from ..data.stitching import StitchedImage


class _RecipeOutput(Protocol):
    maps: dict[str, np.ndarray]
    kept: np.ndarray


def fused_maps(stitched: StitchedImage, outputs: Sequence[_RecipeOutput], map_name: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """(mean class maps (C, H, W) float32, classes allowed per pixel (C, H, W) bool) over the
    canvas; ``outputs`` in placement order. Uncovered pixels get zeros and every class."""
    classes = outputs[0].kept.shape[0]
    shape = (classes, *stitched.covered.shape)
    total = np.zeros(shape, np.float32)
    count = np.zeros(stitched.covered.shape, np.float32)
    every = np.ones(shape, bool)
    some = np.zeros(shape, bool)
    for placement, output in zip(stitched.placements, outputs, strict=True):
        box = (slice(None), *placement.box)
        kept = np.asarray(output.kept, bool)[:, None, None]
        total[box] += output.maps[map_name]
        count[placement.box] += 1
        every[box] &= kept
        some[box] |= kept
    allowed = np.where(every.any(axis=0), every, some)
    allowed[:, ~stitched.covered] = True
    return total / np.maximum(count, 1), allowed


class OverlapFusion:
    """Holds the recipe's outputs for stitched patches until a stitched image is complete."""

    def __init__(self, stitched: Sequence[StitchedImage]):
        self.stitched = list(stitched)
        self.image_of = {placement.index: number for number, image in enumerate(self.stitched)
                         for placement in image.placements}
        self.pending: dict[int, dict[int, _RecipeOutput]] = defaultdict(dict)

    def order(self, count: int) -> list[int]:
        """Patch indices with each stitched image's patches together, so few wait."""
        grouped = [p.index for image in self.stitched for p in image.placements]
        return grouped + [i for i in range(count) if i not in self.image_of]

    def holds(self, index: int) -> bool:
        return index in self.image_of

    def add(self, index: int, output: _RecipeOutput
            ) -> Iterator[tuple[StitchedImage, list[_RecipeOutput]]]:
        """Keep ``output``; yields its stitched image with all outputs once the last arrives."""
        number = self.image_of[index]
        waiting = self.pending[number]
        waiting[index] = output
        image = self.stitched[number]
        if len(waiting) == len(image.placements):
            del self.pending[number]
            yield image, [waiting[p.index] for p in image.placements]
