"""Training patches cut from one image at known places, put back together.

WSSS4LUAD and LUAD-HistoSeg name a training patch ``<source>-<y>-<x>-[labels]``: the image it
was cut from and where. Patches that overlap there (WSSS4LUAD's crops at stride 80) rebuild a
region larger than any of them, which lets the pseudo-masks agree across the overlaps
(``stage1.overlap_fusion``) and the segmenter learn from windows with more context than one
patch holds (``windows_around_patches``); docs/algorithms.md 13.

A group is stitched only where its patches' pixels are identical wherever they overlap (the
offsets are tried as (y, x), then as (x, y)), so names that merely look like positions never
put wrong pixels into training.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .datasets import PatchSet

_PLACED_NAME = re.compile(r"^(?P<source>.+)-(?P<a>\d+)-(?P<b>\d+)-\[")


@dataclass(frozen=True)
class Placement:
    """Where patch ``index`` (of the patch set) lies in its stitched image."""

    index: int
    top: int
    left: int
    height: int
    width: int

    @property
    def box(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def overlaps(self, rows: slice, columns: slice) -> bool:
        return (self.top < rows.stop and rows.start < self.top + self.height
                and self.left < columns.stop and columns.start < self.left + self.width)


@dataclass
class StitchedImage:
    """Overlapping patches of one source image on one canvas; ``covered`` marks the pixels
    some patch holds (a group's bounding box can have holes)."""

    source: str
    pixels: np.ndarray  # (H, W, 3) uint8
    covered: np.ndarray  # (H, W) bool
    placements: list[Placement]

    def window(self, placement: Placement, margin: int) -> tuple[slice, slice]:
        """The placement grown by ``margin`` pixels each way inside the canvas, or the
        placement itself where the grown window would reach an uncovered pixel."""
        height, width = self.covered.shape
        rows = slice(max(0, placement.top - margin),
                     min(height, placement.top + placement.height + margin))
        columns = slice(max(0, placement.left - margin),
                        min(width, placement.left + placement.width + margin))
        return (rows, columns) if self.covered[rows, columns].all() else placement.box

    def paste(self, per_patch: Sequence[np.ndarray], fill: int) -> np.ndarray:
        """One (H, W) canvas from a 2-D array per placement (in placement order), ``fill``
        where no patch lies; where they overlap the later placement's values stay."""
        canvas = np.full(self.covered.shape, fill, dtype=per_patch[0].dtype)
        for placement, values in zip(self.placements, per_patch, strict=True):
            canvas[placement.box] = values
        return canvas


def stitch_patches(patches: PatchSet) -> list[StitchedImage]:
    """Every group of two or more overlapping patches whose names place them in the same
    source image and whose pixels agree, as one stitched image each."""
    by_source: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for index, path in enumerate(patches.paths):
        match = _PLACED_NAME.match(path.name)
        if match:
            by_source[match["source"]].append((index, int(match["a"]), int(match["b"])))
    stitched = []
    for source, members in by_source.items():
        for order in ((1, 2), (2, 1)):  # offsets as (y, x), else as (x, y)
            placements = [Placement(m[0], m[order[0]], m[order[1]],
                                    *patches.image(m[0]).shape[:2]) for m in members]
            images = [_stitch(source, group, patches) for group in _overlapping_groups(placements)]
            if all(image is not None for image in images):
                stitched.extend(images)
                break
    return stitched


def _overlapping_groups(placements: list[Placement]) -> list[list[Placement]]:
    """Connected groups (two or more) of placements whose boxes overlap."""
    parent = list(range(len(placements)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, first in enumerate(placements):
        for j in range(i + 1, len(placements)):
            if first.overlaps(*placements[j].box):
                parent[root(i)] = root(j)
    groups: dict[int, list[Placement]] = defaultdict(list)
    for i, placement in enumerate(placements):
        groups[root(i)].append(placement)
    return [group for group in groups.values() if len(group) > 1]


def _stitch(source: str, group: list[Placement], patches: PatchSet) -> StitchedImage | None:
    """The group on a canvas from its top-left corner, or None if overlapping pixels differ."""
    top = min(p.top for p in group)
    left = min(p.left for p in group)
    group = [Placement(p.index, p.top - top, p.left - left, p.height, p.width) for p in group]
    height = max(p.top + p.height for p in group)
    width = max(p.left + p.width for p in group)
    pixels = np.zeros((height, width, 3), np.uint8)
    covered = np.zeros((height, width), bool)
    for placement in group:
        image = patches.image(placement.index)
        box = placement.box
        seen = covered[box]
        if not np.array_equal(pixels[box][seen], image[seen]):
            return None
        pixels[box] = image
        covered[box] = True
    return StitchedImage(source, pixels, covered, group)


def windows_around_patches(patches: PatchSet, targets: list[list[np.ndarray]], margin: int,
                           fill: int) -> tuple[PatchSet, list[list[np.ndarray]]]:
    """Each stitched patch replaced by the window ``margin`` pixels around it (its own box
    where that window would leave the stitched pixels), with each target's masks pasted
    from the overlapping patches' masks; unstitched patches stay as they are.

    The returned set keeps the paths (each names the patch its window is centred on); its
    label is what the patches overlapping the window are labelled with together."""
    images = {i: patches.image(i) for i in range(len(patches))}
    labels = patches.labels.copy()
    windowed = [list(masks) for masks in targets]
    for stitched in stitch_patches(patches):
        canvases = [stitched.paste([masks[p.index] for p in stitched.placements], fill)
                    for masks in targets]
        for placement in stitched.placements:
            window = stitched.window(placement, margin)
            images[placement.index] = stitched.pixels[window]
            for masks, canvas in zip(windowed, canvases, strict=True):
                masks[placement.index] = canvas[window]
            inside = [p.index for p in stitched.placements if p.overlaps(*window)]
            labels[placement.index] = patches.labels[inside].max(axis=0)
    return PatchSet(list(patches.paths), labels, patches.spec, images), windowed
