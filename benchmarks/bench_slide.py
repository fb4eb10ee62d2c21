"""Slide inference: end-to-end throughput against the model alone, and memory against slide size.

Builds pyramidal JPEG TIFFs of real H&E (the bundled CMU-1 region, mirrored out to the wanted
size, levels 1x/4x/16x like a scanner's) in a temporary folder. For each size a fresh
subprocess loads the project's default segmenter (DeepLabV3+ on tf_efficientnet_lite0, random
weights: speed does not depend on them) and

* runs ``segment_slide`` end to end (tissue mask, reads, model, blending, zarr writes,
  pyramids) and records the wall time and the resident-memory high-water mark;
* times the same predictor on tiles already in memory (the model-only baseline).

Printed ratios: end-to-end / model-only throughput per size (1.0 = the pipeline costs nothing
on top of the model), and peak memory of the large slide / the small one (1.0 = memory does not
grow with the slide).

    python benchmarks/bench_slide.py [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

SAMPLE = (Path(__file__).resolve().parents[1] / "src" / "napari_histo_wsss" / "sample_data"
          / "cmu-1-small-region-pyramid.tif")
MPP = 0.499
PYRAMID = (1, 4, 16)
TILE_WRITE = 512


def build_slide(path: Path, side: int) -> None:
    """A ``side`` x ``side`` pyramidal JPEG TIFF of mirrored real tissue, written tile by tile."""
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(SAMPLE) as tiff:
        region = tiff.series[0].levels[0].asarray()
    partial = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(partial, bigtiff=True) as writer:
        for index, downsample in enumerate(PYRAMID):
            level_side = side // downsample
            height, width = (max(1, round(s / downsample)) for s in region.shape[:2])
            source = np.asarray(Image.fromarray(region).resize((width, height), Image.BOX))
            top = np.concatenate([source, source[:, ::-1]], axis=1)
            period = np.concatenate([top, top[::-1]], axis=0)
            options = dict(
                shape=(level_side, level_side, 3), dtype=np.uint8, tile=(TILE_WRITE, TILE_WRITE),
                photometric="rgb", compression="jpeg", compressionargs={"level": 85},
                maxworkers=os.cpu_count(),
                resolution=(1e4 / (MPP * downsample),) * 2, resolutionunit="CENTIMETER",
            )
            if index == 0:
                options["subifds"] = len(PYRAMID) - 1
            else:
                options["subfiletype"] = 1
            writer.write(_mirrored_tiles(period, level_side), **options)
    partial.replace(path)  # a half-written slide is never reused by --keep


def _mirrored_tiles(period: np.ndarray, side: int):
    """Tiles of the endless mirror tiling of ``period`` (its 2x2 reflection), row by row."""
    rows, cols = period.shape[:2]
    for y in range(0, side, TILE_WRITE):
        ys = np.arange(y, y + TILE_WRITE) % rows
        for x in range(0, side, TILE_WRITE):
            xs = np.arange(x, x + TILE_WRITE) % cols
            yield period[ys[:, None], xs[None, :]]


class TinySegmenter(nn.Module):
    """Two conv layers: for measuring the pipeline's own cost with a model that costs little."""

    input_multiple = 1

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, num_classes, 3, padding=1))

    def forward(self, x: torch.Tensor):
        from napari_histo_wsss.core.models.segmenter import SegmenterOutput

        return SegmenterOutput(self.body(x))


def make_predictor(model: str, device: str):
    from napari_histo_wsss.core.config.run_config import SegmenterConfig
    from napari_histo_wsss.core.data.classes import WSSS4LUAD
    from napari_histo_wsss.core.devices import resolve_device
    from napari_histo_wsss.core.inference.predict import SegmentationPredictor
    from napari_histo_wsss.core.models.segmenter import build_segmenter

    if model == "tiny":
        network = TinySegmenter(WSSS4LUAD.num_classes)
    else:
        network = build_segmenter(SegmenterConfig(weights="none"), WSSS4LUAD.num_classes)
    network = network.to(resolve_device(device)).eval()
    return SegmentationPredictor(network, WSSS4LUAD, mean=(0.5,) * 3, std=(0.25,) * 3,
                                 input_size=512, mpp=None, config={"benchmark": model})


