"""How long napari's main thread stands still while the widgets open and work.

A 10 ms QTimer runs on the main thread the whole time; every tick that arrives late by more
than its period means the event loop was busy (a frozen window for the user). The script opens
the first widget in a fresh process (torch not imported yet), then drives each long job and
image step of the workflow on the bundled WSSS4LUAD sample and CMU slide with tiny budgets,
and prints per phase: how long it took, the worst and 99th-percentile lateness, and how many
ticks were more than 200 ms late.

Run it with a display, e.g.::

    xvfb-run -a -s "-screen 0 1920x1080x24" python benchmarks/bench_freezes.py

The pictures of docs/widgets.md come from ``scripts/screenshots.py``, not from here: a
screenshot stalls the event loop it would be measuring.

The figures depend on the machine and on what else runs on it: compare phases within one
run, and runs on the same machine.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "napari_histo_wsss" / "sample_data"
TIMER_MS = 10
STALL_MS = 200
TINY = {"epochs": 1, "batch_size": 8, "input_size": 64}
#: The phases after the classifier's, in the order they run (``--only`` picks some).
JOB_PHASES = ("pseudo-masks", "segmenter", "compare", "slide")


class LatencyProbe:
    """A main-thread timer that records how late each 10 ms tick arrives.

    With ``trace``, every tick re-arms faulthandler's watchdog (a C thread that needs no GIL):
    when the main thread misses ticks for STALL_MS, the stacks of all threads at that moment
    are written to ``trace``, which says what held the main thread.
    """

    def __init__(self, trace=None):
        from qtpy.QtCore import QTimer

        self.trace = trace
        self.lateness_ms: list[float] = []
        self._last = time.perf_counter()
        self._timer = QTimer()
        self._timer.setInterval(TIMER_MS)
        self._timer.timeout.connect(self._tick)
        self._timer.start()

    def _tick(self):
        now = time.perf_counter()
        self.lateness_ms.append(max(0.0, (now - self._last) * 1000 - TIMER_MS))
        self._last = now
        if self.trace is not None:
            faulthandler.dump_traceback_later(STALL_MS / 1000, file=self.trace)

    def mark(self) -> int:
        return len(self.lateness_ms)


class Phases:
    """Runs the event loop until a condition holds and records each phase's lateness."""

    def __init__(self, app, probe: LatencyProbe):
        self.app, self.probe = app, probe
        self.rows: list[tuple[str, float, list[float]]] = []

    def wait(self, condition, timeout_s: float = 900.0) -> None:
        end = time.perf_counter() + timeout_s
        while not condition():
            if time.perf_counter() > end:
                raise TimeoutError("phase did not finish")
            self.app.processEvents()
            time.sleep(0.001)

    def run(self, name: str, start, done=lambda: True, settle_s: float = 0.0) -> None:
        """Call ``start`` (on the main thread, as a click would), then run the loop until
        ``done`` and ``settle_s`` more seconds."""
        first = self.probe.mark()
        began = time.perf_counter()
        self.probe._last = began
        start()
        self.wait(done)
        seconds = time.perf_counter() - began
        settle_end = time.perf_counter() + settle_s
        self.wait(lambda: time.perf_counter() >= settle_end)
        self.app.processEvents()
        late = self.probe.lateness_ms[first:]
        if not self.rows:
            print(f"{'phase':<38} {'s':>6} {'max ms':>7} {'p99 ms':>7} {'>200ms':>7}")
        self.rows.append((name, seconds, late))
        ordered = sorted(late) or [0.0]
        p99 = ordered[min(len(ordered) - 1, int(0.99 * (len(ordered) - 1)))]
        stalls = [round(value) for value in late if value > STALL_MS]
        listed = f"  ({', '.join(map(str, stalls))} ms)" if stalls else ""
        print(f"{name:<38} {seconds:6.2f} {max(ordered):7.0f} {p99:7.0f} {len(stalls):7d}{listed}",
              flush=True)


