"""The evaluation protocol shared by all five methods (docs/algorithms.md 7.5).

One confusion matrix is accumulated over a whole set (not per-image averages), over the tissue
classes only: pixels whose ground truth is background are excluded, whatever was predicted there.
Per-class IoU, mIoU (nan-mean over classes that occur), FwIoU, Dice and pixel accuracy all come
from that one matrix, so they are consistent with each other.
"""

from __future__ import annotations

import numpy as np


class ConfusionMatrix:
    """Rows: ground truth, columns: prediction, both over the ``num_classes`` tissue classes."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        #: Tissue pixels predicted as background (or any non-class value), per true class.
        self.missed = np.zeros(num_classes, dtype=np.int64)

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """Add one image. Ground-truth values >= ``num_classes`` (background) are not counted.

        A prediction of background (or any value outside the classes) on a tissue pixel counts
        as wrong: it is a false negative of the true class and no class's false positive.
        """
        prediction = np.asarray(prediction)
        truth = np.asarray(truth)
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ")
        counted = truth < self.num_classes
        t = truth[counted].astype(np.int64)
        p = prediction[counted].astype(np.int64)
        inside = p < self.num_classes
        self.matrix += np.bincount(
            t[inside] * self.num_classes + p[inside], minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)
        self.missed += np.bincount(t[~inside], minlength=self.num_classes)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix
        self.missed += other.missed

    def scores(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        """mIoU, FwIoU, Dice, pixel and mean class accuracy, and per-class IoU/Dice.

        Classes that never occur in the truth nor the prediction get NaN and are left out of the
        means, as ``nanmean`` does in the released code.
        """
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        gt = m.sum(axis=1) + self.missed
        pred = m.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = tp / (gt + pred - tp)
            dice = 2 * tp / (gt + pred)
            class_acc = tp / gt
        iou[(gt + pred) == 0] = np.nan
        dice[(gt + pred) == 0] = np.nan
        total = gt.sum()
        frequency = gt / total if total else np.zeros_like(gt)
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        return {
            "miou": _nanmean(iou),
            "fwiou": float(np.nansum(frequency * iou)) if total else float("nan"),
            "dice": _nanmean(dice),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "mean_class_accuracy": _nanmean(class_acc),
            "per_class": {
                name: {"iou": _float(iou[i]), "dice": _float(dice[i]), "pixels": int(gt[i])}
                for i, name in enumerate(names)
            },
            "pixels": int(total),
        }


def per_image_spread(mious: list[float], names: list[str] | None = None) -> dict:
    """How the set's score spreads over its images: mean, median, 10th percentile and worst
    per-image mIoU (images whose mIoU is undefined left out), the values themselves in image
    order, with the images' ``names`` and the worst one's where given.

    The set's mIoU comes from one matrix over all pixels, so a few large images can hide many
    small ones scored badly; this tells a user how far one image of theirs may fall."""
    defined = [v is not None and np.isfinite(v) for v in mious]
    values = np.array([v for v, ok in zip(mious, defined, strict=True) if ok], dtype=np.float64)
    spread = {"mean": None, "median": None, "p10": None, "min": None, "worst": None,
              "miou": [float(v) if ok else None for v, ok in zip(mious, defined, strict=True)]}
    if names is not None:
        spread["names"] = list(names)
    if values.size:
        spread.update(mean=float(values.mean()), median=float(np.median(values)),
                      p10=float(np.percentile(values, 10)), min=float(values.min()))
        if names is not None:
            worst = min((v, i) for i, (v, ok) in enumerate(zip(mious, defined, strict=True))
                        if ok)[1]
            spread["worst"] = names[worst]
    return spread


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def format_scores(scores: dict) -> str:
    """A short human-readable table of a ``scores`` dict (in %)."""
    lines = [
        f"mIoU {100 * scores['miou']:.2f}  FwIoU {100 * scores['fwiou']:.2f}  "
        f"Dice {100 * scores['dice']:.2f}  pixel acc {100 * scores['pixel_accuracy']:.2f}"
    ]
    for name, values in scores["per_class"].items():
        iou = "  n/a" if values["iou"] is None else f"{100 * values['iou']:5.2f}"
        lines.append(f"  {name:<12} IoU {iou}  ({values['pixels']} px)")
    spread = scores.get("per_image")
    if spread and spread["mean"] is not None:
        lines.append(f"  per image: mIoU mean {100 * spread['mean']:.2f}  median "
                     f"{100 * spread['median']:.2f}  10th pct {100 * spread['p10']:.2f}  "
                     f"worst {100 * spread['min']:.2f}"
                     + (f" ({spread['worst']})" if spread.get("worst") else "")
                     + f"  ({len(spread['miou'])} images)")
    return "\n".join(lines)
