"""Training in a napari thread worker versus in the main thread, with a viewer shown.

micro-sam turned its thread workers off after a slowdown with napari >= 0.5 (micro-sam #739,
#740); the widgets here train in workers. This runs the same N real classifier training steps
on the bundled WSSS4LUAD patches twice per repeat, once driven from the main thread (the GUI is
frozen meanwhile) and once through the widgets' ``JobRunner`` (a napari thread worker), and
prints the time of the N steps in each mode, their ratio, and how late a 10 ms timer on the
main thread fired while the steps ran (the event-loop latency a user feels).

Run it with a display, e.g.::

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_worker_responsiveness.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "napari_histo_wsss" / "sample_data" / \
    "wsss4luad"
TIMER_MS = 10


def training_job(run_folder: Path, steps: int, input_size: int, batch_size: int, stamps: list):
    """A job factory: the first ``steps`` steps of a fresh classifier run, then a stop.

    ``stamps`` receives the time of the Started event and of every Batch, taken in the thread
    that runs the steps, so delivery delays to the GUI are not counted as training time.
    """

    def make_job(stop):
        from napari_histo_wsss.core.devices import resolve_device
        from napari_histo_wsss.core.events import Batch, Started
        from napari_histo_wsss.core.pipeline import prepare_run
        from napari_histo_wsss.core.stage1.train_classifier import train_classifier

        run, config, layout = prepare_run(
            SAMPLE, run_folder, "cam-ce", device="cpu",
            classifier={"epochs": 1 + steps // 5, "batch_size": batch_size,
                        "input_size": input_size})
        done = 0
        for event in train_classifier(run, config, layout.patches(),
                                      device=resolve_device("cpu"), stop=stop):
            if isinstance(event, Started):
                stamps.append(time.perf_counter())
            elif isinstance(event, Batch):
                stamps.append(time.perf_counter())
                done += 1
                if done == steps:
                    stop.request()
            yield event

    return make_job


class LatencyProbe:
    """A main-thread timer that records how late each 10 ms tick arrives."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.lateness_ms: list[float] = []
        self._last = 0.0
        self._timer = QTimer()
        self._timer.setInterval(TIMER_MS)
        self._timer.timeout.connect(self._tick)

    def _tick(self):
        now = time.perf_counter()
        self.lateness_ms.append(max(0.0, (now - self._last) * 1000 - TIMER_MS))
        self._last = now

    def start(self):
        self.lateness_ms.clear()
        self._last = time.perf_counter()  # a frozen event loop shows as one very late tick
        self._timer.start()

    def stop(self):
        self._timer.stop()


def steps_seconds(stamps: list[float], steps: int) -> float:
    """Seconds from the Started event to the N-th step (setup and checkpointing excluded)."""
    return stamps[steps] - stamps[0]


def run_in_main_thread(make_job, probe: LatencyProbe, app) -> None:
    from napari_histo_wsss.core.events import StopToken

    probe.start()
    for _ in make_job(StopToken()):
        pass  # the GUI gets no events until the job is over: that is the point of comparison
    app.processEvents()
    probe.stop()


def run_in_worker(make_job, probe: LatencyProbe, app) -> None:
    from napari_histo_wsss.widgets._jobs import JobRunner

    runner = JobRunner("benchmark")
    probe.start()
    runner.start(make_job, "cpu")
    while runner.busy:
        app.processEvents()
        time.sleep(0.001)
    probe.stop()
    if runner.error:
        raise RuntimeError(runner.error)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per mode")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HISTO_WSSS_DEVICE", "cpu")

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_histo_wsss.widgets._jobs import avoid_triton_llvm_clash

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    avoid_triton_llvm_clash()
    probe = LatencyProbe()
    modes = {"main thread": run_in_main_thread, "thread worker": run_in_worker}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    lateness: dict[str, list[float]] = {mode: [] for mode in modes}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.steps} steps of {args.batch_size} x {args.input_size}px, "
          f"{args.repeats} repeats (+1 warm-up)")
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats + 1):
            order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
            for mode in order:
                stamps: list[float] = []
                folder = Path(scratch) / f"{mode.replace(' ', '-')}-{repeat}"
                job = training_job(folder, args.steps, args.input_size, args.batch_size, stamps)
                modes[mode](job, probe, app)
                if repeat == 0:
                    continue  # warm-up: imports, first allocations
                seconds[mode].append(steps_seconds(stamps, args.steps))
                lateness[mode].extend(probe.lateness_ms)
    viewer.close()

    print(f"{'mode':<14} {'median s':>9} {'runs':>24}  timer lateness ms (median / p95 / max)")
    for mode in modes:
        runs = ", ".join(f"{value:.2f}" for value in seconds[mode])
        late = lateness[mode]
        print(f"{mode:<14} {statistics.median(seconds[mode]):9.2f} {runs:>24}  "
              f"{statistics.median(late) if late else 0:.1f} / {percentile(late, 0.95):.1f} / "
              f"{max(late) if late else 0:.1f}")
    ratio = statistics.median(seconds["thread worker"]) / statistics.median(seconds["main thread"])
    print(f"worker / main-thread time ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
