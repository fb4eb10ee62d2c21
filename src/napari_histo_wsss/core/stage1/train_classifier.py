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

import json
import time
from collections import Counter
from collections.abc import Generator

import numpy as np
import torch
import torch.nn.functional as F

from ..config.run_config import ClassifierConfig, RunConfig
from ..data.classes import DatasetSpec
from ..devices import autocast_dtype
from ..errors import CheckpointError, ConfigError, DatasetError
from ..events import Batch, CheckpointSaved, Done, Epoch, Event, Started, StopToken
from ..models.classifier import CamClassifier, ClassifierOutput, build_classifier
from ..runs.checkpoints import check_same_classes, load_checkpoint, save_checkpoint
from ..runs.run_dir import LossLog, RunDirectory

STAGE = "classifier"
POLY_POWER = 0.9
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


def augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Batch augmentation on 0-255 floats: "flips" (H and V, p 0.5 each) or "arml" (H flip,
    3x3 blur, V flip, brightness/contrast jitter 0.5)."""
    if mode == "flips":
        return _flip(_flip(x, 3, generator), 2, generator)
    if mode == "arml":
        x = _gaussian_blur3(_flip(x, 3, generator), generator)
        return _brightness_contrast(_flip(x, 2, generator), generator)
    raise ConfigError(f"unknown classifier augment '{mode}': use flips or arml")


# --------------------------------------------------------------------------------------------
# Optimisation


def build_optimizer(model: CamClassifier, config: ClassifierConfig) -> torch.optim.SGD:
    """SGD with the released four groups; ``initial_lr`` per group drives the poly schedule."""
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
        group["initial_lr"] = group["lr"]
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> float:
    factor = (1 - step / max(total_steps, 1)) ** POLY_POWER
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


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
    def canonical(value):
        return json.loads(json.dumps(value))

    saved = payload["config"]
    return (canonical(saved.get("classifier")) == canonical(config.to_dict()["classifier"])
            and saved.get("seed") == config.seed)


def train_classifier(run: RunDirectory, config: RunConfig, patches, *, device: torch.device,
                     stop: StopToken | None = None, resume: bool = True
                     ) -> Generator[Event, None, None]:
    """Train the stage-1 classifier of ``run``; ends with ``Done(result=classifier/model.pt)``.

    A stop request is honoured before the next batch: ``model.pt`` (usable) and ``last.pt``
    (with optimiser state) are saved and ``Done(stopped=True)`` is yielded. With ``resume``,
    training continues from ``classifier/last.pt`` when it exists.
    """
    stop = stop or StopToken()
    spec = _check_dataset(patches, config)
    settings = config.classifier
    patches.decode_all()
    count = len(patches)
    batch_size = max(1, min(settings.batch_size, count))
    steps_per_epoch = count // batch_size
    total_steps = steps_per_epoch * settings.epochs
    size = training_size(settings, [patches.image(i).shape for i in range(count)])

    torch.manual_seed(config.seed)
    model = build_classifier(settings, spec.num_classes, spec).to(device)
    optimizer = build_optimizer(model, settings)
    last_path = run.classifier_dir / "last.pt"
    progress = {"step": 0, "epoch_losses": [], "running_loss": 0.0, "running_batches": 0,
                "seconds": 0.0}
    if resume and last_path.is_file():
        progress = _restore(last_path, model, optimizer, spec, config)
    else:
        last_path.unlink(missing_ok=True)
    if progress["step"] == 0:
        (run.classifier_dir / "losses.csv").unlink(missing_ok=True)
    log = LossLog(run.classifier_dir / "losses.csv", LOSS_FIELDS)

    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    labels = torch.from_numpy(patches.labels.astype(np.float32))
    started = time.perf_counter() - progress["seconds"]

    def save(stopped: bool) -> None:
        progress["seconds"] = round(time.perf_counter() - started, 2)
        training = {**progress, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                    "batch_size": batch_size, "input_size": size, "seed": config.seed,
                    "finished": progress["step"] >= total_steps, "stopped": stopped}
        for path, state in ((last_path, optimizer.state_dict()),
                            (run.classifier_checkpoint, None)):
            save_checkpoint(path, kind="classifier", state_dict=model.state_dict(),
                            config=config.to_dict(), spec=spec, training=training,
                            optimizer_state=state)

    run.mark_incomplete("classifier")
    yield Started(STAGE, total_epochs=settings.epochs, batches_per_epoch=steps_per_epoch)
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    while progress["step"] < total_steps:
        step = progress["step"]
        epoch, index = divmod(step, steps_per_epoch)
        if stop.requested:
            save(stopped=True)
            yield CheckpointSaved(STAGE, run.classifier_checkpoint, epoch)
            yield Done(STAGE, result=run.classifier_checkpoint, stopped=True)
            return
        order = torch.randperm(count, generator=torch.Generator().manual_seed(
            derived_seed(config.seed, epoch)))
        chosen = order[index * batch_size:(index + 1) * batch_size]
        step_seed = derived_seed(config.seed, epoch, index + 1)
        generator = torch.Generator().manual_seed(step_seed)
        torch.manual_seed(step_seed)  # dropout
        x = torch.stack([fit_to_size(patches.image(int(i)), size, generator) for i in chosen])
        x = model.normalise(augment(x.to(device), settings.augment, generator))
        # Channels-last inputs run the convolutions faster on CPUs too (x1.3 for Lite0 on two
        # cores, benchmarks/bench_training.py); the segmenter's inputs are channels-last already.
        x = x.contiguous(memory_format=torch.channels_last)
        lr = set_poly_lr(optimizer, step, total_steps)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(x, epoch=epoch)
        loss = classification_loss(output, labels[chosen].to(device), settings)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        value = float(loss.detach())
        progress.update(step=step + 1, running_loss=progress["running_loss"] + value,
                        running_batches=progress["running_batches"] + 1)
        yield Batch(STAGE, epoch=epoch, index=index, total=steps_per_epoch, loss=value)
        if index + 1 == steps_per_epoch:
            train_loss = progress["running_loss"] / max(progress["running_batches"], 1)
            progress.update(epoch_losses=[*progress["epoch_losses"], train_loss],
                            running_loss=0.0, running_batches=0)
            save(stopped=False)
            log.append(epoch=epoch + 1, train_loss=f"{train_loss:.6f}", lr=f"{lr:.6g}",
                       seconds=progress["seconds"])
            yield CheckpointSaved(STAGE, last_path, epoch)
            yield Epoch(STAGE, epoch=epoch, train_loss=train_loss, lr=lr)

    if total_steps == 0 or not run.classifier_checkpoint.is_file():
        save(stopped=False)
    run.mark_complete("classifier", epochs=settings.epochs, steps=total_steps,
                      seconds=progress["seconds"])
    yield Done(STAGE, result=run.classifier_checkpoint)


def _restore(path, model: CamClassifier, optimizer: torch.optim.Optimizer, spec: DatasetSpec,
             config: RunConfig) -> dict:
    """Load ``last.pt`` into the model and optimiser; the progress dict to continue from."""
    payload = load_checkpoint(path, kind="classifier")
    check_same_classes(payload, spec, path)
    if not _same_settings(payload, config):
        raise CheckpointError(
            "was trained with other classifier settings or seed; resuming would mix two "
            "schedules: start a new run directory (or train without resume)", path)
    try:
        model.load_state_dict(payload["state_dict"])
        if payload.get("optimizer_state"):
            optimizer.load_state_dict(payload["optimizer_state"])
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"does not fit this classifier ({first})", path) from None
    training = payload["training"]
    return {key: training[key] for key in
            ("step", "epoch_losses", "running_loss", "running_batches", "seconds")}
