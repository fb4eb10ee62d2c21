"""Batched Grad-CAM (all classes and layers of a batch) vs the released per-image loop.

The released generators run one forward and one backward per image, class and layer (MLPS: 3
layers x C classes per patch). The batched path runs one forward per batch and one backward
per class for every layer, on the classifier prepared as the pseudo-mask job does
(``frozen_for_class_maps``: BatchNorms folded, depthwise input gradients on the forward
kernel; the preparation's own time included); it is also timed on the model as trained and
with the BatchNorms folded only. All produce the same maps (tests/core/stage1/test_cams.py,
tests/core/models/test_folding.py, tests/core/models/test_depthwise_gradient.py); this prints
their throughput on the same model and patches, and the ratios.

    python benchmarks/bench_pseudo_masks.py [--data DIR] [--device cpu] [--patches 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from napari_histo_wsss.core.config.run_config import ClassifierConfig
from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.devices import resolve_device
from napari_histo_wsss.core.models.classifier import build_classifier
from napari_histo_wsss.core.models.folding import fold_batchnorm
from napari_histo_wsss.core.stage1.cams import (
    class_activation_maps,
    frozen_for_class_maps,
    gradcam,
)

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "napari_histo_wsss" / "sample_data" / \
    "wsss4luad"
LAYERS = ("-1", "-2", "-3")


def released_loop(model, images: torch.Tensor) -> None:
    """One forward + backward per image, class and layer, as the released 2_generate_PM.py."""
    for image in images:
        for c in range(model.num_classes):
            for layer in LAYERS:
                logits, activations = model.cam_forward(image[None], [layer])
                activation = next(iter(activations.values()))
                (gradient,) = torch.autograd.grad(logits[0, c], activation)
                gradcam(activation.detach(), gradient)


def batched(model, images: torch.Tensor, batch_size: int) -> None:
    for start in range(0, len(images), batch_size):
        class_activation_maps(model, images[start:start + batch_size], LAYERS, "gradcam")


def folded_then_batched(model, images: torch.Tensor, batch_size: int) -> None:
    batched(fold_batchnorm(model), images, batch_size)


def prepared_then_batched(model, images: torch.Tensor, batch_size: int) -> None:
    batched(frozen_for_class_maps(model), images, batch_size)


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    if args[1].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = resolve_device(args.device)
    patches = find_dataset(args.data).patches()
    size = patches.image(len(patches) - 1).shape
    same_size = [i for i in range(len(patches)) if patches.image(i).shape == size]
    chosen = same_size[: args.patches]
    model = build_classifier(ClassifierConfig(), patches.spec.num_classes, patches.spec)
    model = model.to(device).eval()
    images = model.normalise(torch.stack([
        torch.tensor(patches.image(i)).permute(2, 0, 1) for i in chosen]).to(device))

    timed(batched, model, images[:2], 2)  # warm-up
    timed(prepared_then_batched, model, images[:2], 2)
    paths = {"loop": (released_loop, ()), "as trained": (batched, (args.batch_size,)),
             "folded": (folded_then_batched, (args.batch_size,)),
             "prepared": (prepared_then_batched, (args.batch_size,))}
    # Interleaved repeats, median per path: one pass of each varies by 10-20 % on a VM.
    runs = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, (function, extra) in paths.items():
            runs[name].append(timed(function, model, images, *extra))
    seconds = {name: statistics.median(times) for name, times in runs.items()}
    count = len(images)
    print(f"{count} patches {size[1]}x{size[0]}, {patches.spec.num_classes} classes, layers "
          f"{', '.join(model.backbone.resolve_layer(n) for n in LAYERS)}, device {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"released loop (image x class x layer): {count / seconds['loop']:8.2f} patches/s")
    print(f"batched, as trained (batch {args.batch_size}, one backward per class): "
          f"{count / seconds['as trained']:8.2f} patches/s "
          f"({seconds['loop'] / seconds['as trained']:.1f}x)")
    print(f"batched, BatchNorm folded only: {count / seconds['folded']:8.2f} patches/s "
          f"({seconds['loop'] / seconds['folded']:.1f}x)")
    print(f"batched, prepared as the pseudo-mask job (folded, fast depthwise gradients): "
          f"{count / seconds['prepared']:8.2f} patches/s")
    per_run = [loop / prepared for loop, prepared in
               zip(runs["loop"], runs["prepared"], strict=True)]
    print(f"speed-up: {seconds['loop'] / seconds['prepared']:.1f}x "
          f"(per run: {', '.join(f'{ratio:.1f}x' for ratio in per_run)})")


if __name__ == "__main__":
    main()
