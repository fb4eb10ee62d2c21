"""Fraction of the device's dense bf16 peak that the segmenter's forward pass reaches.

FLOPs per forward are counted by torch's FlopCounterMode (convolutions and matrix products,
2 per multiply-add) on the real segmenter; the forward then runs in bf16 autocast on a batch of
tiles, as slide inference does, and achieved FLOP/s is divided by the device's peak. On a CPU
it reports achieved GFLOP/s only (no meaningful peak to divide by).

    python benchmarks/bench_peak_fraction.py --device cuda            # DeepLabV3+ Lite0, 512 px
    python benchmarks/bench_peak_fraction.py --device cuda --arch pspnet --batch-size 64
    python benchmarks/bench_peak_fraction.py --device cuda --peak-tflops 989
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_histo_wsss.core.config.run_config import SegmenterConfig
from napari_histo_wsss.core.devices import resolve_device
from napari_histo_wsss.core.models.segmenter import build_segmenter

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
BF16_PEAK_TFLOPS = {
    "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.0,
    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0,
}


def device_peak(name: str) -> float | None:
    """The table's peak for a CUDA device name (longest matching key wins)."""
    matches = [key for key in BF16_PEAK_TFLOPS if key.replace(" ", "").lower()
               in name.replace(" ", "").lower()]
    if not matches and "h100" in name.lower():
        matches = ["H100 SXM"]
    return BF16_PEAK_TFLOPS[max(matches, key=len)] if matches else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="deeplabv3plus")
    parser.add_argument("--encoder", default="tf_efficientnet_lite0")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's dense bf16 peak (default: from the table)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    settings = SegmenterConfig(arch=args.arch, encoder=args.encoder, weights="none")
    model = build_segmenter(settings, num_classes=3).to(device).eval()
    x = torch.randn(args.batch_size, 3, args.tile, args.tile, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(x[:1])
        flops_per_tile = counter.get_total_flops()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            for _ in range(3):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(args.iterations):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started

    tiles_per_second = args.iterations * args.batch_size / seconds
    achieved = flops_per_tile * tiles_per_second
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; {args.arch} {args.encoder}, {args.tile} px tiles, batch "
          f"{args.batch_size}, {'bf16 autocast' if device.type == 'cuda' else 'float32'}")
    print(f"forward: {flops_per_tile / 1e9:.2f} GFLOP per tile, {tiles_per_second:.1f} tiles/s, "
          f"{achieved / 1e12:.3f} TFLOP/s achieved")
    peak = args.peak_tflops or (device_peak(name) if device.type == "cuda" else None)
    if peak:
        print(f"fraction of the {peak:.0f} TFLOP/s dense bf16 peak: {achieved / 1e12 / peak:.4f}")
    elif device.type == "cuda":
        print("peak unknown for this device: give --peak-tflops")


if __name__ == "__main__":
    main()
