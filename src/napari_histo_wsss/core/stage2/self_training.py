"""Self-training: a teacher network relabels the training patches (docs/algorithms.md 16).

A segmenter trained on the class-map pseudo-masks generalises past many of their errors: on
WSSS4LUAD val, ESFAN's PSPNet trained on the recipe's masks, with each image's appearance
model and restricted to the image's true classes, scores 72.5 mIoU where the masks score 67.4
(docs/results.md). The training patches have their true classes (their labels), so the
teacher's predictions restricted to them are better targets than the masks it learnt from.

The ``refined-masks`` stage trains the teacher (``PseudoMaskConfig.teacher``: the run's
segmenter with the teacher's changes, on ``pseudo_masks/final``), predicts every stitched
training image whole (so a patch is seen with its neighbours' context, as the segmenter
trains), keeps each patch's own labelled classes and its mask's white background, and writes
``pseudo_masks/refined/``, which the strategy's networks then train on
(``SegmenterConfig.targets``).
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import replace

import numpy as np
import torch

from ..config.run_config import REFINED_TARGET, RunConfig
from ..data.datasets import EvalSet, PatchSet, read_mask, write_palette_mask
from ..data.stitching import stitch_patches
from ..devices import resolve_device
from ..events import Done, Event, Message, StopToken
from ..inference.metrics import ConfusionMatrix
from ..inference.predict import SegmentationPredictor, load_predictor, predict_image
from ..runs.locks import writes_run
from ..runs.outputs import atomic_write_text
from ..runs.run_dir import RunDirectory
from ..runs.stages import REFINED_MASKS
from ..training.loop import run_epochs
from .train_segmenter import SegmenterTrainer

#: The teacher's scores, beside its checkpoint.
TEACHER_REPORT = "report.json"


@writes_run("refined pseudo-masks")
def refine_pseudo_masks(run: RunDirectory, config: RunConfig, patches: PatchSet, *,
                        device: torch.device | str | None = None, stop: StopToken | None = None,
                        val: EvalSet | None = None, resume: bool = True
                        ) -> Generator[Event, None, None]:
    """Train the teacher, then write ``pseudo_masks/refined/``; ends with ``Done(folder)``."""
    stop = stop or StopToken()
    device = device if isinstance(device, torch.device) else resolve_device(device or config.device)
    teacher = config.teacher_settings()
    if teacher is None:
        return
    trainer = SegmenterTrainer(run, replace(config, segmenter=teacher), patches, "teacher",
                               device, resume, val, folder=run.teacher_dir, stage=REFINED_MASKS)
    trainer.done_stage = REFINED_MASKS  # a stop ends this stage, not a segmenter's
    if not (yield from run_epochs(trainer, stop)):
        return
    del trainer
    predictor = load_predictor(run.teacher_dir / "model.pt", device, use_class_gate=False,
                               use_class_offsets=False)
    folder = run.pseudo_mask_dir(REFINED_TARGET)
    folder.mkdir(parents=True, exist_ok=True)
    changed = tissue = 0
    for index, old, new in relabelled_patches(predictor, patches, run.pseudo_mask_dir("final")):
        if stop.requested:
            yield Done(REFINED_MASKS, None, stopped=True)
            return
        kept = old != patches.spec.background_index
        changed += int((new != old)[kept].sum())
        tissue += int(kept.sum())
        write_palette_mask(folder / patches.paths[index].with_suffix(".png").name, new,
                           patches.spec)
    fraction = changed / max(tissue, 1)
    report: dict = {"relabelled_tissue_fraction": fraction}
    yield Message(REFINED_MASKS, f"the teacher relabelled {100 * fraction:.1f} % of the "
                  "training patches' tissue pixels")
    if val is not None:
        report["val_label_gated"] = label_gated_scores(predictor, val)
        yield Message(REFINED_MASKS, "teacher on val, restricted to each image's classes: mIoU "
                      f"{100 * report['val_label_gated']['miou']:.2f}")
    atomic_write_text(run.teacher_dir / TEACHER_REPORT, json.dumps(report, indent=2) + "\n")
    run.mark_complete(REFINED_MASKS, patches=len(patches),
                      relabelled=round(fraction, 4))
    yield Done(REFINED_MASKS, folder)


def relabelled_patches(predictor: SegmentationPredictor, patches: PatchSet, masks_folder
                       ) -> Generator[tuple[int, np.ndarray, np.ndarray], None, None]:
    """(index, old mask, new mask) per training patch: the teacher's prediction on the patch's
    stitched image (or the patch alone), restricted to the patch's labelled classes, with the
    old mask's background pixels kept."""
    def relabel(index: int, probabilities: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        old = read_mask(masks_folder / patches.paths[index].with_suffix(".png").name,
                        patches.spec)
        label = patches.labels[index].astype(bool)
        new = most_probable_of(probabilities, label if label.any() else None)
        background = old == patches.spec.background_index
        new[background] = old[background]
        return index, old, new

    stitched_indices = set()
    for stitched in stitch_patches(patches):
        _, canvas = predict_image(predictor, stitched.pixels)
        for placement in stitched.placements:
            stitched_indices.add(placement.index)
            yield relabel(placement.index, canvas[(slice(None), *placement.box)])
    for index in range(len(patches)):
        if index not in stitched_indices:
            yield relabel(index, predict_image(predictor, patches.image(index))[1])


def label_gated_scores(predictor: SegmentationPredictor, val: EvalSet) -> dict:
    """The predictor's val scores with each image restricted to the classes its mask holds:
    how good the labels it gives labelled patches are (the pseudo-mask report's protocol)."""
    matrix = ConfusionMatrix(predictor.num_classes)
    for index in range(len(val)):
        image, truth = val.pair(index)
        _, probabilities = predict_image(predictor, image)
        present = np.isin(np.arange(predictor.num_classes), np.unique(truth))
        matrix.update(most_probable_of(probabilities, present), truth)
    return matrix.scores(predictor.spec.class_names)


def most_probable_of(probabilities: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """(H, W) uint8: each pixel's most probable class among ``allowed`` (C,) bool, or among
    all classes where None."""
    if allowed is not None:
        probabilities = np.where(allowed[:, None, None], probabilities, -1.0)
    return probabilities.argmax(axis=0).astype(np.uint8)
