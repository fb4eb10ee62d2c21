"""The review queue: images ranked by how little the segmenter can be trusted there.

Two signals, both measured on tissue (white glass is left out) and both in [0, 1]:

- **entropy** of the class probabilities (averaged over the test-time views), divided by
  ``log C`` so that 1 means "no idea which class";
- **view disagreement**: the share of the views (identity, flips, a quarter turn) whose class
  differs from the averaged prediction, i.e. where the answer depends on how the image is
  turned.

An image's score is the mean of the two over its tissue pixels; its *focus* is the window of
``window`` pixels where the same per-pixel score is highest, so the viewer can jump straight
to the least trusted area and a stroke there is likely to matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import read_rgb
from ..errors import DatasetError
from ..inference.predict import WHOLE_IMAGE_LIMIT, SegmentationPredictor
from ..models.segmenter import normalise

#: (quarter turns, horizontal flip) of the views compared for disagreement.
VIEWS = ((0, False), (0, True), (2, True), (1, False))
FOCUS_WINDOW = 64


@dataclass
class ReviewItem:
    """One image of the queue; ``focus`` is (top, left, height, width) in its pixels."""

    image: str
    score: float
    entropy: float
    disagreement: float
    focus: tuple[int, int, int, int]


def distrust_maps(predictor: SegmentationPredictor, image: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalised entropy, view disagreement, averaged probabilities (C, H, W)) of an image."""
    x = normalise(torch.from_numpy(np.array(image[None], np.uint8)).to(predictor.device),
                  predictor.mean, predictor.std)
    views = []
    with torch.inference_mode():
        for turns, flip in VIEWS:
            view = torch.rot90(x, turns, dims=(2, 3))
            view = view.flip(-1) if flip else view
            logits = predictor.logits(view)
            logits = logits.flip(-1) if flip else logits
            views.append(torch.softmax(torch.rot90(logits, -turns, dims=(2, 3)), dim=1)[0])
    stacked = torch.stack(views).float()
    mean = stacked.mean(dim=0)
    entropy = -(mean * torch.log(mean.clamp_min(1e-8))).sum(dim=0)
    entropy = entropy / float(np.log(mean.shape[0]))
    disagreement = (stacked.argmax(dim=1) != mean.argmax(dim=0)).float().mean(dim=0)
    return entropy.cpu().numpy(), disagreement.cpu().numpy(), mean.cpu().numpy()


def review_image(predictor: SegmentationPredictor, path: str | Path,
                 window: int = FOCUS_WINDOW) -> ReviewItem:
    """The trust figures of one image file."""
    from scipy.ndimage import uniform_filter

    image = read_rgb(path)
    if max(image.shape[:2]) > WHOLE_IMAGE_LIMIT:
        raise DatasetError(f"the review queue scores images up to {WHOLE_IMAGE_LIMIT} pixels a "
                           "side; review a slide through its regions instead", path)
    entropy, disagreement, _ = distrust_maps(predictor, image)
    tissue = image.mean(axis=-1) <= predictor.spec.white_threshold
    if not tissue.any():
        tissue[:] = True  # all glass: score it anyway rather than drop it
    per_pixel = (entropy + disagreement) / 2 * tissue
    side_y, side_x = min(window, image.shape[0]), min(window, image.shape[1])
    smoothed = uniform_filter(per_pixel, size=(side_y, side_x), mode="constant")
    cy, cx = np.unravel_index(int(np.argmax(smoothed)), smoothed.shape)
    top = int(np.clip(cy - side_y // 2, 0, image.shape[0] - side_y))
    left = int(np.clip(cx - side_x // 2, 0, image.shape[1] - side_x))
    return ReviewItem(str(Path(path).resolve()), float(per_pixel[tissue].mean()),
                      float(entropy[tissue].mean()), float(disagreement[tissue].mean()),
                      (top, left, side_y, side_x))


def review_queue(predictor: SegmentationPredictor, images: Sequence[str | Path],
                 top: int | None = None, window: int = FOCUS_WINDOW) -> list[ReviewItem]:
    """``images`` from least to most trusted (the first ``top`` of them)."""
    items = [review_image(predictor, path, window) for path in images]
    items.sort(key=lambda item: -item.score)
    return items if top is None else items[:top]