def child(slide_path: str, out_path: str, args) -> dict:
    """One size, in its own process so that the memory high-water mark is this run's."""
    from napari_histo_wsss.core.events import Done, Started
    from napari_histo_wsss.core.wsi.ome_zarr_labels import open_segmentation, read_attrs
    from napari_histo_wsss.core.wsi.slide_inference import segment_slide
    from napari_histo_wsss.core.wsi.slides import open_slide, read_region

    predictor = make_predictor(args.model, args.device)
    warm = np.full((args.batch_size, args.tile, args.tile, 3), 200, np.uint8)
    predictor.predict_batch(warm)
    baseline_mb = _current_rss_mb()

    started = time.perf_counter()
    tiles = 0
    for event in segment_slide(predictor, slide_path, out_path, target_mpp=args.mpp,
                               tile=args.tile, halo=args.halo, batch_size=args.batch_size):
        if isinstance(event, Started):
            tiles = event.batches_per_epoch
        elif isinstance(event, Done):
            assert not event.stopped
    end_to_end_s = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    level = read_attrs(out_path)["level"]  # the level segment_slide read (no resampling here)
    height, width = open_segmentation(out_path).labels[0].shape
    with open_slide(slide_path) as slide:
        preloaded = np.stack([
            read_region(slide, level, height // 3 + args.tile * (i // 4),
                        width // 3 + args.tile * (i % 4), args.tile, args.tile)
            for i in range(args.batch_size)
        ])
    model_tiles = max(args.batch_size, min(tiles, 8 * args.batch_size))
    started = time.perf_counter()
    for _ in range(model_tiles // args.batch_size):
        predictor.predict_batch(preloaded)
    model_s = time.perf_counter() - started
    tile_mpx = args.tile * args.tile / 1e6
    return {
        "tiles": tiles,
        "working_mpx": height * width / 1e6,
        "end_to_end_s": end_to_end_s,
        "end_to_end_mpx_s": tiles * tile_mpx / end_to_end_s,
        "model_mpx_s": (model_tiles // args.batch_size) * args.batch_size * tile_mpx / model_s,
        "peak_rss_mb": peak_mb,
        "baseline_rss_mb": baseline_mb,
    }


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="10k and 20k slides instead of 20k and 40k")
    parser.add_argument("--model", choices=("segmenter", "tiny"), default="segmenter")
    parser.add_argument("--mpp", type=float, default=2.0,
                        help="working resolution (default 2.0 um/px: level 4x of a 0.5 slide)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--halo", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--keep", metavar="DIR", help="build the slides here and keep them")
    parser.add_argument("--child", nargs=2, metavar=("SLIDE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return

    sides = (10240, 20480) if args.quick else (20480, 40960)
    with tempfile.TemporaryDirectory(dir=args.keep) as scratch:
        folder = Path(args.keep) if args.keep else Path(scratch)
        results = {}
        for side in sides:
            slide = folder / f"mirrored-{side}.tif"
            if not slide.exists():
                started = time.perf_counter()
                build_slide(slide, side)
                print(f"built {slide.name}: {slide.stat().st_size / 2**20:.0f} MiB in "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
            command = [sys.executable, __file__, "--child", str(slide),
                       str(folder / f"mirrored-{side}.zarr"), "--device", args.device,
                       "--model", args.model, "--mpp", str(args.mpp), "--tile", str(args.tile),
                       "--halo", str(args.halo), "--batch-size", str(args.batch_size)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[side] = json.loads(output.strip().splitlines()[-1])

    print(f"slide inference, {args.model} model on {args.device} ({os.cpu_count()} CPU cores), "
          f"{args.mpp} um/px, tile {args.tile}, halo {args.halo}, batch {args.batch_size}")
    print(f"{'slide':>12} {'work Mpx':>9} {'tiles':>6} {'e2e s':>7} {'e2e Mpx/s':>10} "
          f"{'model Mpx/s':>12} {'e2e/model':>10} {'peak RSS MB':>12} {'baseline MB':>12}")
    for side, r in results.items():
        print(f"{side:>6}x{side:<5} {r['working_mpx']:>9.1f} {r['tiles']:>6} "
              f"{r['end_to_end_s']:>7.1f} {r['end_to_end_mpx_s']:>10.2f} {r['model_mpx_s']:>12.2f} "
              f"{r['end_to_end_mpx_s'] / r['model_mpx_s']:>10.2f} {r['peak_rss_mb']:>12.0f} "
              f"{r['baseline_rss_mb']:>12.0f}")
    small, large = (results[side] for side in sides)
    def above_baseline(result):
        return max(1.0, result["peak_rss_mb"] - result["baseline_rss_mb"])

    print(f"slide area ratio {(sides[1] / sides[0]) ** 2:.0f}x; peak RSS ratio "
          f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}; above the model-loaded baseline "
          f"{above_baseline(large):.0f} MB vs {above_baseline(small):.0f} MB, ratio "
          f"{above_baseline(large) / above_baseline(small):.2f}")


if __name__ == "__main__":
    main()