def make_run(folder: Path) -> Path:
    """A tiny run with a classifier, pseudo-masks and two segmenters (core API, no GUI)."""
    from napari_histo_wsss.core.events import run_to_completion
    from napari_histo_wsss.core.pipeline import prepare_run, run_pipeline

    run, config, layout = prepare_run(SAMPLE / "wsss4luad", folder, "cam-ce", device="cpu",
                                      classifier=TINY, segmenter=TINY)
    run_to_completion(run_pipeline(run, config, layout, strategies=["ce", "onss"]))
    return folder


def classifier_phases(phases, viewer, scratch, only_open: bool = False) -> None:
    from napari_histo_wsss.widgets.train_classifier import TrainClassifierWidget

    widgets = {}

    def open_first():
        widgets["classifier"] = TrainClassifierWidget(viewer)
        viewer.window.add_dock_widget(widgets["classifier"], name="1. Train classifier")

    phases.run("open first widget (Train classifier)", open_first)
    phases.run("background import of torch/pyqtgraph", lambda: None,
               done=lambda: widgets["classifier"].progress.loss_plot is not None)
    if only_open:
        return
    classifier = widgets["classifier"]
    classifier.dataset.value = SAMPLE / "wsss4luad"
    classifier.run_folder.value = scratch / "classifier-run"
    classifier.method.value = "cam-ce"
    classifier.epochs.value = 2
    classifier.batch_size.value = TINY["batch_size"]
    classifier.input_size.value = 96
    phases.run("train classifier (2 epochs)", classifier.toggle_button.click,
               done=lambda: not classifier.runner.busy)
    viewer.layers.clear()  # the sample shown behind the classifier's picture


def pseudo_mask_phases(phases, viewer, run_folder, steps: int) -> None:
    from napari_histo_wsss.widgets.pseudo_masks import PseudoMaskWidget

    masks = PseudoMaskWidget(viewer)
    viewer.window.add_dock_widget(masks, name="2. Pseudo-masks")
    masks.run_folder.value = run_folder
    phases.run("pseudo-masks: generate (42 patches)", masks.toggle_button.click,
               done=lambda: not masks.runner.busy)
    masks.source.value = "validation images"
    for index in range(steps):
        phases.run(f"pseudo-masks: val image {index}",
                   lambda index=index: setattr(masks.index, "value", index),
                   done=lambda: not (masks.preview_runner.busy or masks._pending_preview
                                     or masks.showing))
    viewer.layers["pseudo-mask"].visible = False
    for name in ("tumor", "stroma"):
        viewer.layers[f"CAM {name}"].visible = True
    viewer.layers.selection.active = viewer.layers["CAM tumor"]


def segmenter_phases(phases, viewer, run_folder) -> None:
    from napari_histo_wsss.widgets.train_segmenter import TrainSegmenterWidget

    segmenter = TrainSegmenterWidget(viewer)
    viewer.window.add_dock_widget(segmenter, name="3. Train segmenter")
    segmenter.run_folder.value = run_folder
    segmenter.strategies.value = ["ce", "onss"]
    segmenter.epochs.value = 1
    segmenter.batch_size.value = TINY["batch_size"]
    segmenter.input_size.value = 96
    phases.run("train segmenter (ce, onss; 1 epoch)", segmenter.toggle_button.click,
               done=lambda: not segmenter.runner.busy)


