"""Fine-tune a run's segmenter on its pseudo-masks plus the user's corrections.

The job starts from ``segmenter/<strategy>/model.pt`` and writes ``segmenter/<strategy>-
corrections/`` (the original stays as it was, so the two can be compared). It trains on the
corrected images and a seeded replay sample of ordinary training patches (``replay`` patches
per corrected image, as the run trained on them: a recipe's context windows are cut from all
patches before the sample is drawn), so a handful of corrections takes a minute on a CPU
instead of a full epoch over every patch, while the replay keeps the model from forgetting the
rest. Painted pixels override the pseudo-mask and add a partial cross-entropy
(``stage2/sparse_labels.py``); an image that is no training patch trains its unpainted pixels
towards the starting model's own prediction. It is resumable like any stage: same folder,
``last.pt``. Where the recipe fits class offsets, the fine-tuned model's are refitted on the
corrected images at the end (``calibrate``): what the strokes teach about the class balance
reaches every image, which the fine-tune alone hardly does.
"""

from __future__ import annotations

import shutil
from collections.abc import Generator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..config.run_config import RunConfig
from ..data.datasets import EvalSet, PatchSet
from ..errors import CheckpointError, DatasetError
from ..events import Done, Event, Message, StopToken
from ..inference.calibration import MIN_CLASS_IMAGES, describe_offsets
from ..inference.predict import (
    CLASS_OFFSETS_FILE,
    GATE_CHOICE_FILE,
    SegmentationPredictor,
    load_predictor,
    predict_image,
)
from ..models.ensemble import COMPANION_FOLDER, companion_checkpoint
from ..runs.run_dir import RunDirectory
from ..stage2.losses import IGNORE_INDEX
from ..stage2.sparse_labels import SparseLabels
from ..stage2.train_segmenter import train_segmenter
from .calibrate import calibrate_with_corrections
from .recipe import FINETUNE_EPOCHS, FINETUNE_LR_SCALE, REPLAY_PER_IMAGE
from .store import UNLABELLED, Correction, CorrectionStore, correction_pixels

SUFFIX = "-corrections"


def corrected_strategy(strategy: str) -> str:
    return strategy if strategy.endswith(SUFFIX) else f"{strategy}{SUFFIX}"


def finetune_with_corrections(
    run: RunDirectory, config: RunConfig, patches: PatchSet, *, strategy: str | None = None,
    corrections: Sequence[Correction] | None = None, epochs: int = FINETUNE_EPOCHS,
    replay: int = REPLAY_PER_IMAGE, device=None, stop: StopToken | None = None,
    resume: bool = True, val: EvalSet | None = None, preview: np.ndarray | None = None,
    calibration_set: EvalSet | None = None,
) -> Generator[Event, None, None]:
    """Fine-tune ``segmenter/<strategy>`` on ``corrections`` (default: the run's store);
    ends with ``Done(segmenter/<strategy>-corrections/model.pt)``. Where the recipe fits
    class offsets they are refitted on the corrected images, with ``calibration_set``'s
    masks where given (``val`` instead validates every epoch)."""
    base = strategy or config.segmenter.loss
    start = run.segmenter_checkpoint(base)
    if not start.is_file():
        raise CheckpointError(f"no trained segmenter '{base}' to fine-tune: train it first "
                              "(`histo-wsss train-segmenter RUN_DIR`)", start)
    if corrections is None:
        corrections = CorrectionStore(run.root, patches.spec).load_all()
    if not corrections:
        raise DatasetError("no corrections in this run: paint some in napari or import "
                           "them with `histo-wsss corrections import`", run.root / "corrections")
    predictor = load_predictor(start, device or config.device, tta="none",
                               use_class_gate=False, use_class_offsets=False)
    sparse = [sparse_labels(c, patches.spec.background_index, predictor, patches)
              for c in corrections]
    chosen = replay_patches(patches, sparse, replay, config.seed)
    settings = replace(config.segmenter, epochs=epochs,
                       lr=config.segmenter.lr * FINETUNE_LR_SCALE)
    config = replace(config, segmenter=settings)
    folder = run.segmenter_dir(corrected_strategy(base))
    inherit_companion(start, folder)
    for event in train_segmenter(run, config, patches, only=chosen,
                                 strategy=corrected_strategy(base), device=device, stop=stop,
                                 resume=resume, val=val, corrections=sparse, init_from=start,
                                 preview=preview):
        if isinstance(event, Done) and not event.stopped:
            inherit_val_choices(start, folder)  # the trainer clears them when it starts
            if settings.fit_class_offsets:
                line = calibration_line(run, corrected_strategy(base), corrections,
                                        calibration_set, device or config.device)
                yield Message(event.stage, line)
        yield event


def calibration_line(run: RunDirectory, strategy: str, corrections: Sequence[Correction],
                     calibration_set: EvalSet | None, device) -> str:
    """Refit the fine-tuned strategy's class offsets on the corrections (``calibrate``)."""
    record = calibrate_with_corrections(run, strategy, corrections, calibration_set, device)
    if record is None:
        return (f"class offsets as before the corrections: refitting them needs a class "
                f"seen in {MIN_CLASS_IMAGES} corrected (or val) images or more")
    return describe_offsets(record)


def inherit_companion(start: Path, folder: Path) -> None:
    """The fine-tune moves the strategy's own network; its companion network (where the
    recipe has one) is copied unchanged, so the corrected strategy predicts as a pair."""
    companion = companion_checkpoint(start)
    if companion is not None:
        (folder / COMPANION_FOLDER).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(companion, folder / COMPANION_FOLDER / "model.pt")


def inherit_val_choices(start: Path, folder: Path) -> None:
    """The choices made on val for the base (class gate, class offsets), copied to the
    fine-tuned model: it predicts as its base does, without the gate where val dropped it."""
    for choice in (GATE_CHOICE_FILE, CLASS_OFFSETS_FILE):
        if (start.parent / choice).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(start.parent / choice, folder / choice)


def replay_patches(patches: PatchSet, sparse: Sequence[SparseLabels], per_image: int,
                   seed: int) -> list[int]:
    """Indices of the corrected training patches and a seeded sample of the others."""
    corrected = {Path(s.path).resolve() for s in sparse}
    own = [i for i, p in enumerate(patches.paths) if p.resolve() in corrected]
    others = [i for i in range(len(patches)) if i not in set(own)]
    count = min(len(others), max(per_image * len(sparse), 2))
    drawn = np.random.default_rng([seed, 4177]).choice(others, size=count, replace=False)
    return sorted([*own, *drawn.tolist()])


def sparse_labels(correction: Correction, background_index: int,
                  predictor: SegmentationPredictor | None, patches: PatchSet) -> SparseLabels:
    """A correction as the trainer's input: its image pixels, painted classes in mask values
    (255 unpainted), and for an image that is no training patch the model's prediction."""
    image = correction_pixels(correction)
    labels = np.where(correction.labels == UNLABELLED, IGNORE_INDEX,
                      correction.labels.astype(np.int16) - 1).astype(np.uint8)
    if labels.shape != image.shape[:2]:
        labels = np.asarray(Image.fromarray(labels).resize(image.shape[1::-1], Image.NEAREST))
    is_patch = Path(correction.image) in {p.resolve() for p in patches.paths}
    pseudo = None
    if predictor is not None and not is_patch:
        pseudo = predict_image(predictor, image)[0]
    return SparseLabels(Path(correction.image), image, labels, pseudo)
