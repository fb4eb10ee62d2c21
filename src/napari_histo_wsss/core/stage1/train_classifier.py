"""Stage-1 training: the multi-label CAM classifier on patch labels (docs/algorithms.md 1.1-4.1).

Multi-label soft-margin loss (plus ESFAN's weighted side-head losses), SGD with the released
four parameter groups (pretrained weights lr, pretrained biases 2 lr without decay, new weights
``new_layer_lr_mult`` lr, new biases twice that without decay) and a per-step poly schedule.

Momentum is ``ClassifierConfig.momentum`` (0.9 by default), not the released optimiser's
accidental 5e-4: the papers' 20 epochs of ~800 steps can do without it, a CPU schedule of a
few hundred steps cannot.

Every random draw (shuffling, crops, flips, blur, jitter, dropout) comes from a seed derived
from (run seed, epoch, step), so a run stopped at any batch and resumed ends with exactly the
weights of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config.run_config import ClassifierConfig, RunConfig
from ..data.classes import DatasetSpec
from ..data.datasets import EvalSet
from ..data.stain import hed_jitter
from ..errors import CheckpointError, ConfigError, DatasetError
from ..events import Done, Event, Message, StopToken
from ..models.classifier import CamClassifier, ClassifierOutput, build_classifier, load_classifier
from ..registry import Registry
from ..runs.checkpoints import check_same_classes, save_checkpoint
from ..runs.locks import writes_run
from ..runs.run_dir import LossLog, RunDirectory
from ..training import distributed
from ..training.extension import extend_stage, may_extend
from ..training.loop import EpochResult, EpochTrainer, run_epochs
from ..training.resume import RESTART_HINT, load_resume_checkpoint, resume_state
from ..training.schedules import set_lr
from ..training.state import TrainingState
from ..training.stepper import Stepper, channels_last
from . import classifier_choice

STAGE = "classifier"
LOSS_FIELDS = ["epoch", "train_loss", "lr", "seconds"]


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, epoch, step)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------------------------
# Inputs


def training_size(config: ClassifierConfig, shapes: list[tuple[int, ...]]) -> int:
    """The configured input side, or the most common patch side when it is None."""
    if config.input_size is not None:
        return config.input_size
    return Counter(min(shape[:2]) for shape in shapes).most_common(1)[0][0]


def fit_to_size(image: np.ndarray, size: int, generator: torch.Generator) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float on 0-255: random crop, resizing up first when
    the patch is smaller (the scale of typical patches is kept)."""
    tensor = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)
    height, width = tensor.shape[1:]
    if min(height, width) < size:
        factor = size / min(height, width)
        height, width = max(size, round(height * factor)), max(size, round(width * factor))
        tensor = F.interpolate(tensor[None], size=(height, width), mode="bilinear",
                               align_corners=False)[0]
    top = int(torch.randint(height - size + 1, (1,), generator=generator))
    left = int(torch.randint(width - size + 1, (1,), generator=generator))
    return tensor[:, top:top + size, left:left + size]


def _flip(x: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    chosen = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(chosen.to(x.device)[:, None, None, None], x.flip(dim), x)


def _gaussian_blur3(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """3x3 Gaussian blur with sigma ~ U(0.1, 2) per image (ARML)."""
    sigma = 0.1 + 1.9 * torch.rand(x.shape[0], generator=generator).to(x.device)
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0], device=x.device)[None] / (2 * sigma[:, None]
                                                                            ** 2))
    taps = taps / taps.sum(dim=1, keepdim=True)
    kernels = taps[:, :, None] * taps[:, None, :]  # (N, 3, 3)
    n, channels, height, width = x.shape
    weight = kernels.repeat_interleave(channels, dim=0)[:, None]  # (N*C, 1, 3, 3)
    padded = F.pad(x.reshape(1, n * channels, height, width), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, weight, groups=n * channels).reshape(n, channels, height, width)


