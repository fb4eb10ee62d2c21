"""HisynSeg's synthesised-image filter: a real-vs-synthetic classifier decides what is kept.

Synthetic images carry seams, pasted blobs and warps that real tissue never shows. A small CNN
learns to tell real MULTI-label patches (several tissues, as in a synthetic image) from
unfiltered synthetic images of one type; new synthetic images are then kept only while it
takes them for real (P(real) > threshold), so the segmenter trains on the most plausible ones
(docs/algorithms.md 5.2). As released: one discriminator per synthesis type, timm ResNet-18 from
random init, Adam 1e-3, cross-entropy, H/V flips, ImageNet normalisation, 80/20 split, the epoch
with the best validation accuracy. The fast schedule uses timm's ResNet-10-T (about 60 % of
ResNet-18's training time on a CPU) with smaller batches; everything else is the same.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..data.classes import DatasetSpec
from ..data.datasets import write_palette_mask
from ..errors import ConfigError
from ..events import Batch, Event, Message, Started, StopToken
from ..runs.outputs import atomic_write_text
from ..training.loop import EpochResult, EpochTrainer, run_epochs
from ..training.state import TrainingState
from ..training.stepper import Stepper
from .synthesis import Synthesizer, SyntheticPool

#: Synthetic draws allowed per wanted image before the filter gives up on the target.
ATTEMPTS_PER_IMAGE = 20
_SCORING_CHUNK = 64


def _uint8_batch(images, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) images (sizes may differ) -> one uint8 (N, 3, size, size) CPU tensor;
    kept as uint8 so a large training set costs a quarter of its float size."""
    tensors = []
    for image in images:  # copied: cached patches are read-only arrays
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
        if tensor.shape[-2:] != (size, size):
            tensor = F.interpolate(tensor.float(), size=(size, size), mode="bilinear",
                                   align_corners=False, antialias=True)
            tensor = tensor.round().clamp(0, 255).to(torch.uint8)
        tensors.append(tensor)
    return torch.cat(tensors)


