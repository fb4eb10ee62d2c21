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
import time
from collections import Counter
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..config.run_config import RunConfig, SegmenterConfig
from ..data.datasets import EvalSet, PatchSet, read_mask
from ..devices import autocast_dtype, resolve_device
from ..errors import CheckpointError, ConfigError, DatasetError
from ..events import Batch, CheckpointSaved, Done, Epoch, Event, Preview, Started, StopToken
from ..inference.predict import GATE_CHOICE_FILE, SegmentationPredictor, evaluate, json_ready
from ..models.segmenter import (
    SEGMENTER_KIND,
    Segmenter,
    build_segmenter,
    checkpoint_config,
    normalise,
)
from ..runs.checkpoints import load_checkpoint, save_checkpoint
from ..runs.run_dir import LossLog, RunDirectory
from .losses import IGNORE_INDEX, LossContext, LossTargets, SegmentationLoss, build_loss

POLY_POWER = 0.9
SAMPLINGS = ("uniform", "balanced")
#: MSV-ONSS's training pipeline (mmseg): rescale ratio range and PhotoMetricDistortion ranges.
ONSS_RESCALE = (0.75, 3.0)
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV hue units (0-180)
AUGMENTATIONS = ("flip_blur", "onss")


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
) -> Generator[Event, None, None]:
    """Train ``config.segmenter`` on ``pseudo_masks/<targets>``; ends with ``Done(model.pt)``.

    ``strategy`` names the output folder (default: the loss name), so several losses can be
    compared on the same pseudo-masks. With ``val``, every epoch is scored and the best mIoU
    is kept as ``model.pt``.
    """
    stop = stop or StopToken()
    settings = config.segmenter
    strategy = strategy or settings.loss
    stage = f"segmenter:{strategy}"
    device = device if isinstance(device, torch.device) else resolve_device(device or config.device)
    if settings.sampling not in SAMPLINGS:
        raise ConfigError(f"unknown sampling '{settings.sampling}': use "
                          f"{' or '.join(SAMPLINGS)}")
    if settings.augment not in AUGMENTATIONS:
        raise ConfigError(f"unknown segmenter augmentation '{settings.augment}': use "
                          f"{' or '.join(AUGMENTATIONS)}")
    if len(patches) < 2:
        raise DatasetError("a segmenter needs at least 2 training patches",
                           patches.paths[0].parent if patches.paths else None)
    spec = patches.spec
    loss_fn = build_loss(settings)
    patches.decode_all()
    targets = read_pseudo_masks(run, settings.targets, patches)

    folder = run.segmenter_dir(strategy)
    last_path, model_path = folder / "last.pt", folder / "model.pt"
    if not resume:
        for name in ("last.pt", "model.pt", "losses.csv", "metrics.json"):
            (folder / name).unlink(missing_ok=True)
    run.mark_incomplete(stage)
    (folder / GATE_CHOICE_FILE).unlink(missing_ok=True)  # made for the model being replaced

    torch.manual_seed(config.seed)
    model = build_segmenter(settings, spec.num_classes).to(device)
    side = input_side(settings.input_size, patches, model.input_multiple)
    mean, std = input_statistics(settings.normalise, patches)
    optimizer = build_optimizer(model, settings)
    state = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0, "parts_sum": {},
             "best_miou": None, "best_epoch": None, "history": [], "seconds": 0.0}
    if last_path.is_file():
        state = resume_training(last_path, model, optimizer)
    saved_config = checkpoint_config(config, strategy, side, settings.normalise, mean, std)

    def save(path: Path, with_optimizer: bool) -> None:
        save_checkpoint(path, kind=SEGMENTER_KIND, state_dict=model.state_dict(),
                        config=saved_config, spec=spec, training=state,
                        optimizer_state=optimizer.state_dict() if with_optimizer else None)

    batch_size = min(settings.batch_size, len(patches))
    if batch_size < 2:
        raise ConfigError("the segmenter batch size must be at least 2 (BatchNorm)")
    batches_per_epoch = len(patches) // batch_size
    total_steps = settings.epochs * batches_per_epoch
    part_names = [*loss_fn.part_names, *(["aux"] if model.aux_head is not None else [])]
    log = LossLog(folder / "losses.csv", ["epoch", "step", "train_loss", *part_names, "lr",
                                          "val_miou", "val_fwiou", "val_dice", "seconds"])
    yield Started(stage, total_epochs=settings.epochs, batches_per_epoch=batches_per_epoch)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type,
                                  enabled=autocast_dtype(device) == torch.float16)
    context = LossContext(spec.num_classes, total_epochs=settings.epochs)

    for epoch in range(state["epoch"], settings.epochs):
        model.train()
        context.epoch = epoch
        started = time.perf_counter()
        order = epoch_order(patches.labels, settings.sampling, config.seed, epoch)
        rng = np.random.default_rng([config.seed, epoch, state["batch"]])
        torch.manual_seed(config.seed + 7919 * (epoch * batches_per_epoch + state["batch"]))
        lr, result = settings.lr, None
        for index in range(state["batch"], batches_per_epoch):
            if stop.requested:
                state["seconds"] += time.perf_counter() - started
                save(last_path, with_optimizer=True)
                if not model_path.is_file():
                    save(model_path, with_optimizer=False)
                yield CheckpointSaved(stage, last_path, epoch)
                yield Done(stage, model_path, stopped=True)
                return
            chosen = order[index * batch_size:(index + 1) * batch_size]
            images, masks = make_batch(patches, targets, chosen, side, settings.augment, rng)
            lr = set_lr(optimizer, settings, state["step"], total_steps)
            x = normalise(torch.from_numpy(images).to(device), mean, std)
            batch_targets = LossTargets(
                [torch.from_numpy(m).to(device, torch.int64) for m in masks],
                torch.from_numpy(patches.labels[chosen]).to(device, torch.float32),
            )
            result = train_step(model, loss_fn, optimizer, scaler, x, batch_targets, context)
            loss_value = float(result.loss.detach())
            state["step"] += 1
            state["batch"] = index + 1
            state["loss_sum"] += loss_value
            for name, value in result.parts.items():
                state["parts_sum"][name] = state["parts_sum"].get(name, 0.0) + value
            yield Batch(stage, epoch, index, batches_per_epoch, loss_value)

        if result is not None and result.pixel_weight is not None:
            yield Preview(stage, "pixel_weight", {
                "image": images[0], "pseudo_mask": masks[0][0],
                "weight": result.pixel_weight[0].float().cpu().numpy()})
        train_loss = state["loss_sum"] / batches_per_epoch
        scores = None
        if val is not None:
            predictor = SegmentationPredictor(model, spec, mean=mean, std=std, input_size=side)
            scores = evaluate(predictor, val)
        miou = scores["miou"] if scores else float("nan")
        improved = bool(np.isfinite(miou)) and (
            state["best_miou"] is None or miou > state["best_miou"])
        if improved:
            state["best_miou"], state["best_epoch"] = miou, epoch + 1
        # Without a (usable) validation score, model.pt follows the latest epoch.
        keep = improved or state["best_miou"] is None
        metrics = {k: scores[k] for k in ("miou", "fwiou", "dice")} if scores else {}
        state["seconds"] += time.perf_counter() - started
        state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "lr": lr,
                                 **metrics})
        parts = {name: value / batches_per_epoch for name, value in state["parts_sum"].items()}
        state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, parts_sum={})
        save(last_path, with_optimizer=True)
        if keep:
            save(model_path, with_optimizer=False)
        log.append(epoch=epoch + 1, step=state["step"], train_loss=f"{train_loss:.6f}",
                   lr=f"{lr:.6g}", seconds=f"{state['seconds']:.1f}",
                   **{name: f"{value:.6f}" for name, value in parts.items()},
                   **{f"val_{k}": f"{v:.6f}" for k, v in metrics.items()})
        write_metrics(folder, strategy, settings, state, side, device,
                      scores if improved else None)
        yield Epoch(stage, epoch, train_loss, lr=lr, metrics=metrics)
        yield CheckpointSaved(stage, last_path, epoch + 1)
        if keep:
            yield CheckpointSaved(stage, model_path, epoch + 1, best=improved)

    if not model_path.is_file():  # resumed a run that had already finished its epochs
        save(model_path, with_optimizer=False)
    run.mark_complete(stage, epochs=state["epoch"], best_epoch=state["best_epoch"],
                      best_val_miou=state["best_miou"])
    yield Done(stage, model_path)