def compare_phases(phases, viewer, run_folder) -> None:
    from napari_histo_wsss.widgets.compare import CompareWidget

    viewer.layers.clear()
    compare = CompareWidget(viewer)
    viewer.window.add_dock_widget(compare, name="4. Compare strategies")
    compare.run_folder.value = run_folder
    compare.source.value = "validation image"
    compare.index.value = 4
    phases.run("compare: 2 strategies on a val image", compare.toggle_button.click,
               done=lambda: not (compare.runner.busy or compare.showing))
    phases.run("compare: grid on", lambda: setattr(compare.grid, "value", True))
    compare.grid.value = False
    compare.source.value = "training patch"
    compare.index.value = 2
    # As scripts/screenshots.py does: napari 0.9.2 under Xvfb's software OpenGL segfaults in
    # its draw when a comparison replaces the val image's layers in place.
    viewer.layers.clear()
    phases.run("compare: 2 strategies on a patch", compare.toggle_button.click,
               done=lambda: not (compare.runner.busy or compare.showing))
    viewer.layers["trust: onss"].visible = True
    viewer.layers.selection.active = viewer.layers["trust: onss"]
    viewer.layers.clear()


def slide_phases(phases, viewer, run_folder, scratch) -> None:
    from napari_histo_wsss._reader import read_slide
    from napari_histo_wsss.widgets.segment_slide import SegmentSlideWidget

    data, kwargs, _ = read_slide(str(SAMPLE / "cmu-1-small-region-pyramid.tif"))[0]
    viewer.add_image(data, **kwargs)
    viewer.reset_view()
    slide = SegmentSlideWidget(viewer)
    viewer.window.add_dock_widget(slide, name="5. Segment slide")
    slide.run_folder.value = run_folder
    slide.strategy.value = "onss"
    slide.output.value = scratch / "slide.zarr"
    phases.run("segment slide (CMU-1 region)", slide.toggle_button.click,
               done=lambda: not (slide.runner.busy or slide.showing))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--browse-steps", type=int, default=6)
    parser.add_argument("--idle", type=float, default=30.0,
                        help="seconds of the idle baseline measured first")
    parser.add_argument("--only-open", action="store_true",
                        help="stop after the first widget and its background import")
    parser.add_argument("--trace-stalls", type=Path, metavar="FILE",
                        help="write every thread's stack to FILE at each stall over 200 ms")
    parser.add_argument("--skip-slide", action="store_true",
                        help="leave out the Segment slide phase")
    parser.add_argument("--only", nargs="+", choices=JOB_PHASES, metavar="PHASE",
                        help=f"after the first widget, run only these of {', '.join(JOB_PHASES)}")
    args = parser.parse_args()
    faulthandler.enable()  # a crash in napari's drawing shows where it happened
    os.environ.setdefault("HISTO_WSSS_DEVICE", "cpu")
    scratch = Path(tempfile.mkdtemp(prefix="bench-freezes-"))
    os.environ.setdefault("HISTO_WSSS_CONFIG_DIR", str(scratch / "config"))

    import sys

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    app.processEvents()
    trace = open(args.trace_stalls, "w") if args.trace_stalls else None  # noqa: SIM115
    phases = Phases(app, LatencyProbe(trace))
    torch_before = "torch" in sys.modules
    # The machine's own share: a viewer doing nothing, the same timer. A busy machine (other
    # processes on the cores) makes ticks late with no widget involved; compare against it.
    idle_end = time.perf_counter() + args.idle
    phases.run("idle viewer (baseline)", lambda: None,
               done=lambda: time.perf_counter() >= idle_end)
    classifier_phases(phases, viewer, scratch, args.only_open)
    print(f"torch imported before the first widget: {torch_before}", flush=True)
    if args.only_open:
        viewer.close()
        return
    run_folder = make_run(scratch / "run")  # main thread, outside any phase
    chosen = [name for name in JOB_PHASES if name in (args.only or JOB_PHASES)
              and not (args.skip_slide and name == "slide")]
    for name in chosen:
        if name == "pseudo-masks":
            pseudo_mask_phases(phases, viewer, run_folder, args.browse_steps)
        elif name == "segmenter":
            segmenter_phases(phases, viewer, scratch / "classifier-run")
        elif name == "compare":
            compare_phases(phases, viewer, run_folder)
        else:
            slide_phases(phases, viewer, run_folder, scratch)
    faulthandler.cancel_dump_traceback_later()
    viewer.close()


if __name__ == "__main__":
    main()
