"""Segment slide: how long Stop takes, against how long a batch takes.

The bundled CMU-1 region at full resolution (2220 x 2967, 48 tiles of 512 with a 64 halo) is
segmented by the project's default segmenter (DeepLabV3+ on the ImageNet Lite0 encoder, random
head: speed does not depend on the weights) in batches of 8. After ``--tiles`` tile events a
stop is requested ``--delay`` seconds later (a user's click lands at any moment of a batch),
and the time until the job has ended (``Done(stopped=True)``) is measured. The baseline, in the
same process and rounds: the time the same predictor takes for one batch of 8 tiles, which is
what a stop waited for when the job only looked at the stop token between batches.

Printed per round and as medians: stop latency, batch time, and their ratio (below 1: Stop no
longer waits for the batch). The machine's load drifts, so rounds alternate the two.

    python benchmarks/bench_stop_latency.py [--tiles 16] [--delay 0.2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slide import SAMPLE, make_predictor  # noqa: E402

BATCH = 8


def stop_latency(predictor, out: Path, tiles: int, delay: float) -> float:
    """Seconds from a stop request during the run to the job's end."""
    from napari_histo_wsss.core.events import Batch, Done, StopToken
    from napari_histo_wsss.core.wsi.slide_inference import segment_slide

    stop = StopToken()
    seen, requested, timer = 0, [], None

    def request():
        requested.append(time.perf_counter())
        stop.request()

    for event in segment_slide(predictor, SAMPLE, out, level=0, tile=512, halo=64,
                               batch_size=BATCH, tissue_mask=False, stop=stop):
        seen += isinstance(event, Batch)
        if seen > tiles and timer is None:
            timer = threading.Timer(delay, request)
            timer.start()
        if isinstance(event, Done):
            if not event.stopped or not requested:
                raise RuntimeError("the slide finished before the stop: use fewer --tiles")
            return time.perf_counter() - requested[0]
    raise RuntimeError("the job ended without Done")


def batch_seconds(predictor) -> float:
    """One batch of real tiles through the predictor alone."""
    import tifffile

    with tifffile.TiffFile(SAMPLE) as tiff:
        region = tiff.series[0].levels[0].asarray()
    tiles = np.stack([region[512 * (i // 4):512 * (i // 4) + 512, 512 * (i % 4):512 * (i % 4)
                             + 512] for i in range(BATCH)])
    from napari_histo_wsss.core.wsi.slide_inference import _predictor_lock

    with _predictor_lock(predictor):  # after the batch a stopped job left running
        began = time.perf_counter()
        predictor.predict_batch(tiles)
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=16, help="tile events before the stop")
    parser.add_argument("--delay", type=float, default=0.2,
                        help="seconds after that tile event that the stop is requested")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = make_predictor("segmenter", "cpu")
    batch_seconds(predictor)  # warm-up
    stops, batches = [], []
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            stops.append(stop_latency(predictor, Path(folder) / f"{round_}.zarr", args.tiles,
                                      args.delay))
            batches.append(batch_seconds(predictor))
            print(f"round {round_ + 1}: stop took {stops[-1]:.2f} s; a batch of {BATCH} "
                  f"takes {batches[-1]:.2f} s")
    stop, batch = statistics.median(stops), statistics.median(batches)
    print(f"median stop {stop:.2f} s (worst {max(stops):.2f} s), median batch {batch:.2f} s, "
          f"stop / batch {stop / batch:.2f}")


if __name__ == "__main__":
    main()