# --------------------------------------------------------------------------------------------
# Inputs


def epoch_order(labels: np.ndarray, sampling: str, seed: int, epoch: int) -> np.ndarray:
    """The patch indices of one epoch (as many as there are patches).

    ``uniform`` is a permutation. ``balanced`` draws with replacement, each patch weighted by
    1 / (number of patches holding its rarest class): a class found in 17 of 557 patches is
    then drawn about as often as one found in 431, so a rare tissue is not learnt from a
    handful of steps. A patch without any label weighs as much as one of the commonest class.
    """
    rng = np.random.default_rng([seed, epoch])
    count = len(labels)
    if sampling == "uniform":
        return rng.permutation(count)
    holders = labels.astype(bool)
    class_counts = holders.sum(axis=0)
    inverse = np.where(class_counts > 0, 1.0 / np.maximum(class_counts, 1), 0.0)
    weights = (holders * inverse).max(axis=1)
    commonest = inverse[inverse > 0].min() if (inverse > 0).any() else 1.0
    weights = np.where(weights > 0, weights, commonest)
    return rng.choice(count, size=count, replace=True, p=weights / weights.sum())


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


def input_side(input_size: int | None, patches: PatchSet, multiple: int) -> int:
    """The training crop side: ``input_size`` or the most common patch side, rounded down to
    a multiple of the encoder's stride."""
    if input_size is None:
        sides = Counter(min(patches.image(i).shape[:2]) for i in range(len(patches)))
        input_size = sides.most_common(1)[0][0]
    return max(multiple, input_size // multiple * multiple)


def input_statistics(mode: str, patches: PatchSet) -> tuple[tuple, tuple]:
    """(mean, std) on the 0-255 scale; ``dataset`` statistics are measured on the training
    patches when the dataset description has none (the published ones otherwise)."""
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
               augment: str, rng: np.random.Generator
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8 images (N, side, side, 3) and one (N, side, side) mask array per target."""
    images, masks = [], []
    for index in indices:
        image, sample_masks = augment_sample(
            patches.image(index), [target[index] for target in targets], side, augment, rng)
        images.append(image)
        masks.append(sample_masks)
    return np.stack(images), [np.stack(per_target) for per_target in zip(*masks, strict=True)]


def augment_sample(image: np.ndarray, masks: list[np.ndarray], side: int, augment: str,
                   rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """One training sample at ``side`` x ``side``.

    ``flip_blur`` (MLPS, ARML, ESFAN): crop (resize up if smaller), horizontal flip p 0.5,
    Gaussian blur p 0.5 with radius U(0, 1). ``onss`` (MSV): rescale by U(0.75, 3), crop with
    255 padding, flip, photometric distortion.
    """
    if augment == "onss":
        ratio = rng.uniform(*ONSS_RESCALE)
        height, width = image.shape[:2]
        image, masks = _resize(image, masks, (round(height * ratio), round(width * ratio)))
        image, masks = _crop(image, masks, side, rng, pad=True)
    else:
        image, masks = _crop(image, masks, side, rng, pad=False)
    if rng.random() < 0.5:
        image = image[:, ::-1]
        masks = [m[:, ::-1] for m in masks]
    if augment == "onss":
        image = photometric_distortion(image, rng)
    elif rng.random() < 0.5:
        radius = rng.uniform(0.0, 1.0)
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in masks]


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
# Optimisation and state


def build_optimizer(model: Segmenter, settings: SegmenterConfig) -> torch.optim.Optimizer:
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


def train_step(model: Segmenter, loss_fn: SegmentationLoss, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, x: torch.Tensor, targets: LossTargets,
               context: LossContext):
    """Forward (as many passes as the loss needs), backward, step; mixed precision on GPU."""
    device = x.device
    amp_dtype = autocast_dtype(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        passes = [model(x) for _ in range(loss_fn.num_passes)]
        result = loss_fn(passes, targets, context)  # autocast runs CE and softmax in float32
    loss_value = float(result.loss.detach())
    if not np.isfinite(loss_value):
        raise ConfigError(f"the {loss_fn.name} loss became {loss_value} at epoch "
                          f"{context.epoch + 1}: lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(result.loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return result


def set_lr(optimizer: torch.optim.Optimizer, settings: SegmenterConfig, step: int,
           total_steps: int) -> float:
    """Poly (power 0.9, per iteration, floored at ``min_lr``) or constant; the encoder's lr."""
    if settings.schedule == "poly":
        factor = (1 - min(step, total_steps) / max(total_steps, 1)) ** POLY_POWER
    elif settings.schedule == "constant":
        factor = 1.0
    else:
        raise ConfigError(f"unknown lr schedule '{settings.schedule}': use poly or constant")
    for group in optimizer.param_groups:
        floor = min(settings.min_lr, group["base_lr"])
        group["lr"] = floor + (group["base_lr"] - floor) * factor
    return optimizer.param_groups[0]["lr"]


def resume_training(path: Path, model: Segmenter, optimizer: torch.optim.Optimizer) -> dict:
    payload = load_checkpoint(path, kind=SEGMENTER_KIND)
    try:
        model.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer_state"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"cannot resume: it was trained with other settings ({str(error).splitlines()[0]}); "
            "train again without resuming (--restart)",
            path,
        ) from None
    return dict(payload["training"])


def write_metrics(folder: Path, strategy: str, settings: SegmenterConfig, state: dict,
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
        "epochs": state["epoch"],
        "train_seconds": round(state["seconds"], 1),
        "best_epoch": state["best_epoch"],
        "best_val": best_scores if best_scores is not None else previous.get("best_val"),
        "history": state["history"],
        **extra,
    }
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(json_ready(metrics), indent=2) + "\n")
    temporary.replace(path)
