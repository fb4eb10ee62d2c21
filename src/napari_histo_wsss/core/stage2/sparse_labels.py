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


def with_corrections(patches: PatchSet, targets: list[list[np.ndarray]],
                     corrections: Sequence[SparseLabels]
                     ) -> tuple[PatchSet, list[list[np.ndarray]], list[np.ndarray]]:
    """(patches, pseudo-masks per target, painted labels per patch) with the corrections in.

    A correction of a training patch overrides that patch's pseudo-masks; any other image is
    appended as a new sample whose patch-level label is the classes of its targets."""
    index_of = {path.resolve(): index for index, path in enumerate(patches.paths)}
    painted = [np.full(patches.image(i).shape[:2], IGNORE_INDEX, np.uint8)
               for i in range(len(patches))]
    targets = [list(masks) for masks in targets]
    paths, labels = list(patches.paths), [*patches.labels]
    cache = {i: patches.image(i) for i in range(len(patches))}
    for correction in corrections:
        if correction.labels.shape != correction.image.shape[:2]:
            raise DatasetError(f"painted labels are {correction.labels.shape[::-1]} pixels but "
                               f"the image is {correction.image.shape[1::-1]}", correction.path)
        index = index_of.get(Path(correction.path).resolve())
        if index is not None and correction.image.shape[:2] == painted[index].shape:
            painted[index] = correction.labels
            for masks in targets:
                masks[index] = override_pseudo_mask(masks[index], correction.labels)
            continue
        base = correction.pseudo_mask if correction.pseudo_mask is not None \
            else np.full(correction.labels.shape, IGNORE_INDEX, np.uint8)
        target = override_pseudo_mask(base, correction.labels)
        for masks in targets:
            masks.append(target)
        painted.append(correction.labels)
        present = np.zeros(patches.spec.num_classes, np.uint8)
        present[np.unique(target[target < patches.spec.num_classes])] = 1
        cache[len(paths)] = correction.image
        paths.append(Path(correction.path))
        labels.append(present)
    extended = PatchSet(paths, np.stack(labels), patches.spec, cache)
    return extended, targets, painted
