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

``--engines`` instead segments the smaller slide once per installed inference engine and
precision (core/inference/engines.py) and prints each one's throughput as a ratio to torch fp32
in the same run, the share of pixels labelled as torch fp32 labels them, and the model's FLOP/s
against the CPU's peak (cores x clock x FLOPs per cycle: FMA units x vector lanes x 2).

    python benchmarks/bench_slide.py [--device cpu] [--quick] [--engines]
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


NORMALISATION = {"mean": (123.7, 116.3, 103.5), "std": (58.4, 57.1, 57.4)}


def make_network(model: str):
    """The benchmarked network: ``segmenter`` has the shipped ImageNet Lite0 encoder (real
    features, so engines are compared on realistic activations) and a seeded random head."""
    from napari_histo_wsss.core.config.run_config import SegmenterConfig
    from napari_histo_wsss.core.data.classes import WSSS4LUAD
    from napari_histo_wsss.core.models.segmenter import build_segmenter

    torch.manual_seed(0)
    if model == "tiny":
        return TinySegmenter(WSSS4LUAD.num_classes)
    return build_segmenter(SegmenterConfig(), WSSS4LUAD.num_classes)


def make_predictor(model: str, device: str, engine: str = "torch", precision: str | None = None,
                   cache_folder: str | None = None):
    from napari_histo_wsss.core.data.classes import WSSS4LUAD
    from napari_histo_wsss.core.devices import resolve_device
    from napari_histo_wsss.core.inference.engine_choice import build_engine
    from napari_histo_wsss.core.inference.engines import ExportCache
    from napari_histo_wsss.core.inference.predict import SegmentationPredictor

    device = resolve_device(device)
    network = make_network(model).to(device).eval()
    cache = ExportCache(Path(cache_folder), f"bench-{model}") if cache_folder else None
    runner = build_engine(network, engine, precision, device=device, cache=cache,
                          **NORMALISATION)
    if runner.note:
        print(runner.note, file=sys.stderr)
    return SegmentationPredictor(network, WSSS4LUAD, input_size=512, mpp=None, engine=runner,
                                 config={"benchmark": model}, **NORMALISATION)


def child(slide_path: str, out_path: str, args) -> dict:
    """One size, in its own process so that the memory high-water mark is this run's."""
    from napari_histo_wsss.core.events import Done, Started
    from napari_histo_wsss.core.wsi.ome_zarr_labels import open_segmentation, read_attrs
    from napari_histo_wsss.core.wsi.slide_inference import segment_slide
    from napari_histo_wsss.core.wsi.slides import open_slide, read_region

    predictor = make_predictor(args.model, args.device, args.engine, args.precision,
                               str(Path(out_path).parent))
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
        "engine": predictor.engine.label,
    }


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(args, slide: Path, out: Path, engine: str = "torch",
              precision: str = "fp32") -> dict:
    command = [sys.executable, __file__, "--child", str(slide), str(out), "--device",
               args.device, "--model", args.model, "--mpp", str(args.mpp), "--tile",
               str(args.tile), "--halo", str(args.halo), "--batch-size", str(args.batch_size),
               "--engine", engine, "--precision", precision]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def compare_engines(args, side: int) -> None:
    """Every installed engine and precision on one slide, ratios against torch fp32."""
    from napari_histo_wsss.core.inference.engine_choice import candidates
    from napari_histo_wsss.core.wsi.ome_zarr_labels import open_segmentation

    with tempfile.TemporaryDirectory(dir=args.keep) as scratch:
        folder = Path(args.keep) if args.keep else Path(scratch)
        slide = folder / f"mirrored-{side}.tif"
        if not slide.exists():
            build_slide(slide, side)
        results, labels = {}, {}
        for engine, precision in candidates(None):
            out = folder / f"mirrored-{side}-{engine}-{precision}.zarr"
            results[engine, precision] = run_child(args, slide, out, engine, precision)
            labels[engine, precision] = open_segmentation(out).labels[0].compute()
    flops = forward_flops(args.model, args.tile)
    print(f"engines on a {side}x{side} slide, {args.model} model, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} threads, {args.mpp} um/px, tile {args.tile}, batch "
          f"{args.batch_size}; {flops / 1e9:.2f} GFLOP per tile")
    print(f"{'engine':>18} {'runs as':>18} {'e2e Mpx/s':>10} {'x torch':>8} {'model Mpx/s':>12} "
          f"{'x torch':>8} {'labels = fp32':>14} {'GFLOP/s':>8} {'% peak':>7}")
    baseline = results["torch", "fp32"]
    reference = labels["torch", "fp32"]
    for (engine, precision), r in results.items():
        tiles_per_s = r["model_mpx_s"] / (args.tile * args.tile / 1e6)
        achieved = flops * tiles_per_s
        peak = cpu_peak_flops(precision, args.fma_units)
        same = float(np.mean(labels[engine, precision] == reference))
        print(f"{engine + ' ' + precision:>18} {r['engine']:>18} {r['end_to_end_mpx_s']:>10.2f} "
              f"{r['end_to_end_mpx_s'] / baseline['end_to_end_mpx_s']:>8.2f} "
              f"{r['model_mpx_s']:>12.2f} {r['model_mpx_s'] / baseline['model_mpx_s']:>8.2f} "
              f"{100 * same:>13.2f}% {achieved / 1e9:>8.1f} {100 * achieved / peak:>6.1f}%")
    fp32, bf16 = (flops_per_cycle(p, args.fma_units) for p in ("fp32", "bf16"))
    print(f"peak: {os.cpu_count()} cores x {cpu_ghz():.2f} GHz x {fp32} fp32 / {bf16} bf16 "
          "FLOP per cycle per core (bf16: AMX tiles where present, else AVX-512 BF16 at twice "
          "fp32, else as fp32)")


def forward_flops(model: str, tile: int) -> float:
    """FLOPs of one tile's forward pass (torch's FlopCounterMode: convolutions, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    network = make_network(model).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        network(torch.zeros(1, 3, tile, tile))
    return float(counter.get_total_flops())


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


#: Intel AMX's tile multiply: 1,024 bf16 FLOP per cycle per core (Intel's data sheets for
#: Sapphire Rapids and later), far above the vector units' rate.
AMX_BF16_FLOP_PER_CYCLE = 1024


def cpu_ghz() -> float:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":", 1)[1]) / 1000
    return float("nan")


def flops_per_cycle(precision: str, fma_units: int) -> int:
    """Per core: FMA units x fp32 lanes of the widest vectors x 2 (multiply and add)."""
    flags = _cpu_flags()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = fma_units * lanes * 2
    if precision != "bf16":
        return per_cycle
    if "amx_bf16" in flags:
        return AMX_BF16_FLOP_PER_CYCLE
    return per_cycle * 2 if "avx512_bf16" in flags else per_cycle


def cpu_peak_flops(precision: str, fma_units: int) -> float:
    return (os.cpu_count() or 1) * cpu_ghz() * 1e9 * flops_per_cycle(precision, fma_units)


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
    parser.add_argument("--engine", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--engines", action="store_true",
                        help="compare the installed inference engines on the smaller slide")
    parser.add_argument("--fma-units", type=int, default=2,
                        help="FMA units per core, for the CPU's peak (default 2)")
    parser.add_argument("--child", nargs=2, metavar=("SLIDE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return

    sides = (10240, 20480) if args.quick else (20480, 40960)
    if args.engines:
        compare_engines(args, sides[0])
        return
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
            results[side] = run_child(args, slide, folder / f"mirrored-{side}.zarr")

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
