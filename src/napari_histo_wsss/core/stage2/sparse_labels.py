"""Painted pixels as training targets for the segmenter (docs/corrections.md).

A user's correction is trusted more than any pseudo-mask: at a painted pixel the painted class
replaces the pseudo-mask (so the strategy's own loss trains towards it), and a partial
cross-entropy over the painted pixels alone is added with full weight, so a noise-suppression
loss that down-weights "hard" pixels cannot discount exactly the pixels the user fixed.
Images that are not training patches (a val image, a slide region) join the training set
with their painted pixels and, elsewhere, the target the caller gives (or nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import PatchSet
from ..data.stitching import stitch_patches
from ..errors import DatasetError
from .losses import IGNORE_INDEX, LossResult, with_background_channel

#: The loss part (logged per epoch) of the partial CE on painted pixels.
CORRECTION_PART = "corrections"


@dataclass
class SparseLabels:
    """One image's painted pixels in mask values (class index, background = number of
    classes), ``IGNORE_INDEX`` where nothing was painted."""

    path: Path
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) uint8
    #: What the unpainted pixels of an image that is no training patch are trained against
    #: (e.g. the current model's prediction); None: nothing (ignored).
    pseudo_mask: np.ndarray | None = None


def override_pseudo_mask(pseudo_mask: np.ndarray, painted: np.ndarray) -> np.ndarray:
    """The pseudo-mask with every painted pixel replaced by its painted class."""
    return np.where(painted != IGNORE_INDEX, painted, pseudo_mask).astype(np.uint8)


def partial_cross_entropy(logits: torch.Tensor, painted: torch.Tensor,
                          background_index: int) -> torch.Tensor:
    """Mean CE over the painted pixels only (background through the constant channel);
    0 for a batch without painted pixels, which keeps the graph and never becomes NaN."""
    if not bool((painted != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    extended = with_background_channel(logits.float(), painted, background_index)
    return F.cross_entropy(extended, painted, ignore_index=IGNORE_INDEX)


def with_partial_cross_entropy(result: LossResult, logits: torch.Tensor, painted: torch.Tensor,
                               background_index: int) -> LossResult:
    """The strategy's ``result`` plus the painted pixels' partial CE at full weight."""
    extra = partial_cross_entropy(logits, painted, background_index)
    return LossResult(result.loss + extra, result.pixel_weight,
                      {**result.parts, CORRECTION_PART: float(extra.detach())})


def painted_on_patches(patches: PatchSet, corrections: Sequence[SparseLabels], *,
                       spread: bool = False) -> tuple[list[np.ndarray], list[SparseLabels]]:
    """(painted labels per training patch, ``IGNORE_INDEX`` where nothing was painted; the
    corrections of other images).

    With ``spread``, a pixel painted on one patch is painted on every stitched neighbour that
    covers it too (``data.stitching``), so the context windows cut from the stitched image
    all carry the correction instead of the later neighbour's unpainted pixels."""
    index_of = {path.resolve(): index for index, path in enumerate(patches.paths)}
    painted = [np.full(patches.image(i).shape[:2], IGNORE_INDEX, np.uint8)
               for i in range(len(patches))]
    others = []
    for correction in corrections:
        if correction.labels.shape != correction.image.shape[:2]:
            raise DatasetError(f"painted labels are {correction.labels.shape[::-1]} pixels but "
                               f"the image is {correction.image.shape[1::-1]}", correction.path)
        index = index_of.get(Path(correction.path).resolve())
        if index is not None and correction.image.shape[:2] == painted[index].shape:
            painted[index] = correction.labels
        else:
            others.append(correction)
    return (_spread_over_overlaps(patches, painted) if spread else painted), others


def _spread_over_overlaps(patches: PatchSet, painted: list[np.ndarray]) -> list[np.ndarray]:
    painted = list(painted)
    touched = {i for i, labels in enumerate(painted) if (labels != IGNORE_INDEX).any()}
    for image in stitch_patches(patches) if touched else []:
        if not touched & {placement.index for placement in image.placements}:
            continue
        canvas = np.full(image.covered.shape, IGNORE_INDEX, np.uint8)
        for placement in image.placements:
            own = painted[placement.index]
            canvas[placement.box] = np.where(own != IGNORE_INDEX, own, canvas[placement.box])
        for placement in image.placements:
            painted[placement.index] = canvas[placement.box].copy()
    return painted


def override_targets(targets: list[list[np.ndarray]], painted: Sequence[np.ndarray]
                     ) -> list[list[np.ndarray]]:
    """Each target's pseudo-masks with the painted pixels' classes in."""
    return [[override_pseudo_mask(mask, labels) for mask, labels in zip(masks, painted,
                                                                        strict=True)]
            for masks in targets]


def append_corrections(samples: PatchSet, targets: list[list[np.ndarray]],
                       painted: list[np.ndarray], others: Sequence[SparseLabels]
                       ) -> tuple[PatchSet, list[list[np.ndarray]], list[np.ndarray]]:
    """The training samples with each correction of another image (a val image, a slide
    region) appended as a new sample: its painted pixels, elsewhere its ``pseudo_mask`` (or
    nothing), and as patch-level label the classes of that target."""
    targets = [list(masks) for masks in targets]
    painted = list(painted)
    paths, labels = list(samples.paths), [*samples.labels]
    cache = {i: samples.image(i) for i in range(len(samples))}
    for correction in others:
        base = correction.pseudo_mask if correction.pseudo_mask is not None \
            else np.full(correction.labels.shape, IGNORE_INDEX, np.uint8)
        target = override_pseudo_mask(base, correction.labels)
        for masks in targets:
            masks.append(target)
        painted.append(correction.labels)
        present = np.zeros(samples.spec.num_classes, np.uint8)
        present[np.unique(target[target < samples.spec.num_classes])] = 1
        cache[len(paths)] = correction.image
        paths.append(Path(correction.path))
        labels.append(present)
    return PatchSet(paths, np.stack(labels), samples.spec, cache), targets, painted
