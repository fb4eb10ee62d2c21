"""Class offsets fitted on the validation masks: the segmenter's class balance on new images.

A segmenter trained on pseudo-masks can lean towards one class on whole new images, where no
training patch showed it the other's context. On WSSS4LUAD every seed of the recommended recipe
calls a third of the val stroma tumour while finding nearly all the tumour (docs/results.md).
One log-probability offset per class moves those decisions; it is fitted on val like the
checkpoint and the class gate, and kept only where it raises val mIoU.

The fit is a coordinate search over ``OFFSET_GRID`` (two sweeps). A class found in fewer than
``MIN_CLASS_IMAGES`` val images keeps offset 0 and its balance against the others (the fitted
offsets are centred): fitted on a handful of images an offset follows those images, not the
class (WSSS4LUAD's normal, in 4 of 31, got -1.0 to +2.0 depending on which half of val it was
fitted on). Saved beside the checkpoint as ``CLASS_OFFSETS_FILE``, which ``load_predictor``
reads. A user's corrections are images with targets too: they join the val masks, or stand in
for them in a run without any (``core.corrections.calibrate``).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import numpy as np
import torch

from ..data.datasets import EvalSet
from ..runs.run_dir import RunDirectory
from .metrics import ConfusionMatrix
from .predict import (
    CLASS_OFFSETS_FILE,
    SegmentationPredictor,
    describe_gate_choice,
    evaluate,
    load_predictor,
    predict_image,
    select_class_gate,
)

OFFSET_GRID = np.round(np.arange(-1.0, 2.001, 0.25), 2)
MIN_CLASS_IMAGES = 8
#: The val mIoU an offset must add to be kept (fitting on val over-states it a little).
MIN_GAIN = 0.005
SWEEPS = 2
#: Val pixels the fit looks at, at most (an even sample of each image's share beyond it):
#: 31 WSSS4LUAD val images fit whole; a thousand-image val set would not fit in memory.
MAX_PIXELS = 8_000_000


def fit_class_offsets(log_probabilities: np.ndarray, truth: np.ndarray,
                      fitted: list[int]) -> np.ndarray:
    """Offsets (C,) maximising the mIoU of ``argmax(log_probabilities + offsets)`` against
    ``truth`` (tissue pixels only: (P, C) and (P,)); classes not in ``fitted`` stay 0.

    Only differences between offsets matter, so where some class is not fitted the fitted
    offsets are centred (their mean 0): lowering every fitted class would raise the others
    all the same, which is fitting them on the few images they were left out for
    (docs/results.md, sixteenth session)."""
    classes = log_probabilities.shape[1]
    centre = len(fitted) < classes
    offsets = np.zeros(classes)
    best = _miou(log_probabilities, truth, offsets)
    for _ in range(SWEEPS):
        for index in fitted:
            for value in OFFSET_GRID:
                candidate = offsets.copy()
                candidate[index] = value
                if centre:
                    candidate[fitted] -= candidate[fitted].mean()
                score = _miou(log_probabilities, truth, candidate)
                if score > best + 1e-9:
                    best, offsets = score, candidate
    return offsets


def _miou(log_probabilities: np.ndarray, truth: np.ndarray, offsets: np.ndarray) -> float:
    """The evaluation protocol's mIoU (``ConfusionMatrix``) of the offset argmax."""
    matrix = ConfusionMatrix(log_probabilities.shape[1])
    matrix.update((log_probabilities + offsets).argmax(axis=1), truth)
    return matrix.scores()["miou"]


def select_class_offsets(run: RunDirectory, strategy: str, eval_set: EvalSet | None,
                         device: torch.device | str = "auto", *,
                         more: TargetImages | None = None) -> dict[str, Any]:
    """Fit the offsets of ``strategy``'s segmenter (``fit_offsets_record``) and save them, or
    a record that none helped. Returns what was saved."""
    record = fit_offsets_record(run, strategy, eval_set, device, more=more)
    save_offsets_record(run, strategy, record)
    return record


def fit_offsets_record(run: RunDirectory, strategy: str, eval_set: EvalSet | None,
                       device: torch.device | str = "auto", *,
                       more: TargetImages | None = None) -> dict[str, Any]:
    """The offsets of ``strategy``'s segmenter fitted on ``eval_set``'s masks (with the
    class-gate choice already made), as ``select_class_offsets`` saves them. ``more`` adds
    other images with targets (a user's corrections, ``core.corrections.calibrate``); either
    may be absent."""
    predictor = load_predictor(run.root, device, strategy=strategy, use_class_offsets=False)
    val_images = len(eval_set) if eval_set is not None else 0
    more_images = len(more) if more is not None else 0
    per_image = MAX_PIXELS // max(val_images + more_images, 1)
    samples = list(val_samples(predictor, eval_set, per_image)) if val_images else []
    if more_images:
        samples += more.samples(predictor, per_image)
    return {**choose_offsets(samples, predictor.spec.class_names), "images": val_images,
            "corrected_images": more_images}


