"""Several stage-1 classifiers, one kept: the one whose val pseudo-masks, each pixel limited to
the classes its class gate keeps there, score best (``ClassifierConfig.candidates``,
docs/algorithms.md 17).

Why: the recipe's largest error is calling a class in a region that does not hold it, and how
well the stage-1 classifier tells that on new images varies with its seed alone. The same
classifier also draws the pseudo-masks the segmenter learns, so the judge scores both at once:
the gate decides which classes a pixel may take, the class maps which of them it takes. Judged
by the gate alone (window presence F1, kept in the scores), one preferred classifier made worse
class maps and its run ended 2.4 val mIoU lower. The gated pseudo-masks order that pair the
right way, and 16 of 21 measured pairs of runs as they ended, the F1 12 (docs/results.md).

Candidate 0 trains with the run's own seed, so one candidate is exactly the plain classifier.
The choice needs val masks; without them the first candidate is the classifier.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config.run_config import PseudoMaskConfig, RunConfig
from ..data.datasets import EvalSet
from ..inference.metrics import ConfusionMatrix
from ..inference.predict import ClassGate, window_origins
from ..models.classifier import CamClassifier
from ..runs.run_dir import RunDirectory
from .cams import frozen_for_class_maps
from .pseudo_masks import eval_image_mask

#: A class is present in a window when it covers this share of it: the rule WSSS4LUAD's
#: training patches were labelled by.
PRESENCE_SHARE = 0.05

#: Where candidate ``k`` trains, as a run directory of its own inside the classifier's folder.
CANDIDATES_FOLDER = "candidates"
#: The candidates' scores and the choice, beside the kept ``model.pt``.
CHOICE_FILE = "candidates.json"


def candidate_seed(seed: int, index: int) -> int:
    """The seed of candidate ``index``: the run's seed for the first, distinct ones after."""
    return seed if index == 0 else seed + 1000 * index


def candidate_run(run: RunDirectory, index: int) -> RunDirectory:
    return RunDirectory(run.classifier_dir / CANDIDATES_FOLDER / str(index))


def gate_settings(config: RunConfig, classifier_size: int) -> tuple[int, float]:
    """(window, threshold) the candidates are judged with: those of the class gate that will
    use the classifier at prediction (the segmenter's input side, its gate threshold), else
    the training patch side and the pseudo-masks' gate threshold."""
    window = config.segmenter.input_size or classifier_size
    threshold = config.segmenter.class_gate
    if threshold is None:
        threshold = config.pseudo_masks.gate_threshold
    return window, float(threshold)


@torch.inference_mode()
def _window_keeps(classifier: CamClassifier, gate: ClassGate, image: np.ndarray, window: int,
                  device: torch.device | str) -> tuple[np.ndarray, list[tuple[int, int]],
                                                       tuple[int, int]]:
    """The classes the gate keeps in each window of one image: (windows, C) bool, the
    windows' origins and their size (the image's, where it is smaller than ``window``)."""
    height, width = image.shape[:2]
    size = (min(window, height), min(window, width))
    origins = window_origins(height, width, *size, window)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).to(device)
    crops = torch.stack([pixels[:, y:y + size[0], x:x + size[1]] for y, x in origins])
    probabilities = torch.sigmoid(classifier(classifier.normalise(crops)).logits)
    return gate.keeps(probabilities[None].float())[0].cpu().numpy(), origins, size


def window_presence_scores(classifier: CamClassifier, val: EvalSet, window: int,
                           threshold: float, device: torch.device | str = "cpu") -> dict:
    """How well ``ClassGate(classifier, threshold, window)`` keeps the classes each val window
    holds: F1 per class over windows (present = covers ``PRESENCE_SHARE`` of the window in
    the mask), their mean, and the share of windows whose kept classes are exactly right.
    Windows with no tissue class present are skipped (the gate always keeps one class)."""
    classifier = classifier.to(device).eval()
    gate = ClassGate(classifier, threshold, window=window)
    num_classes = val.spec.num_classes
    true_pos, false_pos, false_neg = (np.zeros(num_classes) for _ in range(3))
    exact = windows = 0
    for index in range(len(val)):
        image, truth = val.pair(index)
        kept, origins, (win_h, win_w) = _window_keeps(classifier, gate, image, window, device)
        for keeps, (y, x) in zip(kept, origins, strict=True):
            cut = truth[y:y + win_h, x:x + win_w]
            present = np.array([(cut == c).mean() >= PRESENCE_SHARE
                                for c in range(num_classes)])
            if not present.any():
                continue
            true_pos += keeps & present
            false_pos += keeps & ~present
            false_neg += ~keeps & present
            exact += int((keeps == present).all())
            windows += 1
    f1 = 2 * true_pos / np.maximum(2 * true_pos + false_pos + false_neg, 1)
    return {"macro_f1": round(float(f1.mean()), 4),
            "f1": {name: round(float(value), 4)
                   for name, value in zip(val.spec.class_names, f1, strict=True)},
            "exact": round(exact / max(windows, 1), 4), "windows": windows,
            "window": window, "threshold": threshold}


def gated_pseudo_mask_scores(classifier: CamClassifier, val: EvalSet, recipe: PseudoMaskConfig,
                             window: int, threshold: float,
                             device: torch.device | str = "cpu") -> dict:
    """mIoU (and IoU per class) of the val images' pseudo-masks made by ``recipe`` with each
    pixel limited to the classes ``ClassGate(classifier, threshold, window)`` keeps there (as
    prediction gates the segmenter): the gate and the class maps of one classifier, scored
    together on the val masks."""
    classifier = classifier.to(device).eval()
    gate = ClassGate(classifier, threshold, window=window)
    maps_model = frozen_for_class_maps(classifier)
    matrix = ConfusionMatrix(val.spec.num_classes)
    for index in range(len(val)):
        image, truth = val.pair(index)
        kept, origins, size = _window_keeps(classifier, gate, image, window, device)
        present = ClassGate.intersect(torch.from_numpy(kept)[None], origins, truth.shape, size)
        matrix.update(eval_image_mask(maps_model, image, present[0].numpy(), recipe, val.spec,
                                      device), truth)
    scores = matrix.scores(val.spec.class_names)
    return {"gated_pm_miou": round(float(scores["miou"]), 4),
            "gated_pm_iou": {name: round(float(value["iou"]), 4)
                             for name, value in scores["per_class"].items()}}


def best_candidate(scores: list[dict]) -> int:
    """The candidate whose gated val pseudo-masks score highest (the first of equals)."""
    return max(range(len(scores)), key=lambda index: (scores[index]["gated_pm_miou"], -index))
