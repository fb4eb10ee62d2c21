"""Stage 2: train a segmenter on the run's pseudo-masks with a noise-suppression loss.

One job per strategy writes ``segmenter/<strategy>/``: ``model.pt`` (best validation mIoU when a
validation set is given, else the latest epoch), ``last.pt`` (weights, optimiser and position,
for resuming), ``losses.csv`` and ``metrics.json``. A stop request is honoured at the next
batch: ``last.pt`` records the position inside the epoch and ``model.pt`` is always usable.

Training inputs are square crops of side ``SegmenterConfig.input_size`` (None: the patches'
most common side), so that the segmenter learns tissue at the magnification it will predict;
patches are decoded once (``PatchSet`` cache) and batches are built in the main process.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..config.run_config import RunConfig, SegmenterConfig
from ..data.datasets import EvalSet, PatchSet, read_mask
from ..data.stain import hed_jitter
from ..data.stitching import windows_around_patches
from ..devices import resolve_device
from ..errors import ConfigError, DatasetError
from ..events import Event, Preview, StopToken
from ..inference.predict import (
    CLASS_OFFSETS_FILE,
    GATE_CHOICE_FILE,
    SegmentationPredictor,
    evaluate,
    json_ready,
    predict_image,
)
from ..models.ensemble import COMPANION_FOLDER
from ..models.segmenter import (
    SEGMENTER_KIND,
    Segmenter,
    build_segmenter,
    checkpoint_config,
    normalise,
)
from ..registry import Registry
from ..runs.checkpoints import load_checkpoint, save_checkpoint
from ..runs.locks import writes_run
from ..runs.outputs import atomic_write_text
from ..runs.run_dir import LossLog, RunDirectory
from ..runs.stages import segmenter_stage
from ..runs.status import METHOD_WITHOUT_CAMS
from ..training import distributed
from ..training.extension import extend_stage
from ..training.loop import EpochResult, EpochTrainer, run_epochs
from ..training.resume import load_resume_checkpoint, restore_average, resume_state
from ..training.sampling import SAMPLINGS, epoch_order
from ..training.schedules import SCHEDULES, set_lr
from ..training.state import TrainingState
from ..training.stepper import Stepper, channels_last
from .losses import IGNORE_INDEX, LossContext, LossTargets, build_loss
from .sparse_labels import (
    CORRECTION_PART,
    SparseLabels,
    append_corrections,
    override_targets,
    painted_on_patches,
    with_partial_cross_entropy,
)

#: MSV-ONSS's training pipeline (mmseg): rescale ratio range and PhotoMetricDistortion ranges.
ONSS_RESCALE = (0.75, 3.0)
#: ``histo_scale``: the rescale range, drawn log-uniformly so shrinking and enlarging are as likely.
HISTO_SCALE_RANGE = (0.8, 1.25)
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV hue units (0-180)
INIT_MISMATCH = "cannot fine-tune this segmenter: it does not fit the run's settings ({reason})"
RESUME_MISMATCH = ("cannot resume: it was trained with other settings ({reason}); train again "
                   "without resuming (--restart)")


#: Per-sample training augmentations by name (``SegmenterConfig.augment``).
SEGMENTER_AUGMENTATIONS: Registry = Registry("segmenter augmentation")


@writes_run("segmenter")
def train_segmenter(
    run: RunDirectory,
    config: RunConfig,
    patches: PatchSet,
    *,
    strategy: str | None = None,
    device: torch.device | str | None = None,
    stop: StopToken | None = None,
    resume: bool = True,
    val: EvalSet | None = None,
    corrections: Sequence[SparseLabels] = (),
    init_from: Path | None = None,
    preview: np.ndarray | None = None,
    more_epochs: int = 0,
    only: Sequence[int] | None = None,
) -> Generator[Event, None, None]:
    """Train ``config.segmenter`` on ``pseudo_masks/<targets>``; ends with ``Done(model.pt)``.

    ``strategy`` names the output folder (default: the loss name), so several losses can be
    compared on the same pseudo-masks. With ``val``, every epoch is scored and the best mIoU
    is kept as ``model.pt``. Under ``torchrun`` the ranks share every batch (docs/distributed.md).
    ``corrections`` (painted pixels, ``sparse_labels.py``) override the pseudo-masks and add a
    partial CE; ``init_from`` starts from a trained segmenter (a fine-tune, keeping its input
    size and normalisation); ``preview`` is an image whose prediction every epoch yields.
    ``more_epochs`` trains the finished ``strategy`` that many epochs longer
    (core/training/extension.py: the lr schedule's new tail, the weight average continues;
    with ``val``, ``model.pt`` stays the best epoch on validation, old or new).
    ``only`` trains on those patches alone, their context windows cut from all of them (a
    fine-tune's replay sample: a sample of patches rarely overlaps itself).
    """
    settings = config.segmenter
    device = device if isinstance(device, torch.device) else resolve_device(device or config.device)
    settings.validate()
    SAMPLINGS.check(settings.sampling)
    SCHEDULES.check(settings.schedule)
    SEGMENTER_AUGMENTATIONS.check(settings.augment)
    if len(patches) < 2:
        raise DatasetError("a segmenter needs at least 2 training patches",
                           patches.paths[0].parent if patches.paths else None)
    strategy, device = strategy or settings.loss, distributed.setup(device)
    if more_epochs:
        if strategy == METHOD_WITHOUT_CAMS:
            raise ConfigError("HisynSeg's two training rounds cannot be trained longer: "
                              "train a new run with more segmenter epochs")
        if not resume or init_from is not None or corrections:
            raise ConfigError("more epochs continue a trained segmenter as it is: they cannot "
                              "be combined with a restart, a fine-tune start or corrections")
        config = extend_stage(run, config, segmenter_stage(strategy),
                              run.segmenter_dir(strategy) / "last.pt", SEGMENTER_KIND,
                              more_epochs)
    stop = stop or StopToken()
    companion = settings.companion_settings()
    if companion is not None and not (more_epochs or corrections or init_from or only):
        partner = SegmenterTrainer(run, replace(config, segmenter=companion), patches, strategy,
                                   device, resume, val,
                                   folder=run.segmenter_dir(strategy) / COMPANION_FOLDER,
                                   stage=f"{segmenter_stage(strategy)} {COMPANION_FOLDER}")
        if not (yield from run_epochs(partner, stop)):
            return
        del partner  # its network and samples, before the next network's are built
    trainer = SegmenterTrainer(run, config, patches, strategy, device, resume, val, only)
    trainer.add_corrections(corrections, init_from, preview)
    yield from run_epochs(trainer, stop)


class SegmenterTrainer(EpochTrainer):
    """Stage 2's parts of the training loop: batches of augmented crops with their
    pseudo-masks, the strategy's loss, validation mIoU deciding ``model.pt``."""

    def __init__(self, run: RunDirectory, config: RunConfig, patches: PatchSet, strategy: str,
                 device: torch.device, resume: bool, val: EvalSet | None,
                 only: Sequence[int] | None = None, folder: Path | None = None,
                 stage: str | None = None):
        self.run, self.config, self.patches, self.val = run, config, patches, val
        self.settings = settings = config.segmenter
        self.strategy, self.device, self.spec = strategy, device, patches.spec
        self.stage = self.done_stage = segmenter_stage(strategy)
        if stage is not None:  # part of a longer job (a companion, a teacher): no Done of its own
            self.stage, self.final = stage, False
        self.epochs = config.stage_epochs(self.stage, settings.epochs)
        self.loss_fn = build_loss(settings)
        patches.decode_all()
        self.only = only
        #: The training patches and their masks per target, what the samples are cut from
        #: (corrections are painted here first).
        self.source_patches = patches
        self.patch_targets = read_pseudo_masks(run, settings.targets, patches)
        self.patches, self.targets = self._samples(patches, self.patch_targets)
        self.folder = folder or run.segmenter_dir(strategy)
        self.last_path, self.model_path = self.folder / "last.pt", self.folder / "model.pt"
        if distributed.is_main_process():
            self._clear_outputs(resume)
        distributed.barrier()

        torch.manual_seed(config.seed)
        self.model = build_segmenter(settings, self.spec.num_classes)
        if settings.encoder_init == "classifier" and not self.last_path.is_file():
            start_from_classifier(self.model, run)  # a resumed run loads its own weights
        self.model = self.model.to(device)
        self.side = input_side(settings.input_size, patches, self.model.input_multiple)
        if settings.context:  # crops of the windows, never larger than most of them
            self.side = min(self.side, input_side(None, self.patches,
                                                  self.model.input_multiple))
        self.mean, self.std = measured_input_statistics(settings.normalise, patches)
        optimizer = build_segmenter_optimizer(self.model, settings)
        self.state = TrainingState()
        if self.last_path.is_file():
            payload = load_resume_checkpoint(self.last_path, kind=SEGMENTER_KIND)
            self.state = resume_state(payload, self.last_path, self.model, optimizer,
                                      RESUME_MISMATCH)
        self.saved_config = checkpoint_config(config, strategy, self.side, settings.normalise,
                                              self.mean, self.std)
        self.batch_size = min(settings.batch_size, len(self.patches))
        if self.batch_size < 2:
            raise ConfigError("the segmenter batch size must be at least 2 (BatchNorm)")
        self.batches_per_epoch = len(self.patches) // self.batch_size
        part_names = [*self.loss_fn.part_names,
                      *(["aux"] if self.model.aux_head is not None else [])]
        self.log = LossLog(self.folder / "losses.csv",
                           ["epoch", "step", "train_loss", *part_names, "lr", "val_miou",
                            "val_fwiou", "val_dice", "seconds"]
                           ) if distributed.is_main_process() else None
        self.stepper = Stepper(self.model, optimizer, device, self.loss_fn.name,
                               average_decay=average_decay(
                                   settings.weight_average,
                                   self.epochs * self.batches_per_epoch),
                               precision=config.train_precision)
        if self.last_path.is_file():
            restore_average(self.stepper, payload, self.last_path)
        self.context = LossContext(self.spec.num_classes, total_epochs=self.epochs)
        self.best_scores: dict | None = None
        self.painted: list[np.ndarray] | None = None
        self.preview: np.ndarray | None = None

    def _samples(self, patches: PatchSet, targets: list[list[np.ndarray]]
                 ) -> tuple[PatchSet, list[list[np.ndarray]]]:
        """What the loop cuts crops from: each patch (or, with ``context``, the window around
        it in its stitched image) with its masks per target, the ``only`` ones if given."""
        if self.settings.context:
            patches, targets = windows_around_patches(patches, targets, self.settings.context,
                                                      IGNORE_INDEX)
        if self.only is not None:
            patches = patches.subset(self.only)
            targets = [[masks[i] for i in self.only] for masks in targets]
        return patches, targets

    def add_corrections(self, corrections: Sequence[SparseLabels], init_from: Path | None,
                        preview: np.ndarray | None) -> None:
        """Train on painted pixels too, from ``init_from``'s weights unless resuming."""
        self.preview = preview
        if init_from is not None:
            payload = load_checkpoint(init_from, kind=SEGMENTER_KIND)
            saved = payload["config"]
            self.side = saved["input_size"]
            self.mean = tuple(saved["normalisation"]["mean"])
            self.std = tuple(saved["normalisation"]["std"])
            self.saved_config = checkpoint_config(self.config, self.strategy, self.side,
                                                  self.settings.normalise, self.mean, self.std)
            if self.state.step == 0:
                resume_state({**payload, "optimizer_state": None}, init_from, self.model,
                             self.stepper.optimizer, INIT_MISMATCH)
                self.state = TrainingState()
        if corrections:
            patches = self.source_patches
            painted, others = painted_on_patches(patches, corrections,
                                                 spread=bool(self.settings.context))
            samples, (*targets, painted) = self._samples(
                patches, [*override_targets(self.patch_targets, painted), painted])
            self.patches, self.targets, self.painted = append_corrections(
                samples, targets, painted, others)
            self.batch_size = min(self.settings.batch_size, len(self.patches))
            self.batches_per_epoch = len(self.patches) // self.batch_size
            if self.log is not None and not self.log.rows():  # a new log: add the column
                fields = [*self.log.fields]
                fields.insert(fields.index("lr"), CORRECTION_PART)
                self.log.path.unlink()
                self.log = LossLog(self.log.path, fields)
        if self.state.step == 0 and (corrections or init_from is not None):
            # Nothing trained yet: average from the starting weights, over this run's length.
            self.stepper.average_decay = average_decay(
                self.settings.weight_average, self.epochs * self.batches_per_epoch)
            self.stepper.restart_average()

    def _clear_outputs(self, resume: bool) -> None:
        if not resume:
            for name in ("last.pt", "model.pt", "losses.csv", "metrics.json"):
                (self.folder / name).unlink(missing_ok=True)
        self.run.mark_incomplete(self.stage)
        for choice in (GATE_CHOICE_FILE, CLASS_OFFSETS_FILE):  # made for the replaced model
            (self.folder / choice).unlink(missing_ok=True)

    def begin_epoch(self, epoch: int, first_batch: int) -> None:
        self.context.epoch = epoch
        self.order = epoch_order(self.patches.labels, self.settings.sampling, self.config.seed,
                                 epoch)
        torch.manual_seed(self.config.seed + 7919 * (epoch * self.batches_per_epoch
                                                     + first_batch))
        self.last_batch = None

    def set_lr(self, epoch: int, index: int) -> float:
        settings = self.settings
        return set_lr(self.stepper.optimizer, settings.schedule,
                      epoch * self.batches_per_epoch + index,
                      self.epochs * self.batches_per_epoch, settings.min_lr)

    def step(self, model, epoch: int, index: int) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's share of the batch; every sample's augmentation has its own seed (its
        place in the epoch), so a resumed or distributed run draws the same crops."""
        positions = distributed.shard(np.arange(index * self.batch_size,
                                                (index + 1) * self.batch_size))
        chosen = self.order[positions]
        rngs = [np.random.default_rng([self.config.seed, epoch, int(p)]) for p in positions]
        images, masks = make_batch(self.patches, self.targets, chosen, self.side,
                                   self.settings.augment, rngs, self.painted,
                                   mosaic=self.settings.mosaic)
        painted = None if self.painted is None else masks.pop()
        x = channels_last(normalise(torch.from_numpy(images).to(self.device), self.mean,
                                    self.std))
        targets = LossTargets(
            [torch.from_numpy(m).to(self.device, torch.int64) for m in masks],
            torch.from_numpy(self.patches.labels[chosen]).to(self.device, torch.float32))
        passes = [model(x) for _ in range(self.loss_fn.num_passes)]
        result = self.loss_fn(passes, targets, self.context)  # CE, softmax run in float32
        if painted is not None:
            result = with_partial_cross_entropy(result, passes[0].logits, torch.from_numpy(
                painted).to(self.device, torch.int64), self.spec.background_index)
        self.last_batch = images, masks, result
        return result.loss, result.parts

    def end_epoch(self, epoch: int, train_loss: float, parts: dict[str, float],
                  lr: float) -> EpochResult:
        state, events = self.state, []
        if self.last_batch is not None and self.last_batch[2].pixel_weight is not None:
            images, masks, result = self.last_batch
            events.append(Preview(self.stage, "pixel_weight", {
                "image": images[0], "pseudo_mask": masks[0][0],
                "weight": result.pixel_weight[0].float().cpu().numpy()}))
        scores = None
        predictor = SegmentationPredictor(self.stepper.kept_model, self.spec, mean=self.mean,
                                          std=self.std, input_size=self.side)
        if self.val is not None and distributed.is_main_process():
            scores = evaluate(predictor, self.val)
        if self.preview is not None and distributed.is_main_process():
            events.append(Preview(self.stage, "prediction",
                                  {"labels": predict_image(predictor, self.preview)[0]}))
        miou = scores["miou"] if scores else float("nan")
        improved = bool(np.isfinite(miou)) and (
            state.best_miou is None or miou > state.best_miou)
        if improved:
            state.best_miou, state.best_epoch = miou, epoch + 1
        metrics = {k: scores[k] for k in ("miou", "fwiou", "dice")} if scores else {}
        state.history.append({"epoch": epoch + 1, "train_loss": train_loss, "lr": lr,
                              **metrics})
        self.best_scores = scores if improved else None
        # Without a (usable) validation score, model.pt follows the latest epoch.
        return EpochResult(metrics, keep=improved or state.best_miou is None, best=improved,
                           events=events)

    def save(self, path: Path, with_optimizer: bool, stopped: bool = False) -> None:
        optimizer = self.stepper.optimizer
        average = self.stepper.average
        # model.pt holds the weights to predict with; last.pt the ones training continues from.
        model = self.model if with_optimizer else self.stepper.kept_model
        save_checkpoint(path, kind=SEGMENTER_KIND, state_dict=model.state_dict(),
                        config=self.saved_config, spec=self.spec, training=self.state.to_dict(),
                        optimizer_state=optimizer.state_dict() if with_optimizer else None,
                        average_state=average.state_dict() if with_optimizer and average
                        else None)

    def record(self, epoch: int, train_loss: float, parts: dict[str, float], lr: float,
               result: EpochResult) -> None:
        state = self.state
        self.log.append(epoch=epoch + 1, step=state.step, train_loss=f"{train_loss:.6f}",
                        lr=f"{lr:.6g}", seconds=f"{state.seconds:.1f}",
                        **{name: f"{value:.6f}" for name, value in parts.items()},
                        **{f"val_{k}": f"{v:.6f}" for k, v in result.metrics.items()})
        write_metrics(self.folder, self.strategy, self.settings, state, self.side, self.device,
                      self.best_scores)

    def finish(self) -> Path:
        self.run.mark_complete(self.stage, epochs=self.state.epoch,
                               best_epoch=self.state.best_epoch,
                               best_val_miou=self.state.best_miou)
        return self.model_path


# --------------------------------------------------------------------------------------------
# Inputs


def read_pseudo_masks(run: RunDirectory, targets: Sequence[str],
                      patches: PatchSet) -> list[list[np.ndarray]]:
    """The pseudo-masks of every patch, per target folder (named like the patches, .png)."""
    result = []
    for target in targets:
        folder = run.pseudo_mask_dir(target)
        if not folder.is_dir():
            raise DatasetError(
                f"no pseudo-masks '{target}' in this run (the segmenter reads "
                f"{', '.join(targets)}): create them with `histo-wsss pseudo-masks RUN_DIR`",
                folder,
            )
        masks = []
        for index, path in enumerate(patches.paths):
            mask_path = folder / path.with_suffix(".png").name
            if not mask_path.is_file():
                raise DatasetError(
                    f"no pseudo-mask for training patch {path.name}: the pseudo-masks do not "
                    "match the patches; run `histo-wsss pseudo-masks RUN_DIR` again",
                    folder,
                )
            mask = read_mask(mask_path, patches.spec)
            height, width = patches.image(index).shape[:2]
            if mask.shape != (height, width):
                raise DatasetError(
                    f"pseudo-mask is {mask.shape[1]}x{mask.shape[0]} but patch {path.name} is "
                    f"{width}x{height}",
                    mask_path,
                )
            masks.append(mask)
        result.append(masks)
    return result


def start_from_classifier(model: Segmenter, run: RunDirectory) -> None:
    """Copy the run's stage-1 backbone into the segmenter's encoder."""
    path = run.classifier_checkpoint
    if not path.is_file():
        raise DatasetError("encoder_init 'classifier' needs the run's trained classifier: "
                           "train it first (`histo-wsss train-classifier RUN_DIR`)", path)
    payload = load_checkpoint(path, kind="classifier")
    model.load_classifier_backbone(payload["state_dict"], path)


def input_side(input_size: int | None, patches: PatchSet, multiple: int) -> int:
    """The training crop side: ``input_size`` or the most common patch side, rounded down to
    a multiple of the encoder's stride."""
    if input_size is None:
        sides = Counter(min(patches.image(i).shape[:2]) for i in range(len(patches)))
        input_size = sides.most_common(1)[0][0]
    return max(multiple, input_size // multiple * multiple)


def measured_input_statistics(mode: str, patches: PatchSet) -> tuple[tuple, tuple]:
    """(mean, std) on the 0-255 scale; unlike ``models.classifier.input_statistics`` (the
    published figures only), ``dataset`` statistics are measured on the training patches when
    the dataset description has none."""
    from ..models.classifier import input_statistics as known_statistics

    spec = patches.spec
    if mode != "dataset" or (spec.mean is not None and spec.std is not None):
        return known_statistics(mode, spec)
    pixels = np.concatenate([patches.image(i).reshape(-1, 3) for i in range(len(patches))])
    return (tuple(float(v) for v in pixels.mean(axis=0)),
            tuple(float(v) for v in pixels.std(axis=0)))


# --------------------------------------------------------------------------------------------
# Augmentation


def make_batch(patches: PatchSet, targets: list[list[np.ndarray]], indices, side: int,
               augment: str, rngs: Sequence[np.random.Generator],
               painted: list[np.ndarray] | None = None, mosaic: float = 0.0
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8 images (N, side, side, 3) and one (N, side, side) mask array per target; each
    sample draws from its own generator. With ``painted`` (per patch, ``IGNORE_INDEX`` where
    unpainted) the painted labels are the last target returned, and an image larger than the
    crop is first cut to a window holding one of its painted pixels. With probability
    ``mosaic`` a sample (without ``painted``) is a 2 x 2 mosaic (``mosaic_sample``)."""
    images, masks = [], []
    for index, rng in zip(indices, rngs, strict=True):
        if painted is None and mosaic > 0 and side % 2 == 0 and rng.random() < mosaic:
            image, sample_masks = mosaic_sample(patches, targets, index, side, augment, rng)
            images.append(image)
            masks.append(sample_masks)
            continue
        image = patches.image(index)
        sample_targets = [target[index] for target in targets]
        if painted is not None:
            image, sample_targets = around_painted(image, [*sample_targets, painted[index]],
                                                   side, rng)
        image, sample_masks = augment_sample(image, sample_targets, side, augment, rng)
        images.append(image)
        masks.append(sample_masks)
    return np.stack(images), [np.stack(per_target) for per_target in zip(*masks, strict=True)]


def mosaic_sample(patches: PatchSet, targets: list[list[np.ndarray]], index: int, side: int,
                  augment: str, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Four augmented ``side / 2`` crops tiled 2 x 2: patch ``index`` and three drawn at
    random, each with its own masks, at the patches' magnification.

    A class whose patches are all single-label (WSSS4LUAD's "normal": 16 patches, never
    labelled with another class) otherwise never meets other tissue in one input, where
    inference sees it beside tumour and stroma."""
    half = side // 2
    chosen = [int(index), *(int(i) for i in rng.integers(len(patches), size=3))]
    parts = [augment_sample(patches.image(i), [target[i] for target in targets], half,
                            augment, rng) for i in chosen]

    def tiled(quarters: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.concatenate(quarters[:2], axis=1),
                               np.concatenate(quarters[2:], axis=1)], axis=0)

    image = tiled([image for image, _ in parts])
    masks = [tiled([part_masks[k] for _, part_masks in parts]) for k in range(len(targets))]
    return image, masks


def around_painted(image: np.ndarray, masks: list[np.ndarray], side: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """A ``side`` window of a larger image placed so that a painted pixel (a random one of the
    last mask's) lies inside it at a random position; unchanged without painted pixels.

    A corrected val image or slide region is several crops large: a random crop would miss
    a few strokes most of the time, and the fine-tune would hardly see what the user drew."""
    height, width = image.shape[:2]
    painted = np.flatnonzero(masks[-1] != IGNORE_INDEX)
    if len(painted) == 0 or (height <= side and width <= side):
        return image, masks
    row, col = np.unravel_index(int(painted[rng.integers(len(painted))]), (height, width))
    top = int(np.clip(row - rng.integers(side), 0, max(height - side, 0)))
    left = int(np.clip(col - rng.integers(side), 0, max(width - side, 0)))
    window = (slice(top, top + side), slice(left, left + side))
    return image[window], [mask[window] for mask in masks]


def augment_sample(image: np.ndarray, masks: list[np.ndarray], side: int, augment: str,
                   rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """One training sample at ``side`` x ``side`` by the augmentation called ``augment``."""
    image, masks = SEGMENTER_AUGMENTATIONS.get(augment)(image, masks, side, rng)
    return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in masks]


def _random_horizontal_flip(image: np.ndarray, masks: list[np.ndarray],
                            rng: np.random.Generator):
    if rng.random() < 0.5:
        return image[:, ::-1], [m[:, ::-1] for m in masks]
    return image, masks


@SEGMENTER_AUGMENTATIONS.register("flip_blur")
def flip_blur_augmentation(image: np.ndarray, masks: list[np.ndarray], side: int,
                           rng: np.random.Generator):
    """MLPS, ARML, ESFAN: crop (resize up if smaller), horizontal flip p 0.5, Gaussian blur
    p 0.5 with radius U(0, 1)."""
    image, masks = _crop(image, masks, side, rng, pad=False)
    image, masks = _random_horizontal_flip(image, masks, rng)
    if rng.random() < 0.5:
        radius = rng.uniform(0.0, 1.0)
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    return image, masks


@SEGMENTER_AUGMENTATIONS.register("histo")
def histo_augmentation(image: np.ndarray, masks: list[np.ndarray], side: int,
                       rng: np.random.Generator):
    """Crop, one of the 8 symmetries of the square (tissue has no up or right), H&E stain
    jitter (core/data/stain.py) and the recipes' light blur, p 0.5."""
    image, masks = _crop(image, masks, side, rng, pad=False)
    turns, flip = int(rng.integers(4)), rng.random() < 0.5
    image, masks = np.rot90(image, turns), [np.rot90(m, turns) for m in masks]
    if flip:
        image, masks = image[:, ::-1], [m[:, ::-1] for m in masks]
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # a writable copy
    image = hed_jitter(pixels, generator)[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
    if rng.random() < 0.5:
        radius = rng.uniform(0.0, 1.0)
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    return image, masks


@SEGMENTER_AUGMENTATIONS.register("histo_scale")
def histo_scale_augmentation(image: np.ndarray, masks: list[np.ndarray], side: int,
                             rng: np.random.Generator):
    """``histo`` after a rescale by a log-uniform factor in ``HISTO_SCALE_RANGE``: a trained
    segmenter is brittle to magnification (docs/results.md), and slides and patches are never
    at exactly the same microns per pixel. Shrunk images are padded with ignore."""
    low, high = np.log(HISTO_SCALE_RANGE)
    ratio = float(np.exp(rng.uniform(low, high)))
    height, width = image.shape[:2]
    image, masks = _resize(image, masks, (max(1, round(height * ratio)),
                                          max(1, round(width * ratio))))
    if min(image.shape[:2]) < side:
        image, masks = _crop(image, masks, side, rng, pad=True)
    return histo_augmentation(image, masks, side, rng)


@SEGMENTER_AUGMENTATIONS.register("onss")
def onss_augmentation(image: np.ndarray, masks: list[np.ndarray], side: int,
                      rng: np.random.Generator):
    """MSV: rescale by U(0.75, 3), crop with 255 (ignore) padding, flip, photometric
    distortion."""
    ratio = rng.uniform(*ONSS_RESCALE)
    height, width = image.shape[:2]
    image, masks = _resize(image, masks, (round(height * ratio), round(width * ratio)))
    image, masks = _crop(image, masks, side, rng, pad=True)
    image, masks = _random_horizontal_flip(image, masks, rng)
    return photometric_distortion(image, rng), masks


def _resize(image: np.ndarray, masks: list[np.ndarray], size: tuple[int, int]):
    height, width = size
    if (height, width) == image.shape[:2]:
        return image, masks
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return resized, [np.asarray(Image.fromarray(m).resize((width, height), Image.NEAREST))
                     for m in masks]


def _crop(image: np.ndarray, masks: list[np.ndarray], side: int, rng: np.random.Generator,
          pad: bool):
    """A random ``side`` square; smaller images are padded (0 / ignore) or resized up."""
    height, width = image.shape[:2]
    if height < side or width < side:
        if pad:
            extra = ((0, max(side - height, 0)), (0, max(side - width, 0)))
            image = np.pad(image, (*extra, (0, 0)))
            masks = [np.pad(m, extra, constant_values=IGNORE_INDEX) for m in masks]
        else:
            scale = side / min(height, width)
            image, masks = _resize(image, masks, (max(side, round(height * scale)),
                                                  max(side, round(width * scale))))
        height, width = image.shape[:2]
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    window = (slice(top, top + side), slice(left, left + side))
    return image[window], [m[window] for m in masks]


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: brightness, contrast (before or after), saturation, hue,
    each with probability 0.5."""
    from skimage.color import hsv2rgb, rgb2hsv

    pixels = image.astype(np.float32)
    if rng.random() < 0.5:
        pixels = np.clip(pixels + rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA), 0, 255)
    contrast_first = rng.random() < 0.5

    def contrast(values: np.ndarray) -> np.ndarray:
        if rng.random() < 0.5:
            return np.clip(values * rng.uniform(*CONTRAST_RANGE), 0, 255)
        return values

    if contrast_first:
        pixels = contrast(pixels)
    change_saturation, change_hue = rng.random() < 0.5, rng.random() < 0.5
    if change_saturation or change_hue:
        hsv = rgb2hsv(pixels / 255.0)
        if change_saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*SATURATION_RANGE), 0, 1)
        if change_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-HUE_DELTA, HUE_DELTA) / 180.0) % 1.0
        pixels = hsv2rgb(hsv) * 255.0
    if not contrast_first:
        pixels = contrast(pixels)
    return np.clip(pixels, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Optimisation and outputs


def average_decay(decay: float | None, total_steps: int) -> float | None:
    """The weight average's decay, lowered so that it spans at most a quarter of the run
    (1 / (1 - decay) <= steps / 4): with 0.99 a 40-step demo run would still hold two thirds
    of its random start; 12 epochs of 557 patches (408 steps) keep 0.99."""
    if not decay:
        return None
    return min(decay, 1 - 4 / max(total_steps, 8))


def build_segmenter_optimizer(model: Segmenter, settings: SegmenterConfig) -> torch.optim.Optimizer:
    """Encoder at ``lr``, decoder and heads at ``lr * head_lr_mult`` (MLPS: 10x)."""
    encoder, heads = model.parameter_groups()
    groups = [{"params": encoder, "base_lr": settings.lr},
              {"params": heads, "base_lr": settings.lr * settings.head_lr_mult}]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ConfigError(f"unknown optimizer '{settings.optimizer}': use sgd or adamw")


def write_metrics(folder: Path, strategy: str, settings: SegmenterConfig, state: TrainingState,
                  side: int, device: torch.device, best_scores: dict | None,
                  **extra: Any) -> None:
    """metrics.json: the history and the best validation scores (kept across epochs);
    ``extra`` adds a trainer's own figures (HisynSeg's rounds)."""
    path = folder / "metrics.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    metrics = {
        "strategy": strategy,
        "loss": settings.loss,
        "arch": settings.arch,
        "encoder": settings.encoder,
        "input_size": side,
        "device": str(device),
        "epochs": state.epoch,
        "train_seconds": round(state.seconds, 1),
        "best_epoch": state.best_epoch,
        "best_val": best_scores if best_scores is not None else previous.get("best_val"),
        "history": state.history,
        **extra,
    }
    atomic_write_text(path, json.dumps(json_ready(metrics), indent=2) + "\n")