def _brightness_contrast(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Colour jitter: brightness and contrast factors ~ U(0.5, 1.5) per image (ARML)."""
    n = x.shape[0]
    brightness = (0.5 + torch.rand(n, generator=generator)).to(x.device)[:, None, None, None]
    contrast = (0.5 + torch.rand(n, generator=generator)).to(x.device)[:, None, None, None]
    x = (x * brightness).clamp(0, 255)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2))
    return ((x - gray[:, None, None, None]) * contrast + gray[:, None, None, None]).clamp(0, 255)


#: Batch augmentations on 0-255 floats by name (``ClassifierConfig.augment``).
CLASSIFIER_AUGMENTATIONS: Registry = Registry("classifier augmentation")


@CLASSIFIER_AUGMENTATIONS.register("flips")
def flips_augmentation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Horizontal and vertical flips, p 0.5 each."""
    return _flip(_flip(x, 3, generator), 2, generator)


@CLASSIFIER_AUGMENTATIONS.register("arml")
def arml_augmentation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ARML: H flip, 3x3 blur, V flip, brightness/contrast jitter 0.5."""
    x = _gaussian_blur3(_flip(x, 3, generator), generator)
    return _brightness_contrast(_flip(x, 2, generator), generator)


@CLASSIFIER_AUGMENTATIONS.register("histo")
def histo_augmentation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Tissue has no up or right: flips and quarter turns (the 8 symmetries of the square,
    on square inputs), then per-image H&E stain jitter (core/data/stain.py)."""
    x = _flip(_flip(x, 3, generator), 2, generator)
    if x.shape[2] == x.shape[3]:
        turned = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(turned.to(x.device)[:, None, None, None], x.transpose(2, 3), x)
    return hed_jitter(x, generator)


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """The batch augmentation called ``mode``."""
    return CLASSIFIER_AUGMENTATIONS.get(mode)(x, generator)


# --------------------------------------------------------------------------------------------
# Optimisation


def build_classifier_optimizer(model: CamClassifier, config: ClassifierConfig) -> torch.optim.SGD:
    """SGD with the released four groups; ``base_lr`` per group drives the poly schedule."""
    lr, mult = config.lr, config.new_layer_lr_mult
    pretrained, new = model.pretrained_parameters(), model.new_parameters()
    groups = [
        {"params": [p for p in pretrained if p.ndim > 1], "lr": lr,
         "weight_decay": config.weight_decay},
        {"params": [p for p in pretrained if p.ndim <= 1], "lr": 2 * lr, "weight_decay": 0.0},
        {"params": [p for p in new if p.ndim > 1], "lr": mult * lr,
         "weight_decay": config.weight_decay},
        {"params": [p for p in new if p.ndim <= 1], "lr": 2 * mult * lr, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)


def classification_loss(output: ClassifierOutput, targets: torch.Tensor,
                        config: ClassifierConfig) -> torch.Tensor:
    """Multi-label soft margin on the main head; with side heads, the weighted sum
    ``side_loss_weights`` (side heads shallow first, main head last)."""
    heads = [*output.side_logits, output.logits]
    weights = config.side_loss_weights or (1.0,)
    if len(weights) != len(heads):
        raise ConfigError(f"side_loss_weights {list(weights)} need {len(heads)} entries")
    return sum(w * F.multilabel_soft_margin_loss(z.float(), targets)
               for w, z in zip(weights, heads, strict=True))


# --------------------------------------------------------------------------------------------
# The job


def _check_dataset(patches, config: RunConfig) -> DatasetSpec:
    spec = patches.spec
    if len(patches) == 0:
        raise DatasetError("no training patches")
    if patches.labels.ndim != 2 or patches.labels.shape[1] != spec.num_classes:
        raise DatasetError(
            f"patch labels have {patches.labels.shape[-1]} entries but the dataset has "
            f"{spec.num_classes} classes ({', '.join(spec.class_names)})",
            patches.paths[0].parent,
        )
    run_classes = config.dataset.get("class_names") if config.dataset else None
    if run_classes and tuple(run_classes) != spec.class_names:
        raise DatasetError(f"the run was set up for classes {list(run_classes)}, but these "
                           f"patches have {list(spec.class_names)}", patches.paths[0].parent)
    return spec


def _same_settings(payload: dict, config: RunConfig) -> bool:
    """Same classifier settings and seed, and the same epochs unless a finished run is being
    trained longer (core/training/extension.py)."""
    def canonical(value):
        return json.loads(json.dumps(value))

    saved = payload["config"]
    saved_epochs = (saved.get("extended_epochs") or {}).get(
        STAGE, (saved.get("classifier") or {}).get("epochs"))
    # Settings added since the checkpoint was written take their defaults (the behaviour it
    # was trained with), so a run stopped under an older version still resumes.
    saved_settings = {**dataclasses.asdict(ClassifierConfig()), **(saved.get("classifier") or {})}
    return (canonical(saved_settings) == canonical(config.to_dict()["classifier"])
            and saved.get("seed") == config.seed
            and may_extend(saved_epochs, bool(payload["training"].get("finished")),
                           config.stage_epochs(STAGE, config.classifier.epochs)))


@writes_run(STAGE)
def train_classifier(run: RunDirectory, config: RunConfig, patches, *, device: torch.device,
                     stop: StopToken | None = None, resume: bool = True, more_epochs: int = 0,
                     val: EvalSet | None = None) -> Generator[Event, None, None]:
    """Train the stage-1 classifier of ``run``; ends with ``Done(result=classifier/model.pt)``.

    A stop request is honoured before the next batch: ``model.pt`` (usable) and ``last.pt``
    (with optimiser state) are saved and ``Done(stopped=True)`` is yielded. With ``resume``,
    training continues from ``classifier/last.pt`` when it exists. Under ``torchrun`` the
    ranks share every batch (docs/distributed.md). ``more_epochs`` trains a finished
    classifier that many epochs longer (core/training/extension.py: the lr schedule's new
    tail, and the pseudo-masks made from the old classifier need making again). With
    ``ClassifierConfig.candidates`` over 1 and ``val`` masks, that many classifiers are
    trained and the one whose gated val pseudo-masks score best is kept (``classifier_choice``).
    """
    config.classifier.validate()
    spec = _check_dataset(patches, config)
    device = distributed.setup(device)
    if config.classifier.candidates > 1:
        if more_epochs:
            raise ConfigError("this run keeps the best of several classifiers, which cannot "
                              "be trained longer one by one: start a new run with more "
                              "classifier epochs", run.root)
        if val is not None:
            yield from _train_candidates(run, config, patches, spec, val, device,
                                         stop or StopToken(), resume)
            return
        yield Message(STAGE, "no val masks to choose among classifiers: training one")
    if more_epochs:
        if not resume:
            raise ConfigError("more epochs continue the trained classifier: they cannot be "
                              "combined with a restart from scratch")
        config = extend_stage(run, config, STAGE, run.classifier_dir / "last.pt", STAGE,
                              more_epochs)
    trainer = ClassifierTrainer(run, config, patches, spec, device, resume)
    yield from run_epochs(trainer, stop or StopToken())


class ClassifierTrainer(EpochTrainer):
    """Stage 1's parts of the training loop: seeded crops and augmentations per step, the
    multi-label loss, a poly lr per step; ``model.pt`` follows every epoch (and a stop)."""

    stage = done_stage = STAGE
    save_model_on_stop = True

    def __init__(self, run: RunDirectory, config: RunConfig, patches, spec: DatasetSpec,
                 device: torch.device, resume: bool):
        self.run, self.config, self.patches, self.spec = run, config, patches, spec
        self.settings = settings = config.classifier
        self.device = device
        patches.decode_all()
        count = len(patches)
        self.batch_size = max(1, min(settings.batch_size, count))
        self.epochs = config.stage_epochs(STAGE, settings.epochs)
        self.batches_per_epoch = count // self.batch_size
        self.total_steps = self.batches_per_epoch * self.epochs
        self.size = training_size(settings, [patches.image(i).shape for i in range(count)])

        torch.manual_seed(config.seed)
        self.model = build_classifier(settings, spec.num_classes, spec).to(device)
        optimizer = build_classifier_optimizer(self.model, settings)
        self.last_path, self.model_path = run.classifier_dir / "last.pt", run.classifier_checkpoint
        self.state = TrainingState()
        if resume and self.last_path.is_file():
            self.state = _restore(self.last_path, self.model, optimizer, spec, config)
        if distributed.is_main_process():
            if not (resume and self.last_path.is_file()):
                self.last_path.unlink(missing_ok=True)
            if self.state.step == 0:
                (run.classifier_dir / "losses.csv").unlink(missing_ok=True)
            self.log = LossLog(run.classifier_dir / "losses.csv", LOSS_FIELDS)
            run.mark_incomplete(STAGE)
        self.stepper = Stepper(self.model, optimizer, device, "classification",
                               precision=config.train_precision)
        self.labels = torch.from_numpy(patches.labels.astype(np.float32))

    def begin_epoch(self, epoch: int, first_batch: int) -> None:
        self.order = torch.randperm(len(self.patches), generator=torch.Generator().manual_seed(
            derived_seed(self.config.seed, epoch)))

    def set_lr(self, epoch: int, index: int) -> float:
        step = epoch * self.batches_per_epoch + index
        warmup_steps = round(self.settings.warmup_epochs * self.batches_per_epoch)
        ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return set_lr(self.stepper.optimizer, "poly", step, self.total_steps, ramp=ramp)

    def step(self, model, epoch: int, index: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Every random draw of the step comes from (seed, epoch, step), so a resumed run
        repeats an uninterrupted one exactly; this rank takes its share of the batch."""
        positions = distributed.shard(np.arange(index * self.batch_size,
                                                (index + 1) * self.batch_size))
        chosen = self.order[torch.from_numpy(positions)]
        step_seed = derived_seed(self.config.seed, epoch, index + 1)
        generator = torch.Generator().manual_seed(step_seed)
        torch.manual_seed(step_seed)  # dropout
        x = torch.stack([fit_to_size(self.patches.image(int(i)), self.size, generator)
                         for i in chosen])
        x = self.model.normalise(augment_batch(x.to(self.device), self.settings.augment, generator))
        output = model(channels_last(x), epoch=epoch)
        return classification_loss(output, self.labels[chosen].to(self.device),
                                   self.settings), {}

    def end_epoch(self, epoch: int, train_loss: float, parts: dict[str, float],
                  lr: float) -> EpochResult:
        self.state.history.append({"epoch": epoch + 1, "train_loss": train_loss, "lr": lr})
        return EpochResult()

    def save(self, path: Path, with_optimizer: bool, stopped: bool = False) -> None:
        """The state plus provenance: schedule, input size, seed, finished or stopped."""
        state = self.state
        training = {**state.to_dict(), "total_steps": self.total_steps,
                    "steps_per_epoch": self.batches_per_epoch, "batch_size": self.batch_size,
                    "input_size": self.size, "seed": self.config.seed,
                    "epoch_losses": [entry["train_loss"] for entry in state.history],
                    "finished": state.step >= self.total_steps, "stopped": stopped}
        optimizer = self.stepper.optimizer.state_dict() if with_optimizer else None
        save_checkpoint(path, kind="classifier", state_dict=self.model.state_dict(),
                        config=self.config.to_dict(), spec=self.spec, training=training,
                        optimizer_state=optimizer)

    def record(self, epoch: int, train_loss: float, parts: dict[str, float], lr: float,
               result: EpochResult) -> None:
        self.log.append(epoch=epoch + 1, train_loss=f"{train_loss:.6f}", lr=f"{lr:.6g}",
                        seconds=round(self.state.seconds, 2))

    def finish(self) -> Path:
        self.run.mark_complete(STAGE, epochs=self.epochs, steps=self.total_steps,
                               seconds=round(self.state.seconds, 2))
        return self.model_path


def _restore(path: Path, model: CamClassifier, optimizer: torch.optim.Optimizer,
             spec: DatasetSpec, config: RunConfig) -> TrainingState:
    """Load ``last.pt`` into the model and optimiser; the state to continue from."""
    payload = load_resume_checkpoint(path, kind="classifier")
    check_same_classes(payload, spec, path)
    if not _same_settings(payload, config):
        raise CheckpointError(
            "was trained with other classifier settings, seed or epochs; resuming would mix "
            f"two schedules: start a new run directory, or {RESTART_HINT} (a finished "
            "classifier can be trained longer with more epochs)", path)
    return resume_state(payload, path, model, optimizer, "does not fit this classifier ({reason})")


def _train_candidates(run: RunDirectory, config: RunConfig, patches, spec: DatasetSpec,
                      val: EvalSet, device: torch.device, stop: StopToken, resume: bool
                      ) -> Generator[Event, None, None]:
    """Train each candidate in its own folder (each resumes on its own), judge each by its
    gated val pseudo-masks, and copy the best to ``classifier/`` (the main process judges and
    writes; under ``torchrun`` every rank trains every candidate)."""
    count = config.classifier.candidates
    main = distributed.is_main_process()
    folders = [classifier_choice.candidate_run(run, index) for index in range(count)]
    if main:
        run.mark_incomplete(STAGE)
        for folder in folders if not resume else []:
            folder.mark_incomplete(STAGE)
    scores = []
    for index, folder in enumerate(folders):
        seed = classifier_choice.candidate_seed(config.seed, index)
        if not folder.is_complete(STAGE):
            yield Message(STAGE, f"classifier {index + 1} of {count} (seed {seed})")
            trainer = ClassifierTrainer(folder, dataclasses.replace(config, seed=seed),
                                        patches, spec, device, resume)
            if not (yield from _without_done(run_epochs(trainer, stop))):
                yield Done(STAGE, run.classifier_checkpoint, stopped=True)
                return
        if main:
            scores.append(_judge_candidate(folder, seed, config, spec, val, device))
            yield Message(STAGE, f"classifier {index + 1} (seed {seed}): val pseudo-masks "
                          f"under its gate {scores[-1]['gated_pm_miou']:.1%} mIoU, window "
                          f"presence F1 {scores[-1]['macro_f1']:.3f}")
    if main:
        chosen = classifier_choice.best_candidate(scores)
        source = folders[chosen]
        for name in ("model.pt", "losses.csv"):
            shutil.copyfile(source.classifier_dir / name, run.classifier_dir / name)
        (run.classifier_dir / classifier_choice.CHOICE_FILE).write_text(
            json.dumps({"chosen": chosen, "candidates": scores}, indent=2) + "\n")
        yield Message(STAGE, f"kept classifier {chosen + 1} of {count} (seed "
                      f"{scores[chosen]['seed']}): its gated val pseudo-masks score best")
        run.mark_complete(STAGE, epochs=source.status()[STAGE]["epochs"],
                          steps=source.status()[STAGE]["steps"],
                          seconds=round(sum(score["seconds"] for score in scores), 2),
                          candidates=count, chosen=chosen)
    yield Done(STAGE, run.classifier_checkpoint)


def _judge_candidate(folder: RunDirectory, seed: int, config: RunConfig, spec: DatasetSpec,
                     val: EvalSet, device: torch.device) -> dict:
    """A trained candidate's seed, training seconds, gated val pseudo-mask and class-gate
    scores."""
    model, payload = load_classifier(folder.classifier_checkpoint, device, spec=spec)
    window, threshold = classifier_choice.gate_settings(config,
                                                        payload["training"]["input_size"])
    return {"seed": seed, "seconds": folder.status()[STAGE].get("seconds", 0.0),
            **classifier_choice.gated_pseudo_mask_scores(model, val, config.pseudo_masks,
                                                         window, threshold, device),
            **classifier_choice.window_presence_scores(model, val, window, threshold, device)}


def _without_done(job: Generator[Event, None, bool]) -> Generator[Event, None, bool]:
    """A candidate's events but its ``Done``: the stage is done once one is chosen."""
    while True:
        try:
            event = next(job)
        except StopIteration as end:
            return end.value
        if not isinstance(event, Done):
            yield event