def _normalised(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> ImageNet-normalised float on ``device``."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
    return (batch.to(device).float() / 255 - mean) / std


class Discriminator:
    """A trained real-vs-synthetic classifier (output 1 = real, 0 = synthetic)."""

    def __init__(self, model: nn.Module, input_size: int, device: torch.device):
        self.model = model.to(device).eval()
        self.input_size = input_size
        self.device = device

    @torch.no_grad()
    def p_real(self, images, batch_size: int = _SCORING_CHUNK) -> np.ndarray:
        """Softmax probability of "real" for each uint8 (H, W, 3) image."""
        scores = []
        for start in range(0, len(images), batch_size):
            chunk = _uint8_batch(images[start:start + batch_size], self.input_size)
            batch = _normalised(chunk, self.device)
            scores.append(torch.softmax(self.model(batch).float(), dim=1)[:, 1].cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)


def build_discriminator(arch: str) -> nn.Module:
    """A randomly initialised timm classifier with two outputs, as released."""
    try:
        return timm.create_model(arch, pretrained=False, num_classes=2)
    except RuntimeError as error:  # timm: unknown model name
        raise ConfigError(f"unknown discriminator '{arch}' ({error}): use a timm "
                          "classifier such as resnet18 or resnet10t") from None


def train_discriminator(
    real_images: list[np.ndarray],
    synthetic: SyntheticPool,
    *,
    arch: str,
    epochs: int,
    batch_size: int,
    device: torch.device,
    rng: np.random.Generator,
    stop: StopToken,
    stage: str,
    lr: float = 1e-3,
) -> Generator[Event, None, tuple[Discriminator, dict]]:
    """Train on real (label 1) vs synthetic (label 0) images; returns the best-val-accuracy
    model and its figures. A stop request ends training early with the best model so far."""
    size = synthetic.images.shape[1]
    real = _uint8_batch(real_images, size)
    fake = _uint8_batch(synthetic.images, size)
    (real_train, real_val), (fake_train, fake_val) = (
        _split(len(real), rng), _split(len(fake), rng))
    train = (torch.cat([real[real_train], fake[fake_train]]),
             torch.cat([torch.ones(len(real_train)), torch.zeros(len(fake_train))]).long())
    val = (torch.cat([real[real_val], fake[fake_val]]),
           torch.cat([torch.ones(len(real_val)), torch.zeros(len(fake_val))]).long())

    torch.manual_seed(int(rng.integers(2**31)))
    model = build_discriminator(arch).to(device)
    trainer = _DiscriminatorTrainer(model, torch.optim.Adam(model.parameters(), lr=lr), train,
                                    val, epochs=epochs, batch_size=batch_size, device=device,
                                    rng=rng, stage=stage)
    yield from run_epochs(trainer, stop)
    model.load_state_dict(trainer.best["state"])
    figures = {"arch": arch, "epochs": epochs, "best_epoch": trainer.best["epoch"],
               "val_accuracy": trainer.best["val_accuracy"], "train_real": len(real_train),
               "train_synthetic": len(fake_train), "val_real": len(real_val),
               "val_synthetic": len(fake_val)}
    return Discriminator(model, size, device), figures


class _DiscriminatorTrainer(EpochTrainer):
    """The filter's parts of the training loop: flipped batches, cross-entropy, the epoch with
    the best validation accuracy kept in memory (nothing is saved: a stop keeps the best)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train, val, *,
                 epochs: int, batch_size: int, device: torch.device,
                 rng: np.random.Generator, stage: str):
        self.model, self.train_set, self.val_set = model, train, val
        self.batch_size, self.device, self.rng, self.stage = batch_size, device, rng, stage
        self.epochs = epochs
        self.batches_per_epoch = max(1, -(-len(train[0]) // batch_size))
        self.state = TrainingState()
        self.stepper = Stepper(model, optimizer, device, "discriminator")
        #: Epochs count from 1 here, like ``best_epoch`` in the run's metrics.
        self.best = {"val_accuracy": -1.0, "epoch": 0,
                     "state": copy.deepcopy(model.state_dict())}

    def begin_epoch(self, epoch: int, first_batch: int) -> None:
        self.order = torch.from_numpy(self.rng.permutation(len(self.train_set[0])))

    def set_lr(self, epoch: int, index: int) -> float:
        return self.stepper.optimizer.param_groups[0]["lr"]

    def step(self, model, epoch: int, index: int) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = self.train_set
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        x = _normalised(_random_flips(images[chosen], self.rng), self.device)
        return F.cross_entropy(model(x), labels[chosen].to(self.device)), {}

    def end_epoch(self, epoch: int, train_loss: float, parts: dict[str, float],
                  lr: float) -> EpochResult:
        accuracy = _accuracy(self.model, *self.val_set, self.device, self.batch_size)
        if accuracy > self.best["val_accuracy"]:
            self.best = {"val_accuracy": accuracy, "epoch": epoch + 1,
                         "state": copy.deepcopy(self.model.state_dict())}
        return EpochResult({"val_accuracy": accuracy}, keep=False)


def _split(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled 80/20 train/val indices (at least one of each where count allows)."""
    order = rng.permutation(count)
    cut = min(max(int(count * 0.8), 1), max(count - 1, 1))
    return order[:cut], order[cut:]


def _random_flips(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    images = images.clone()
    for dim in (3, 2):  # horizontal, vertical; each with p 0.5 per image
        flip = torch.from_numpy(rng.random(len(images)) < 0.5)
        images[flip] = images[flip].flip(dim)
    return images


@torch.no_grad()
def _accuracy(model, images, labels, device, batch_size) -> float:
    if not len(images):
        return float("nan")
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(_normalised(images[start:start + batch_size], device))
        correct += int((logits.argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return correct / len(images)


@dataclass
class FilterReport:
    """What the filter did for one synthesis type (written to ``hisynseg/synthesis.json``)."""

    kind: str
    target: int
    attempts: int
    accepted: int
    #: Images below the threshold that filled the set because too few passed (best first).
    topped_up: int
    threshold: float
    mean_p_real_accepted: float | None
    mean_p_real_rejected: float | None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.attempts if self.attempts else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}


def filter_synthetic(
    synthesizer: Synthesizer,
    kind: str,
    discriminator: Discriminator,
    target: int,
    rng: np.random.Generator,
    *,
    threshold: float,
    stop: StopToken,
    stage: str,
) -> Generator[Event, None, tuple[SyntheticPool, FilterReport]]:
    """Synthesise ``kind`` images on the fly, keeping those with P(real) > ``threshold``.

    At most ``ATTEMPTS_PER_IMAGE * target`` images are drawn. If too few pass, the most
    real-looking rejected ones fill the set and a Message says so, so training never starves.
    A stop request returns what was kept so far.
    """
    kept_images, kept_masks, kept_scores = [], [], []
    # Best rejected candidates so far, at most ``target`` of them (the top-up reserve).
    reserve = SyntheticPool(np.zeros((0, synthesizer.size, synthesizer.size, 3), np.uint8),
                            np.zeros((0, synthesizer.size, synthesizer.size), np.uint8),
                            np.zeros(0, np.float32))
    attempts, rejected_sum, rejected_count = 0, 0.0, 0
    max_attempts = ATTEMPTS_PER_IMAGE * target
    chunks = -(-max_attempts // _SCORING_CHUNK)
    yield Started(stage, 1, chunks)
    chunk_index = 0
    while len(kept_images) < target and attempts < max_attempts and not stop.requested:
        count = min(_SCORING_CHUNK, max_attempts - attempts)
        pairs = [synthesizer(kind, rng) for _ in range(count)]
        images = np.stack([image for image, _ in pairs])
        masks = np.stack([mask for _, mask in pairs])
        scores = discriminator.p_real(images).astype(np.float32)
        attempts += count
        passed = scores > threshold
        room = target - len(kept_images)
        for index in np.flatnonzero(passed)[:room]:
            kept_images.append(images[index])
            kept_masks.append(masks[index])
            kept_scores.append(scores[index])
        rejected_sum += float(scores[~passed].sum())
        rejected_count += int((~passed).sum())
        reserve = _best_of(reserve, images[~passed], masks[~passed], scores[~passed], target)
        yield Batch(stage, 1, chunk_index, chunks)
        chunk_index += 1

    accepted = len(kept_images)
    topped_up = 0
    if accepted < target and not stop.requested:
        topped_up = min(target - accepted, len(reserve))
        kept_images += list(reserve.images[:topped_up])
        kept_masks += list(reserve.masks[:topped_up])
        kept_scores += list(reserve.p_real[:topped_up])
        yield Message(stage, (
            f"only {accepted} of {target} {kind} images passed the filter (P(real) > "
            f"{threshold:g}) in {attempts} attempts ({100 * accepted / max(attempts, 1):.1f} %); "
            f"the {topped_up} most real-looking rejected ones fill the rest"))
    size = synthesizer.size
    pool = SyntheticPool(
        np.stack(kept_images) if kept_images else np.zeros((0, size, size, 3), np.uint8),
        np.stack(kept_masks) if kept_masks else np.zeros((0, size, size), np.uint8),
        np.array(kept_scores, dtype=np.float32))
    report = FilterReport(
        kind=kind, target=target, attempts=attempts, accepted=accepted, topped_up=topped_up,
        threshold=threshold,
        mean_p_real_accepted=float(np.mean(kept_scores[:accepted])) if accepted else None,
        mean_p_real_rejected=rejected_sum / rejected_count if rejected_count else None,
    )
    return pool, report


def _best_of(reserve: SyntheticPool, images, masks, scores, keep: int) -> SyntheticPool:
    """The ``keep`` highest-scoring images of the reserve and the new candidates."""
    if len(reserve) >= keep and (not len(scores) or scores.max() <= reserve.p_real.min()):
        return reserve
    all_scores = np.concatenate([reserve.p_real, scores])
    order = np.argsort(-all_scores, kind="stable")[:keep]
    return SyntheticPool(np.concatenate([reserve.images, images])[order],
                         np.concatenate([reserve.masks, masks])[order], all_scores[order])


def record_filter_outcome(
    folder: str | Path,
    report: FilterReport,
    pool: SyntheticPool,
    spec: DatasetSpec,
    *,
    discriminator: dict | None = None,
    examples: int = 4,
) -> Path:
    """Add one type's counts to ``folder/synthesis.json`` and save a few kept images with
    their masks as ``folder/examples/<kind>_NN.png`` / ``<kind>_NN_mask.png``."""
    folder = Path(folder)
    for index in range(min(examples, len(pool))):
        stem = folder / "examples" / f"{report.kind}_{index:02d}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pool.images[index]).save(stem.with_name(stem.name + ".png"))
        write_palette_mask(stem.with_name(stem.name + "_mask.png"), pool.masks[index], spec)
    return update_synthesis_record(
        folder, report.kind, {**report.to_dict(), "discriminator": discriminator})


def update_synthesis_record(folder: str | Path, key: str, value) -> Path:
    """Set ``key`` in ``folder/synthesis.json``, keeping the other entries (atomic write)."""
    path = Path(folder) / "synthesis.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[key] = value
    return atomic_write_text(path, json.dumps(record, indent=2) + "\n")
