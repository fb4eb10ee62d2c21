"""Training throughput against the model's pure forward+backward on preloaded tensors.

For the stage-1 classifier and the stage-2 segmenter, the real trainer runs on real patches and
the time between consecutive batches of an epoch is measured (decoding is cached, so this is
cropping, augmentation, batching, the host-to-device copy and the step; the per-epoch
checkpoint and validation are left out). The same model, batch size, input side, loss and
optimiser then step on one preloaded batch already on the device. The ratio is how much of the
model's speed the data pipeline keeps (1.0: the pipeline costs nothing).

The segmenter trains on constant pseudo-masks made from each patch's first label: their content
does not change the cost of a step.

``--precisions`` instead times the real trainers with ``train_precision`` fp32 and bf16 (CPU
bf16 autocast where oneDNN has bf16 kernels), alternating within the same invocation, and
prints bf16's steps/s as a ratio to fp32's.

    python benchmarks/bench_training.py                      # the bundled sample, CPU
    python benchmarks/bench_training.py --data ../shared/data/wsss4luad --device cuda
    python benchmarks/bench_training.py --precisions         # fp32 vs bf16 trainers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from napari_histo_wsss.core.config.presets import preset
from napari_histo_wsss.core.config.run_config import RunConfig
from napari_histo_wsss.core.data.datasets import PatchSet, find_dataset, write_palette_mask
from napari_histo_wsss.core.devices import resolve_device, training_autocast
from napari_histo_wsss.core.events import Batch, Event
from napari_histo_wsss.core.models.classifier import build_classifier
from napari_histo_wsss.core.models.segmenter import build_segmenter, normalise
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage1.train_classifier import (
    build_classifier_optimizer,
    classification_loss,
    train_classifier,
    training_size,
)
from napari_histo_wsss.core.stage2.losses import LossContext, LossTargets, build_loss
from napari_histo_wsss.core.stage2.train_segmenter import (
    build_segmenter_optimizer,
    input_side,
    measured_input_statistics,
    train_segmenter,
)
from napari_histo_wsss.core.training.stepper import Stepper, channels_last

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "napari_histo_wsss" / "sample_data" / \
    "wsss4luad"


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_step_seconds(events: Iterator[Event], steps: int, warmup: int,
                         device: torch.device) -> tuple[list[float], int]:
    """Seconds between consecutive ``Batch`` events of the same epoch, after ``warmup``, and
    the last epoch measured (the classifier's PDA depends on it)."""
    intervals: list[float] = []
    previous: tuple[int, float] | None = None
    seen = 0
    for event in events:
        if not isinstance(event, Batch):
            continue
        synchronise(device)
        now = time.perf_counter()
        seen += 1
        if previous is not None and previous[0] == event.epoch and seen > warmup + 1:
            intervals.append(now - previous[1])
        previous = (event.epoch, now)
        if len(intervals) >= steps:
            break
    return intervals, previous[0] if previous else 0


def pure_step_seconds(step: Callable[[], None], steps: int, warmup: int,
                      device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    synchronise(device)
    intervals = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        synchronise(device)
        intervals.append(time.perf_counter() - started)
    return intervals


def epochs_for(steps: int, warmup: int, steps_per_epoch: int) -> int:
    """Enough epochs to see ``steps`` intra-epoch intervals after the warm-up."""
    per_epoch = max(steps_per_epoch - 1, 1)
    return (steps + warmup) // per_epoch + 2


def classifier_trainer_seconds(patches: PatchSet, config: RunConfig, device: torch.device,
                               args) -> tuple[list[float], int]:
    """The real classifier trainer's step intervals (and the last epoch measured)."""
    settings = config.classifier
    batch = min(settings.batch_size, len(patches))
    settings.epochs = epochs_for(args.steps, args.warmup, len(patches) // batch)
    with tempfile.TemporaryDirectory() as folder:
        run = RunDirectory(folder)
        run.create(config)
        return trainer_step_seconds(
            train_classifier(run, config, patches, device=device, resume=False),
            args.steps, args.warmup, device)


def classifier_figures(patches: PatchSet, config: RunConfig, device: torch.device, args) -> dict:
    settings = config.classifier
    batch = min(settings.batch_size, len(patches))
    real, epoch = classifier_trainer_seconds(patches, config, device, args)

    torch.manual_seed(0)
    model = build_classifier(settings, patches.spec.num_classes, patches.spec).to(device).train()
    stepper = Stepper(model, build_classifier_optimizer(model, settings), device,
                      "classification")
    size = training_size(settings, [patches.image(i).shape for i in range(len(patches))])
    x = channels_last(model.normalise(torch.randint(  # as the trainer feeds it
        0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)))
    labels = torch.from_numpy(patches.labels[:batch].astype(np.float32)).to(device)

    def step() -> None:
        with stepper.autocast():
            loss = classification_loss(stepper.model(x, epoch=epoch), labels, settings)
        stepper.step(loss, "in the benchmark")

    pure = pure_step_seconds(step, args.steps, args.warmup, device)
    return summarise("classifier", f"{settings.backbone} {'+'.join(settings.train_modules)}",
                     batch, size, real, pure)


def segmenter_trainer_seconds(patches: PatchSet, config: RunConfig, device: torch.device,
                              args) -> tuple[list[float], int]:
    """The real segmenter trainer's step intervals (and the last epoch measured)."""
    settings = config.segmenter
    batch = min(settings.batch_size, len(patches))
    settings.epochs = epochs_for(args.steps, args.warmup, len(patches) // batch)
    with tempfile.TemporaryDirectory() as folder:
        run = RunDirectory(folder)
        run.create(config)
        for target in settings.targets:
            for index, path in enumerate(patches.paths):
                height, width = patches.image(index).shape[:2]
                first_label = int(np.flatnonzero(patches.labels[index])[0])
                write_palette_mask(run.pseudo_mask_dir(target) / path.with_suffix(".png").name,
                                   np.full((height, width), first_label, np.uint8), patches.spec)
        return trainer_step_seconds(
            train_segmenter(run, config, patches, device=device, resume=False),
            args.steps, args.warmup, device)


def segmenter_figures(patches: PatchSet, config: RunConfig, device: torch.device, args) -> dict:
    settings = config.segmenter
    batch = min(settings.batch_size, len(patches))
    real, _ = segmenter_trainer_seconds(patches, config, device, args)

    torch.manual_seed(0)
    model = build_segmenter(settings, patches.spec.num_classes).to(device).train()
    loss_fn = build_loss(settings)
    stepper = Stepper(model, build_segmenter_optimizer(model, settings), device, loss_fn.name)
    side = input_side(settings.input_size, patches, model.input_multiple)
    # Built as the trainer builds it: NHWC uint8 permuted, so channels-last in memory.
    x = normalise(torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8,
                                device=device),
                  *measured_input_statistics(settings.normalise, patches))
    masks = [torch.randint(0, patches.spec.num_classes, (batch, side, side), device=device)
             for _ in settings.targets]
    targets = LossTargets(masks, torch.from_numpy(
        patches.labels[:batch].astype(np.float32)).to(device))
    context = LossContext(patches.spec.num_classes, total_epochs=settings.epochs)

    def step() -> None:
        with stepper.autocast():
            passes = [stepper.model(x) for _ in range(loss_fn.num_passes)]
            loss = loss_fn(passes, targets, context).loss
        stepper.step(loss, "in the benchmark")

    pure = pure_step_seconds(step, args.steps, args.warmup, device)
    return summarise("segmenter", f"{settings.arch} {settings.encoder} ({settings.loss})",
                     batch, side, real, pure)


def precision_figures(stage: str, trainer_seconds, patches: PatchSet, config: RunConfig,
                      device: torch.device, args) -> dict:
    """The real trainer's steps/s with ``train_precision`` fp32 and bf16, alternated
    ``args.rounds`` times so that a change in the machine's load hits both alike."""
    intervals: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for precision in intervals:
            measured = dataclasses.replace(config, train_precision=precision)
            intervals[precision] += trainer_seconds(patches, measured, device, args)[0]
    rates = {precision: 1 / statistics.median(seconds)
             for precision, seconds in intervals.items()}
    return {"stage": stage, "fp32_steps_per_s": round(rates["fp32"], 3),
            "bf16_steps_per_s": round(rates["bf16"], 3),
            "bf16_over_fp32": round(rates["bf16"] / rates["fp32"], 3),
            "bf16_ran_as": training_autocast(device, "bf16")[1] or "bf16 autocast",
            "steps": len(intervals["bf16"])}


def summarise(stage: str, model: str, batch: int, side: int, real: list[float],
              pure: list[float]) -> dict:
    real_rate = batch / statistics.median(real)
    pure_rate = batch / statistics.median(pure)
    return {"stage": stage, "model": model, "batch": batch, "side": side,
            "trainer_images_per_s": round(real_rate, 2),
            "pure_images_per_s": round(pure_rate, 2),
            "ratio": round(real_rate / pure_rate, 3), "steps": len(real)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classifier-method", default="mlps",
                        help="preset whose classifier is measured (default mlps: PDA)")
    parser.add_argument("--segmenter-method", default="cam-ce",
                        help="preset whose segmenter and loss are measured (default cam-ce)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--precisions", action="store_true",
                        help="time the trainers with train_precision fp32 against bf16 "
                             "instead (a ratio; the pipeline-vs-pure table is skipped)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="--precisions: fp32/bf16 alternations (default 2)")
    parser.add_argument("--input-size", type=int,
                        help="crop side of both stages (default: the presets')")
    args = parser.parse_args()

    device = resolve_device(args.device)
    layout = find_dataset(args.data)
    patches = layout.patches()
    patches.decode_all()
    stages = (("classifier", args.classifier_method, classifier_figures,
               classifier_trainer_seconds),
              ("segmenter", args.segmenter_method, segmenter_figures,
               segmenter_trainer_seconds))
    rows = []
    for stage, method, figures, trainer_seconds in stages:
        config = measured_config(method, layout, patches, device, args)
        rows.append(precision_figures(stage, trainer_seconds, patches, config, device, args)
                    if args.precisions else figures(patches, config, device, args))
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, device {device}"
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(device)})"
    print(f"{machine}; data {args.data} ({len(patches)} patches)")
    if args.precisions:
        print_precision_table(rows)
    else:
        print_pipeline_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


def measured_config(method: str, layout, patches: PatchSet, device: torch.device,
                    args) -> RunConfig:
    config = preset(method, "fast", num_patches=len(patches))
    config.dataset = layout.spec.to_dict()
    config.device = str(device)
    config.classifier = dataclasses.replace(config.classifier, batch_size=args.batch_size)
    config.segmenter = dataclasses.replace(config.segmenter, batch_size=args.batch_size)
    if args.input_size:
        config.classifier.input_size = config.segmenter.input_size = args.input_size
    return config


def print_pipeline_table(rows: list[dict]) -> None:
    print("| stage | model | batch | side | trainer img/s | pure fwd+bwd img/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['model']} | {row['batch']} | {row['side']} | "
              f"{row['trainer_images_per_s']} | {row['pure_images_per_s']} | {row['ratio']} |")


def print_precision_table(rows: list[dict]) -> None:
    print("| stage | fp32 steps/s | bf16 steps/s | bf16 / fp32 | steps each | bf16 ran as |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['fp32_steps_per_s']} | {row['bf16_steps_per_s']} | "
              f"{row['bf16_over_fp32']} | {row['steps']} | {row['bf16_ran_as']} |")

if __name__ == "__main__":
    main()
