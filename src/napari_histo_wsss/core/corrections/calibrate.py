"""Class offsets from a user's corrections: the class balance their strokes teach every image.

A few strokes change a network little (the fine-tune moves images nobody painted by less than
its own noise, docs/results.md "Correction loop"), but they say which way the model errs: on
WSSS4LUAD, stroma called tumour on whole regions. The class offsets (``core.inference.
calibration``) are what carries such a bias to every image, and they need only a target per
pixel of some images. A corrected image has one: its prediction refined by its strokes
(``SegmentationPredictor.finish``: the strokes teach the image's appearance model and overrule
the network near them), the painted pixels as painted. Offsets fitted to those targets on
half of WSSS4LUAD val matched the ones fitted to the true masks of the same images
(docs/results.md, sixteenth session), so strokes calibrate a run that has no val masks, and
join the masks of one that has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.datasets import EvalSet
from ..inference.calibration import (
    MIN_CLASS_IMAGES,
    fit_offsets_record,
    pixel_sample,
    save_offsets_record,
)
from ..inference.predict import WHOLE_IMAGE_LIMIT, SegmentationPredictor, window_origins
from ..runs.run_dir import RunDirectory
from .store import UNLABELLED, Correction, correction_pixels


class StrokeTargets:
    """Corrected images as images with targets (``calibration.TargetImages``)."""

    def __init__(self, corrections: Sequence[Correction]):
        self.corrections = [c for c in corrections if c.painted]

    def __len__(self) -> int:
        return len(self.corrections)

    def samples(self, predictor: SegmentationPredictor, per_image: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        return [sample for correction in self.corrections
                for sample in correction_samples(predictor, correction, per_image)]


def correction_samples(predictor: SegmentationPredictor, correction: Correction,
                       per_image: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(log p (P, C), targets (P,)) of one corrected image: windows of up to
    ``WHOLE_IMAGE_LIMIT`` px a side that hold strokes (a slide region can be larger)."""
    image = correction_pixels(correction)
    painted = correction.labels
    height, width = painted.shape
    side_h, side_w = min(height, WHOLE_IMAGE_LIMIT), min(width, WHOLE_IMAGE_LIMIT)
    windows = [(y, x) for y, x in window_origins(height, width, side_h, side_w,
                                                 min(side_h, side_w))
               if (painted[y:y + side_h, x:x + side_w] != UNLABELLED).any()]
    share = max(per_image // max(len(windows), 1), 1)
    return [window_sample(predictor, image[y:y + side_h, x:x + side_w],
                          painted[y:y + side_h, x:x + side_w], share) for y, x in windows]


def window_sample(predictor: SegmentationPredictor, image: np.ndarray, painted: np.ndarray,
                  per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """The predictor's probabilities without the strokes, against the prediction that
    follows them; white glass (where the dataset has a white plane) is left out unless a
    tissue class is painted on it, and so is painted background."""
    classes = predictor.num_classes
    network = predictor.network_probabilities(image[None])[0]
    probabilities = predictor.finish(network, image)
    target = predictor.finish(network, image, painted).argmax(axis=0).astype(np.int64)
    tissue_painted = (painted > UNLABELLED) & (painted <= classes)
    target[tissue_painted] = painted[tissue_painted].astype(np.int64) - 1
    spec = predictor.spec
    if spec.white_plane:
        target[(image.min(axis=2) > spec.white_threshold) & ~tissue_painted] = classes
    target[painted > classes] = classes
    return pixel_sample(probabilities, target, per_image)


def calibrate_with_corrections(run: RunDirectory, strategy: str,
                               corrections: Sequence[Correction], eval_set: EvalSet | None,
                               device: torch.device | str = "auto") -> dict[str, Any] | None:
    """Refit ``strategy``'s class offsets on the corrected images (and ``eval_set``'s masks,
    where given) and save them; None, leaving the saved offsets as they were, where no class
    is seen in ``MIN_CLASS_IMAGES`` of those images (nothing could be fitted)."""
    targets = StrokeTargets(corrections)
    if len(targets) + (len(eval_set) if eval_set is not None else 0) < MIN_CLASS_IMAGES:
        return None  # no class can be: spare the predictions
    record = fit_offsets_record(run, strategy, eval_set, device, more=targets)
    if not record["fitted_classes"]:
        return None
    save_offsets_record(run, strategy, record)
    return record