def save_offsets_record(run: RunDirectory, strategy: str, record: dict[str, Any]) -> None:
    """Write ``record`` beside the segmenter, where ``load_predictor`` reads it."""
    path = run.segmenter_dir(strategy) / CLASS_OFFSETS_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")


class TargetImages(Protocol):
    """Images with per-pixel targets besides the val masks."""

    def __len__(self) -> int: ...

    def samples(self, predictor: SegmentationPredictor, per_image: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(log-probabilities (P, C), targets (P,)) per image, as ``pixel_sample`` gives."""


def val_samples(predictor: SegmentationPredictor, eval_set: EvalSet, per_image: int):
    """(log-probabilities (P, C), truth (P,)) of each val image's tissue pixels, at most
    ``per_image`` of them (an even sample)."""
    for index in range(len(eval_set)):
        image, truth = eval_set.pair(index)
        _, probabilities = predict_image(predictor, image)
        yield pixel_sample(probabilities, truth, per_image)


def pixel_sample(probabilities: np.ndarray, target: np.ndarray, per_image: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One image's (C, H, W) probabilities and (H, W) targets as (log p (P, C), targets (P,))
    over its pixels with a class target (< C), at most ``per_image`` (evenly spaced)."""
    classes = probabilities.shape[0]
    kept = np.flatnonzero(target.ravel() < classes)
    if len(kept) > per_image:
        kept = kept[np.linspace(0, len(kept) - 1, per_image).astype(np.int64)]
    flat = probabilities.reshape(classes, -1)[:, kept].T
    return (np.log(np.clip(flat, 1e-8, None)).astype(np.float32),
            target.ravel()[kept].astype(np.int64))


def choose_offsets(samples: list[tuple[np.ndarray, np.ndarray]],
                   class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Offsets fitted on per-image samples, with the record ``select_class_offsets`` saves:
    only classes in ``MIN_CLASS_IMAGES`` images move, kept only if they gain ``MIN_GAIN``."""
    classes = len(class_names)
    if not samples:
        samples = [(np.zeros((0, classes), np.float32), np.zeros(0, np.int64))]
    seen = sum(np.isin(np.arange(classes), target) for _, target in samples)
    log_probabilities = np.concatenate([log_p for log_p, _ in samples])
    truth = np.concatenate([target for _, target in samples])
    fitted = [c for c in range(classes) if seen[c] >= MIN_CLASS_IMAGES]
    offsets = fit_class_offsets(log_probabilities, truth, fitted)
    before = _miou(log_probabilities, truth, np.zeros(classes))
    after = _miou(log_probabilities, truth, offsets)
    use = bool(after >= before + MIN_GAIN)
    return {"use": use, "offsets": [float(v) for v in offsets] if use else [0.0] * classes,
            "classes": list(class_names),
            "fitted_classes": [class_names[c] for c in fitted],
            "miou_without": before, "miou_with": after}


def counted(number: int, noun: str) -> str:
    """"1 val image", "7 val images"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def describe_offsets(record: dict[str, Any]) -> str:
    """One line on the offsets ``select_class_offsets`` chose."""
    sources = [counted(record["images"], "val image")] if record["images"] else []
    if record.get("corrected_images"):
        sources.append(counted(record["corrected_images"], "corrected image"))
    where = " and ".join(sources) or "no images"
    if not record["fitted_classes"]:
        return (f"class offsets not fitted: no class is in {MIN_CLASS_IMAGES} or more of the "
                f"{where}")
    fitted = ", ".join(f"{name} {value:+.2f}" for name, value in
                       zip(record["classes"], record["offsets"], strict=True) if value)
    verdict = f"kept ({fitted})" if record["use"] else "none kept"
    score = "val mIoU" if not record.get("corrected_images") else "mIoU"
    return (f"class offsets {verdict}: {score} {100 * record['miou_without']:.2f} without, "
            f"{100 * record['miou_with']:.2f} fitted on these same {where}")


def make_val_choices(run: RunDirectory, strategy: str, eval_set: EvalSet,
                     device: torch.device | str = "auto") -> tuple[dict[str, Any], list[str]]:
    """What the recipe decides on val once a segmenter is trained: the class gate, then (where
    the recipe asks) class offsets. Returns the scores of the predictor ``load_predictor``
    now gives, and one line per choice made."""
    scores = select_class_gate(run, strategy, eval_set, device)
    lines = [line for line in [describe_gate_choice(scores)] if line]
    if run.config().segmenter.fit_class_offsets:
        offsets = select_class_offsets(run, strategy, eval_set, device)
        lines.append(describe_offsets(offsets))
        if offsets["use"]:
            scores = {**scores, **evaluate(load_predictor(run.root, device, strategy), eval_set),
                      "class_offsets": offsets["offsets"],
                      "miou_without_offsets": offsets["miou_without"]}
    return scores, lines
