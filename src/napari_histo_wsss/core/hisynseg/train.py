"""HisynSeg: a segmenter trained on synthetic images with exact masks, then on its own masks.

There is no CAM stage (docs/algorithms.md 5). The job runs, each part resumable:

1. Synthesis: per type (Mosaic, Bezier) a discriminator learns real multi-label patches vs
   unfiltered synthetic images, then keeps new synthetic images it takes for real
   (``hisynseg/<type>.npz``, ``hisynseg/synthesis.json``, ``hisynseg/examples/``).
2. Round 1: DeepLabV3+ with the CAM head; every step one synthetic batch (Dice + BCE on GAP(K))
   and one real batch (BCE on GAP(K) + L1 consistency between softmax(S) and softmax(K)).
3. Pseudo-masks of every real patch from the best round-1 model with D4 TTA; classes absent
   from the patch label are suppressed, single-label patches get a constant mask
   (``pseudo_masks/hisynseg/``).
4. Round 2 (self-training): a fresh model on the real patches with those masks plus the
   synthetic images (Dice + BCE, no consistency).

``segmenter/hisynseg/`` has the layout of ``train_segmenter``: ``model.pt`` (best validation mIoU
over both rounds, else the last epoch), ``round1.pt`` (the round-1 model the pseudo-masks come
from), ``last.pt`` (resume position), ``losses.csv`` and ``metrics.json``. AdamW with a constant
lr as released; the run's ``segmenter`` settings (epochs per round, batch size) apply.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config.run_config import HisynSegConfig, RunConfig
from ..data.datasets import EvalSet, PatchSet, write_palette_mask
from ..devices import resolve_device
from ..errors import ConfigError, DatasetError
from ..events import Batch, Done, Event, Message, Preview, Started, StopToken
from ..inference.predict import SegmentationPredictor, evaluate
from ..models.segmenter import (
    SEGMENTER_KIND,
    Segmenter,
    SegmenterOutput,
    build_segmenter,
    load_segmenter,
    normalise,
)
from ..runs.checkpoints import save_checkpoint
from ..runs.locks import writes_run
from ..runs.run_dir import LossLog, RunDirectory
from ..stage1.pseudo_masks import white_background
from ..stage2.losses import (
    LossContext,
    LossTargets,
    build_loss,
    consistency_loss,
    image_classification_loss,
)
from ..stage2.train_segmenter import (
    RESUME_MISMATCH,
    build_segmenter_optimizer,
    input_side,
    measured_input_statistics,
    read_pseudo_masks,
    write_metrics,
)
from ..training import distributed
from ..training.loop import EpochResult, EpochTrainer, run_epochs
from ..training.resume import load_resume_checkpoint, resume_state
from ..training.schedules import set_lr
from ..training.state import TrainingState
from ..training.stepper import Stepper, channels_last
from .discriminator import (
    FilterReport,
    filter_synthetic,
    record_filter_outcome,
    train_discriminator,
    update_synthesis_record,
)
from .synthesis import (
    SYNTHESIS_TYPES,
    BlobShape,
    Synthesizer,
    SyntheticPool,
    mask_labels,
    shift_scale_rotate,
    synthesize_pool,
)

STRATEGY = "hisynseg"
STAGE = f"segmenter:{STRATEGY}"
PSEUDO_MASKS = "hisynseg"  # folder under pseudo_masks/
#: Training augmentation (both rounds, real and synthetic alike): RandomResizedCrop area range,
#: then H and V flips and albumentations' default ShiftScaleRotate, each with p 0.5.
CROP_AREA = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
SSR_SCALE_LIMIT = 0.1
AUGMENT_P = 0.5
_PART_NAMES = ("dice", "bce", "bce_real", "consistency")


@writes_run("hisynseg")
def train_hisynseg(
    run: RunDirectory,
    config: RunConfig,
    patches: PatchSet,
    *,
    device: torch.device | str | None = None,
    stop: StopToken | None = None,
    resume: bool = True,
    val: EvalSet | None = None,
) -> Generator[Event, None, None]:
    """Synthesis, filter, round 1, pseudo-masks, round 2; ends with ``Done(model.pt)``.

    With ``val`` every epoch is scored and the best mIoU over both rounds is kept.
    """
    config.validate()
    if distributed.launched_by_torchrun():
        raise ConfigError("HisynSeg does not run under torchrun (its synthesis and pseudo-masks "
                          "are single-process): train it without torchrun")
    job = _HisynSegJob(run, config, patches, device, stop or StopToken(), resume, val)
    yield from job.run()


class _HisynSegJob:
    """The state one HisynSeg run shares between its parts."""

    def __init__(self, run, config, patches, device, stop, resume, val):
        self.run_dir, self.config, self.patches = run, config, patches
        self.settings = config.segmenter
        self.recipe = config.hisynseg or HisynSegConfig()
        self.spec = patches.spec
        self.device = device if isinstance(device, torch.device) \
            else resolve_device(device or config.device)
        self.stop, self.resume, self.val = stop, resume, val
        self.folder = run.segmenter_dir(STRATEGY)
        self.synthesis_dir = run.root / "hisynseg"
        self.last_path = self.folder / "last.pt"
        self.model_path = self.folder / "model.pt"
        self.round1_path = self.folder / "round1.pt"
        self.state = TrainingState(extra={"round": 1, "best_round": None,
                                          "round1_best_miou": None})

    # -- the job ----------------------------------------------------------------------------------
    def run(self) -> Generator[Event, None, None]:
        self.prepare()
        model = self.fresh_model()
        self.side = input_side(self.settings.input_size, self.patches, model.input_multiple)
        self.mean, self.std = measured_input_statistics(self.settings.normalise, self.patches)
        self.batch_size = min(self.settings.batch_size, len(self.patches))
        if self.batch_size < 2:
            raise ConfigError("the segmenter batch size must be at least 2 (BatchNorm)")
        self.loss_fn = build_loss(self.settings)
        self.log = LossLog(self.folder / "losses.csv",
                           ["round", "epoch", "step", "train_loss", *_PART_NAMES, "lr",
                            "val_miou", "val_fwiou", "val_dice", "seconds"])
        synthesizer = Synthesizer(self.patches, self.side, BlobShape(
            self.recipe.bezier_points, self.recipe.bezier_rad, self.recipe.bezier_edgy))
        synthetic = yield from self.synthesis(synthesizer)
        if synthetic is None:
            yield Done(STAGE, None, stopped=True)
            return

        optimizer = build_segmenter_optimizer(model, self.settings)
        if self.last_path.is_file():
            payload = load_resume_checkpoint(self.last_path, kind=SEGMENTER_KIND)
            self.state = resume_state(payload, self.last_path, model, optimizer,
                                      RESUME_MISMATCH)
        if self.state.extra["round"] == 1:
            round_one = _RoundOne(self, model, optimizer, synthetic)
            if not (yield from run_epochs(round_one, self.stop)) or round_one.final:
                return
            if (yield from self.pseudo_masks(synthesizer)) is None:
                yield Done(STAGE, self.model_path, stopped=True)
                return
            self.state.epoch, self.state.batch = 0, 0
            self.state.extra["round"] = 2
            model = self.fresh_model()
            optimizer = build_segmenter_optimizer(model, self.settings)
        masks = read_pseudo_masks(self.run_dir, [PSEUDO_MASKS], self.patches)[0]
        yield from run_epochs(_RoundTwo(self, model, optimizer, synthetic, masks), self.stop)

    def prepare(self) -> None:
        """Check the recipe, decode the patches, forget earlier outputs unless resuming."""
        if not self.settings.cam_head:
            raise ConfigError("HisynSeg needs the segmenter's CAM head: set segmenter.cam_head")
        if len(self.patches) < 2:
            raise DatasetError("HisynSeg needs at least 2 training patches",
                               self.patches.paths[0].parent if self.patches.paths else None)
        self.patches.decode_all()
        if not self.resume:
            for path in (self.last_path, self.model_path, self.round1_path,
                         self.folder / "losses.csv", self.folder / "metrics.json",
                         self.synthesis_dir / "synthesis.json",
                         *(self.synthesis_dir / f"{kind}.npz" for kind in SYNTHESIS_TYPES)):
                path.unlink(missing_ok=True)
        self.run_dir.mark_incomplete(STAGE)

    def fresh_model(self) -> Segmenter:
        """A segmenter from ImageNet weights, seeded per round (round 2 starts afresh)."""
        torch.manual_seed(self.config.seed + 1000 * (self.state.extra["round"] - 1))
        return build_segmenter(self.settings, self.spec.num_classes).to(self.device)

    def synthesis(self, synthesizer: Synthesizer
                  ) -> Generator[Event, None, SyntheticPool | None]:
        """Both types' filtered images in one pool; None when stopped."""
        update_synthesis_record(self.synthesis_dir, "single_label_sources", {
            name: len(synthesizer.sources.get(c, []))
            for c, name in enumerate(self.spec.class_names)})
        missing = synthesizer.missing_classes_message()
        if missing:
            yield Message(STAGE, missing)
        pools = []
        for kind in SYNTHESIS_TYPES:
            pools.append((yield from self.synthetic_pool(synthesizer, kind)))
            if self.stop.requested:
                return None
        return SyntheticPool(np.concatenate([p.images for p in pools]),
                             np.concatenate([p.masks for p in pools]))

    # -- 1. synthesis and filter ------------------------------------------------------------------
    def synthetic_pool(self, synthesizer: Synthesizer,
                       kind: str) -> Generator[Event, None, SyntheticPool | None]:
        """The filtered images of one type: reused from the run when already made."""
        path = self.synthesis_dir / f"{kind}.npz"
        target = self.recipe.images_per_type
        if path.is_file():
            pool = SyntheticPool.load(path)
            if len(pool) == target and pool.images.shape[1] == self.side:
                return pool
        stage = f"hisynseg:{kind}"
        rng = np.random.default_rng([self.config.seed, SYNTHESIS_TYPES.index(kind)])
        multi_label = np.flatnonzero(self.patches.labels.sum(axis=1) > 1)
        if not len(multi_label):
            yield Message(stage, f"no multi-label training patch to train the real-vs-"
                                 f"synthetic filter on: {kind} images are kept unfiltered")
            pool = synthesize_pool(synthesizer, kind, target, rng)
            report = FilterReport(kind, target, attempts=target, accepted=target, topped_up=0,
                                  threshold=0.0, mean_p_real_accepted=None,
                                  mean_p_real_rejected=None)
            figures = {"skipped": "no multi-label real patch"}
        else:
            unfiltered = synthesize_pool(synthesizer, kind, self.recipe.discriminator_images, rng)
            discriminator, figures = yield from train_discriminator(
                [self.patches.image(i) for i in multi_label], unfiltered,
                arch=self.recipe.discriminator_arch, epochs=self.recipe.discriminator_epochs,
                batch_size=self.recipe.discriminator_batch_size, device=self.device, rng=rng,
                stop=self.stop, stage=f"{stage}:discriminator")
            if self.stop.requested:
                return None
            pool, report = yield from filter_synthetic(
                synthesizer, kind, discriminator, target, rng,
                threshold=self.recipe.accept_threshold, stop=self.stop,
                stage=f"{stage}:filter")
            if self.stop.requested:
                return None
        record_filter_outcome(self.synthesis_dir, report, pool, self.spec,
                              discriminator=figures)
        pool.save(path)
        yield Message(stage, (
            f"{kind}: kept {len(pool)} images; {report.accepted} of {report.attempts} drawn "
            f"passed the filter ({100 * report.acceptance_rate:.1f} %)"))
        yield Preview(stage, f"synthetic_{kind}", {"image": pool.images[0],
                                                   "mask": pool.masks[0]})
        return pool

    # -- 3. pseudo-masks --------------------------------------------------------------------------
    def pseudo_masks(self, synthesizer: Synthesizer
                     ) -> Generator[Event, None, list[np.ndarray] | None]:
        """Round-1 masks of every real patch (D4 TTA, gated by the patch label), written as
        palette PNGs; single-label patches are their class (white glass as background)."""
        stage = "hisynseg:pseudo-masks"
        model, _ = load_segmenter(self.round1_path, self.device)
        predictor = SegmentationPredictor(model, self.spec, mean=self.mean, std=self.std,
                                          input_size=self.side, tta="d4")
        folder = self.run_dir.pseudo_mask_dir(PSEUDO_MASKS)
        groups = _same_shape_batches(self.patches, self.batch_size)
        yield Started(stage, total_epochs=1, batches_per_epoch=len(groups))
        masks: list[np.ndarray | None] = [None] * len(self.patches)
        for number, group in enumerate(groups):
            if self.stop.requested:
                return None
            labels = self.patches.labels[group].astype(bool)
            single = labels.sum(axis=1) == 1
            predicted = [i for i, one in zip(group, single, strict=True) if not one]
            if predicted:
                probabilities = predictor.predict_batch(
                    np.stack([self.patches.image(i) for i in predicted]))
                present = self.patches.labels[predicted].astype(bool)
                present[~present.any(axis=1)] = True  # an empty label gates nothing
                probabilities[~present] = -1.0
                for i, mask in zip(predicted, probabilities.argmax(axis=1), strict=True):
                    masks[i] = self._with_background(self.patches.image(i), mask)
            for i in np.asarray(group)[single]:
                masks[i] = synthesizer.source(int(i))[1]
            for i in group:
                write_palette_mask(folder / self.patches.paths[i].with_suffix(".png").name,
                                   masks[i], self.spec)
            yield Batch(stage, 1, number, len(groups))
        multi_label = np.flatnonzero(self.patches.labels.sum(axis=1) > 1)
        shown = int(multi_label[0]) if len(multi_label) else 0
        yield Preview(stage, "pseudo_mask", {"image": self.patches.image(shown),
                                             "pseudo_mask": masks[shown]})
        return masks

    def _with_background(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        mask = mask.astype(np.uint8)
        if self.spec.white_plane:
            mask[white_background(image, self.spec.white_threshold,
                                  self.spec.white_min_size)] = self.spec.background_index
        return mask

    # -- outputs ----------------------------------------------------------------------------------
    def save(self, path: Path, model: Segmenter, optimizer) -> None:
        """A checkpoint ``load_predictor`` reads like any other segmenter's."""
        config = {"run": self.config.to_dict(), "strategy": STRATEGY, "input_size": self.side,
                  "normalisation": {"name": self.settings.normalise, "mean": list(self.mean),
                                    "std": list(self.std)}}
        save_checkpoint(path, kind=SEGMENTER_KIND, state_dict=model.state_dict(), config=config,
                        spec=self.spec, training=self.state.to_dict(),
                        optimizer_state=optimizer.state_dict() if optimizer else None)


class _Round(EpochTrainer):
    """A HisynSeg training round on the loop: the job's state, checkpoints and logs; the best
    validation mIoU over both rounds is ``model.pt``, round 1's best is ``round1.pt``."""

    done_stage = STAGE

    def __init__(self, job: _HisynSegJob, number: int, model: Segmenter, optimizer,
                 steps: int):
        if steps < 1:
            raise ConfigError(f"batch size {job.batch_size} exceeds the training set")
        self.job, self.number, self.model = job, number, model
        self.stage = f"hisynseg:round-{number}"
        self.epochs, self.batches_per_epoch = job.settings.epochs, steps
        self.state = job.state
        self.stepper = Stepper(model, optimizer, job.device, "HisynSeg",
                               precision=job.config.train_precision)
        self.last_path, self.model_path = job.last_path, job.model_path
        self.final = number == 2 or not job.recipe.self_training
        self.context = LossContext(job.spec.num_classes, total_epochs=job.settings.epochs)

    def begin_epoch(self, epoch: int, first_batch: int) -> None:
        seed = self.job.config.seed
        self.rng = np.random.default_rng([seed, self.number, epoch, first_batch])
        torch.manual_seed(seed + 7919 * (epoch * self.batches_per_epoch + first_batch))

    def set_lr(self, epoch: int, index: int) -> float:
        settings, steps = self.job.settings, self.batches_per_epoch
        return set_lr(self.stepper.optimizer, settings.schedule, epoch * steps + index,
                      settings.epochs * steps, settings.min_lr)

    def forward(self, model, images: list[np.ndarray]) -> SegmenterOutput:
        x = normalise(torch.from_numpy(np.stack(images)).to(self.job.device), self.job.mean,
                      self.job.std)
        return model(channels_last(x))

    def targets(self, masks: np.ndarray, labels) -> LossTargets:
        device = self.job.device
        return LossTargets([torch.from_numpy(masks).to(device, torch.int64)],
                           torch.from_numpy(np.stack(labels)).to(device, torch.float32))

    def end_epoch(self, epoch: int, train_loss: float, parts: dict[str, float],
                  lr: float) -> EpochResult:
        """Score on val and keep the best (of both rounds, and of round 1)."""
        job, state, extra = self.job, self.state, self.state.extra
        scores = None
        if job.val is not None:
            predictor = SegmentationPredictor(self.model, job.spec, mean=job.mean, std=job.std,
                                              input_size=job.side)
            scores = evaluate(predictor, job.val)
        is_best = scores is not None and (
            state.best_miou is None or scores["miou"] > state.best_miou)
        if is_best:
            state.best_miou, state.best_epoch = scores["miou"], epoch + 1
            extra["best_round"] = self.number
        self.best_of_round_one = self.number == 1 and (
            scores is None or extra["round1_best_miou"] is None
            or scores["miou"] > extra["round1_best_miou"])
        if self.best_of_round_one and scores is not None:
            extra["round1_best_miou"] = scores["miou"]
        metrics = {k: scores[k] for k in ("miou", "fwiou", "dice")} if scores else {}
        state.history.append({"round": self.number, "epoch": epoch + 1,
                              "train_loss": train_loss, **parts, "lr": lr, **metrics})
        self.best_scores = scores if is_best else None
        return EpochResult(metrics, keep=scores is None or is_best, best=is_best)

    def save(self, path: Path, with_optimizer: bool, stopped: bool = False) -> None:
        self.job.save(path, self.model, self.stepper.optimizer if with_optimizer else None)

    def record(self, epoch: int, train_loss: float, parts: dict[str, float], lr: float,
               result: EpochResult) -> None:
        job, state = self.job, self.state
        if self.best_of_round_one:
            job.save(job.round1_path, self.model, None)
        job.log.append(round=self.number, epoch=epoch + 1, step=state.step,
                       train_loss=f"{train_loss:.6f}", lr=f"{lr:.6g}",
                       seconds=f"{state.seconds:.1f}",
                       **{name: f"{value:.6f}" for name, value in parts.items()},
                       **{f"val_{k}": f"{v:.6f}" for k, v in result.metrics.items()})
        write_metrics(job.folder, STRATEGY, job.settings, state, job.side, job.device,
                      self.best_scores, rounds=state.extra["round"],
                      best_round=state.extra["best_round"])

    def finish(self) -> Path:
        state = self.state
        self.job.run_dir.mark_complete(STAGE, rounds=state.extra["round"],
                                       best_round=state.extra["best_round"],
                                       best_epoch=state.best_epoch,
                                       best_val_miou=state.best_miou)
        return self.model_path


class _RoundOne(_Round):
    """Every step a synthetic batch (Dice + BCE on GAP(K)) and a real batch (BCE on GAP(K) +
    L1 consistency); an epoch is one pass over the longer set, the shorter one cycles."""

    def __init__(self, job: _HisynSegJob, model: Segmenter, optimizer,
                 synthetic: SyntheticPool):
        self.synthetic = synthetic
        steps = max(len(job.patches), len(synthetic)) // job.batch_size
        super().__init__(job, 1, model, optimizer, steps)

    def begin_epoch(self, epoch: int, first_batch: int) -> None:
        super().begin_epoch(epoch, first_batch)
        self.orders = _epoch_orders(self.job.config.seed, 1, epoch,
                                    self.batches_per_epoch * self.job.batch_size,
                                    len(self.synthetic), len(self.job.patches))

    def step(self, model, epoch: int, index: int) -> tuple[torch.Tensor, dict[str, float]]:
        job, size, rng, synthetic = self.job, self.job.batch_size, self.rng, self.synthetic
        chosen_synthetic = self.orders[0][index * size:(index + 1) * size]
        chosen_real = self.orders[1][index * size:(index + 1) * size]
        pairs = [hisynseg_augment(synthetic.images[j], synthetic.masks[j], job.side, rng)
                 for j in chosen_synthetic]
        real = [hisynseg_augment(job.patches.image(i), None, job.side, rng)[0] for i in chosen_real]
        output = self.forward(model, [image for image, _ in pairs] + real)
        count = len(pairs)
        masks = np.stack([mask for _, mask in pairs])
        supervised = job.loss_fn(
            [SegmenterOutput(output.logits[:count], cam=output.cam[:count])],
            self.targets(masks, [mask_labels(m, job.spec.num_classes) for m in masks]),
            self.context)
        labels = torch.from_numpy(job.patches.labels[chosen_real]).to(job.device)
        bce_real = image_classification_loss(output.image_logits[count:], labels)
        consistency = consistency_loss(output.logits[count:], output.cam[count:])
        loss = supervised.loss + bce_real + job.recipe.consistency_weight * consistency
        return loss, {**supervised.parts, "bce_real": float(bce_real.detach()),
                      "consistency": float(consistency.detach())}


class _RoundTwo(_Round):
    """Self-training: batches from the real patches with their round-1 pseudo-masks and the
    synthetic images together; Dice + BCE only."""

    def __init__(self, job: _HisynSegJob, model: Segmenter, optimizer,
                 synthetic: SyntheticPool, pseudo_masks: list[np.ndarray]):
        self.synthetic, self.pseudo_masks = synthetic, pseudo_masks
        steps = (len(job.patches) + len(synthetic)) // job.batch_size
        super().__init__(job, 2, model, optimizer, steps)

    def begin_epoch(self, epoch: int, first_batch: int) -> None:
        super().begin_epoch(epoch, first_batch)
        self.order = _epoch_orders(self.job.config.seed, 2, epoch,
                                   self.batches_per_epoch * self.job.batch_size,
                                   len(self.job.patches) + len(self.synthetic))[0]

    def step(self, model, epoch: int, index: int) -> tuple[torch.Tensor, dict[str, float]]:
        job, size = self.job, self.job.batch_size
        real_count = len(job.patches)
        images, masks, labels = [], [], []
        for item in self.order[index * size:(index + 1) * size]:
            if item < real_count:
                image, mask = hisynseg_augment(job.patches.image(item), self.pseudo_masks[item],
                                      job.side, self.rng)
                label = job.patches.labels[item]
            else:
                image, mask = hisynseg_augment(self.synthetic.images[item - real_count],
                                      self.synthetic.masks[item - real_count], job.side,
                                      self.rng)
                label = mask_labels(mask, job.spec.num_classes)
            images.append(image)
            masks.append(mask)
            labels.append(label)
        output = self.forward(model, images)
        result = job.loss_fn([output], self.targets(np.stack(masks), labels), self.context)
        return result.loss, result.parts


def _epoch_orders(seed: int, round_number: int, epoch: int, length: int,
                  *counts: int) -> list[np.ndarray]:
    """Per set, ``length`` indices: shuffled passes over the set, as many as needed (the
    shorter set of a round cycles). The same for a given epoch, so a resumed epoch continues."""
    rng = np.random.default_rng([seed, round_number, epoch, 104729])
    orders = []
    for count in counts:
        passes = -(-length // count)
        orders.append(np.concatenate([rng.permutation(count) for _ in range(passes)])[:length])
    return orders


def _same_shape_batches(patches: PatchSet, batch_size: int) -> list[list[int]]:
    """Patch indices in batches of one image shape (patch sets may mix sizes)."""
    by_shape: dict[tuple, list[int]] = {}
    for index in range(len(patches)):
        by_shape.setdefault(patches.image(index).shape, []).append(index)
    return [indices[start:start + batch_size] for indices in by_shape.values()
            for start in range(0, len(indices), batch_size)]


def hisynseg_augment(image: np.ndarray, mask: np.ndarray | None, side: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """HisynSeg's training augmentation at ``side`` x ``side``: a random resized crop of 90-100 %
    of the area, H and V flips and a shift-scale-rotate (p 0.5 each), the same on the mask.
    The released OpticalDistortion (p 0.5, a mild barrel warp) is left out."""
    image, mask = _random_resized_crop(image, mask, side, rng)
    for axis in (1, 0):
        if rng.random() < AUGMENT_P:
            image = np.flip(image, axis)
            mask = None if mask is None else np.flip(mask, axis)
    image, mask = shift_scale_rotate(image, mask, rng, scale_limit=SSR_SCALE_LIMIT,
                                     probability=AUGMENT_P)
    return np.ascontiguousarray(image), None if mask is None else np.ascontiguousarray(mask)


def _random_resized_crop(image, mask, side: int, rng: np.random.Generator):
    height, width = image.shape[:2]
    for _ in range(10):
        area = height * width * rng.uniform(*CROP_AREA)
        ratio = np.exp(rng.uniform(*np.log(CROP_RATIO)))
        crop_w, crop_h = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            break
    crop_h, crop_w = min(crop_h, height), min(crop_w, width)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image[window])).resize(
        (side, side), Image.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask[window])).resize(
            (side, side), Image.NEAREST))
    return image, mask
