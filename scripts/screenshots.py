"""Retake the widget screenshots of docs/widgets.md from real jobs in a real napari window.

    xvfb-run -a -s "-screen 0 1920x1080x24" python scripts/screenshots.py

It trains a small run on the bundled WSSS4LUAD sample *through the widgets* (classifier,
pseudo-masks, two segmenter strategies), then browses, compares and segments the bundled
CMU-1 slide, and saves one PNG of the whole window per state into docs/images/. The run folder
(``--run``, default ``build/screenshots-run``) is made afresh by a full call and kept, so
``--only`` can retake the pictures that show no job of the run's own (compare, segment_slide,
file_open) from it. Widget settings go to a private folder, so the user's remembered settings
neither leak in nor get overwritten.

Every step waits for the widget's worker job by running Qt's event loop until it ends, with a
timeout that raises an error naming the step (a starved CPU needs ``--timeout`` raised).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
SAMPLE = ROOT / "src" / "napari_histo_wsss" / "sample_data"
DATASET = SAMPLE / "wsss4luad"
SLIDE = SAMPLE / "cmu-1-small-region-pyramid.tif"
PLUGIN = "napari-histo-wsss"
WINDOW = (1600, 1060)
MAX_BYTES = 400_000

# The run: small enough for a few minutes of CPU, large enough for maps that mean something.
METHOD = "cam-ce"
CLASSIFIER = {"epochs": 8, "batch_size": 8, "input_size": 96}
SEGMENTER = {"epochs": 10, "batch_size": 8, "input_size": 128}
STRATEGIES = ["ce", "onss"]
VAL_IMAGE = "21.png"  # tumour, stroma and normal tissue in one validation image
COMPARE_IMAGE = "00.png"  # tumour and stroma, where the two strategies differ most
TRAIN_PATCH = "test21-0-0-[1, 1, 0].png"  # a training patch labelled tumour + stroma
CORRECTIONS_IMAGE = "00.png"  # tumour and stroma: stroma regions called tumour
SLIDE_LEVEL = 1  # the slide's 2x-downsampled level (about 1 um/px)
SLIDE_TILE, SLIDE_HALO, SLIDE_BATCH = 256, 32, 8


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _spin(milliseconds: int) -> None:
    """Run Qt's event loop for a moment, as napari's own loop would (deferred deletions,
    timers and worker signals are all handled; processEvents alone skips deletions)."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(milliseconds, loop.quit)
    loop.exec()


def wait_until(predicate, what: str, timeout: float) -> None:
    """Run the event loop until ``predicate()`` holds; a clear error after ``timeout`` s."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s (raise --timeout on a "
                               "busy machine)")
        _spin(20)


def settle(seconds: float = 1.0) -> None:
    """Let napari draw (layer loading is asynchronous; the canvas repaints on events)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        _spin(20)


def run_job(widget, runner, what: str, timeout: float) -> None:
    """Press the widget's start button and wait for its job; an error if it did not finish."""
    from napari_histo_wsss.widgets._jobs import JobState

    log(f"{what}: started")
    widget.toggle_button.click()
    if runner.state is not JobState.RUNNING:
        raise RuntimeError(f"{what}: did not start ({widget.progress.status.text()})")
    wait_until(lambda: not runner.busy, what, timeout)
    if runner.state is not JobState.DONE:
        raise RuntimeError(f"{what}: ended {runner.state.value}: {runner.error or ''}")
    wait_until(lambda: not getattr(widget, "showing", False), f"{what}: layers", timeout)
    log(f"{what}: done · {widget.progress.status.text()}")


def save(viewer, name: str) -> Path:
    """The whole window (docks included) as ``docs/images/<name>``, under MAX_BYTES."""
    from PIL import Image

    settle(1.5)
    pixels = viewer.screenshot(canvas_only=False, flash=False)
    image = Image.fromarray(pixels).convert("RGB")
    path = IMAGES / name
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:  # UI colours survive a 256-colour palette well
        image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True)
    while path.stat().st_size > MAX_BYTES:
        image = image.resize((image.width * 7 // 8, image.height * 7 // 8), Image.LANCZOS)
        image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True)
    log(f"saved {path.relative_to(ROOT)} ({image.width}x{image.height}, "
        f"{path.stat().st_size // 1000} KB)")
    return path


def dock(viewer, widget_class, name: str):
    widget = widget_class(viewer)
    dock_widget = viewer.window.add_dock_widget(widget, name=name, area="right")
    settle(0.5)
    return widget, dock_widget


def undock(viewer, dock_widget) -> None:
    viewer.window.remove_dock_widget(dock_widget)
    settle(0.2)


def follows_shared_run(widget, run: Path) -> None:
    """A widget opened after the run folder was chosen starts on it (one run for all)."""
    if Path(widget.run_folder.value) != run:
        raise RuntimeError(f"{type(widget).__name__} opened on {widget.run_folder.value}, "
                           f"not on the shared run folder {run}")


def use_run(widget, run: Path) -> None:
    """The run folder, for a step that may run alone (``--only``)."""
    if Path(widget.run_folder.value) != run:
        widget.run_folder.value = run


def select(viewer, layer_name: str) -> None:
    """Select one layer: the legend dock follows the selection."""
    layer = viewer.layers[layer_name]
    viewer.layers.selection.active = layer
    settle(0.5)


# -- the steps ------------------------------------------------------------------------------------
def train_classifier(viewer, run: Path, timeout: float) -> None:
    from napari_histo_wsss.widgets.train_classifier import TrainClassifierWidget

    viewer.open_sample(PLUGIN, "wsss4luad-patches")  # tissue to look at while it trains
    widget, dock_widget = dock(viewer, TrainClassifierWidget, "1. Train classifier")
    viewer.reset_view()  # after docking: fit the canvas that is left
    widget.dataset.value = DATASET
    widget.run_folder.value = run  # a new folder; the other widgets follow it
    widget.method.value = METHOD
    set_budget(widget, CLASSIFIER)
    run_job(widget, widget.runner, "train classifier", timeout)
    save(viewer, "widget_train_classifier.png")
    undock(viewer, dock_widget)
    viewer.layers.clear()


def set_budget(widget, budget: dict) -> None:
    """A training widget's epochs, batch size and input size (the pictures' small budget)."""
    for field in ("epochs", "batch_size", "input_size"):
        getattr(widget, field).value = budget[field]


def pseudo_masks(viewer, run: Path, timeout: float) -> None:
    from napari_histo_wsss.widgets.pseudo_masks import PseudoMaskWidget

    widget, dock_widget = dock(viewer, PseudoMaskWidget, "2. Pseudo-masks")
    follows_shared_run(widget, run)
    run_job(widget, widget.runner, "generate pseudo-masks", timeout)
    widget.source.value = "validation images"
    index = sorted(p.name for p in (DATASET / "val" / "img").glob("*.png")).index(VAL_IMAGE)
    widget.index.value = index
    widget.show_button.clicked.emit()
    wait_until(lambda: not widget.preview_runner.busy and "ground truth" in viewer.layers
               and VAL_IMAGE in widget.view_info.value, "class maps of a val image", timeout)
    viewer.reset_view()
    select(viewer, "pseudo-mask")
    save(viewer, "widget_pseudo_masks.png")

    # The class maps: the two classes of the image switched on, the pseudo-mask off.
    viewer.layers["pseudo-mask"].visible = False
    for name in ("CAM tumor", "CAM stroma"):
        viewer.layers[name].visible = True
    select(viewer, "CAM tumor")
    save(viewer, "widget_pseudo_masks_cams.png")
    undock(viewer, dock_widget)


def train_segmenter(viewer, run: Path, timeout: float) -> None:
    from napari_histo_wsss.widgets.train_segmenter import TrainSegmenterWidget

    # The layers of the previous step stay: the val image with its pseudo-mask and outlines.
    viewer.layers["pseudo-mask"].visible = True
    for name in ("CAM tumor", "CAM stroma"):
        viewer.layers[name].visible = False
    widget, dock_widget = dock(viewer, TrainSegmenterWidget, "3. Train segmenter")
    follows_shared_run(widget, run)
    widget.strategies.value = STRATEGIES
    set_budget(widget, SEGMENTER)
    run_job(widget, widget.runner, "train segmenter", timeout)
    select(viewer, "pseudo-mask")
    save(viewer, "widget_train_segmenter.png")
    undock(viewer, dock_widget)
    viewer.layers.clear()


def compare(viewer, run: Path, timeout: float) -> None:
    from napari_histo_wsss.widgets.compare import CompareWidget

    widget, dock_widget = dock(viewer, CompareWidget, "4. Compare strategies")
    use_run(widget, run)
    widget.engine.value = "torch"  # no export/calibration of an engine for two pictures
    widget.strategies.value = STRATEGIES
    widget.source.value = "validation image"
    widget.index.value = sorted(p.name for p in (DATASET / "val" / "img").glob("*.png")).index(
        COMPARE_IMAGE)
    widget.grid.value = False
    run_job(widget, widget.runner, "compare on a val image", timeout)
    # Swapped in the layer list, as the docs say: ONSS's prediction instead of CE's.
    viewer.layers["prediction: ce"].visible = False
    viewer.layers["prediction: onss"].visible = True
    select(viewer, "prediction: onss")
    save(viewer, "widget_compare.png")

    widget.source.value = "training patch"
    widget.index.value = sorted(p.name for p in (DATASET / "train").glob("*.png")).index(
        TRAIN_PATCH)
    # A fresh viewer for the patch: napari 0.9.2 under Xvfb/Mesa segfaults in its GL draw when
    # this comparison replaces the val image's layers in place (reproduced without the plugin).
    viewer.layers.clear()
    run_job(widget, widget.runner, "compare on a training patch", timeout)
    # Side by side: the patch, its pseudo-mask, ONSS's prediction and ONSS's trust map (the
    # legend shows the trust map's key).
    viewer.layers["prediction: ce"].visible = False
    for name in ("pseudo-mask (compare)", "prediction: onss", "trust: onss"):
        viewer.layers[name].visible = True
    widget.grid.value = True
    select(viewer, "trust: onss")
    save(viewer, "widget_compare_trust.png")
    widget.grid.value = False
    undock(viewer, dock_widget)
    viewer.layers.clear()


def segment_slide(viewer, run: Path, timeout: float) -> None:
    from napari_histo_wsss.core.events import Batch, Started
    from napari_histo_wsss.widgets._jobs import JobState
    from napari_histo_wsss.widgets.segment_slide import BEST, SegmentSlideWidget

    viewer.open(str(SLIDE), plugin=PLUGIN)
    viewer.reset_view()
    widget, dock_widget = dock(viewer, SegmentSlideWidget, "5. Segment slide")
    use_run(widget, run)
    widget.strategy.value = BEST
    out = run / "slides" / "screenshot.zarr"
    shutil.rmtree(out, ignore_errors=True)  # start from nothing: the "running" picture
    widget.output.value = out
    widget.level.value = SLIDE_LEVEL
    widget.tile.value = SLIDE_TILE
    widget.halo.value = SLIDE_HALO
    widget.batch_size.value = SLIDE_BATCH
    widget.engine.value = "torch"
    batches, total = [], []
    widget.runner.event.connect(lambda e: isinstance(e, Batch) and batches.append(e.index))
    widget.runner.event.connect(
        lambda e: isinstance(e, Started) and total.append(e.batches_per_epoch))
    log("segment slide: started")
    widget.toggle_button.click()
    # About half-way: the live layer has filled in part of the slide.
    wait_until(lambda: (total and len(batches) >= total[0] // 2) or not widget.runner.busy,
               "segment slide (half-way)", timeout)
    if not widget.runner.busy:
        raise RuntimeError(f"segment slide ended before half-way: {widget.runner.state.value} "
                           f"{widget.runner.error or ''}")
    settle(1.0)  # the live layer refreshes every 0.5 s
    save(viewer, "widget_segment_slide_running.png")
    wait_until(lambda: not widget.runner.busy, "segment slide", timeout)
    if widget.runner.state is not JobState.DONE:
        raise RuntimeError(f"segment slide ended {widget.runner.state.value}: "
                           f"{widget.runner.error or ''}")
    wait_until(lambda: not widget.showing, "segment slide: layers", timeout)
    log(f"segment slide: done · {widget.progress.status.text()}")
    select(viewer, widget.live_layer.name)
    save(viewer, "widget_segment_slide.png")
    undock(viewer, dock_widget)
    viewer.layers.clear()


def corrections(viewer, run: Path, timeout: float) -> None:
    """One stroke on a val image's largest wrong region (the benchmark's simulated annotator,
    with the image's true mask) and the prediction that follows it without retraining."""
    import numpy as np

    from napari_histo_wsss.widgets._jobs import avoid_triton_llvm_clash

    avoid_triton_llvm_clash()  # the annotator's imports pull in torchvision, and with it triton
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_corrections import simulated_strokes
    from napari_histo_wsss.core.data.datasets import read_mask
    from napari_histo_wsss.widgets.corrections import (
        PAINT_LAYER,
        PREDICTION_LAYER,
        CorrectionsWidget,
    )

    widget, dock_widget = dock(viewer, CorrectionsWidget, "6. Correct and retrain")
    use_run(widget, run)
    path = next((p for p in widget.image.choices if Path(p).name == CORRECTIONS_IMAGE), None)
    if path is None:
        raise RuntimeError(f"the run's val images have no {CORRECTIONS_IMAGE} to correct")
    widget.image.value = path
    widget.open_image()
    wait_until(lambda: np.asarray(viewer.layers[PREDICTION_LAYER].data).any(),
               "corrections: the image's prediction", timeout)
    predicted = np.asarray(viewer.layers[PREDICTION_LAYER].data).copy()
    truth = read_mask(Path(path).parent.parent / "mask" / Path(path).name, widget.spec)
    # The layers show class k as k + 1 (0 is empty), the masks and the annotator use k.
    strokes = simulated_strokes(predicted.astype(np.int64) - 1, truth, widget.spec, 1, 4, 40)
    paint = viewer.layers[PAINT_LAYER]
    paint.data = strokes
    widget.apply_strokes()
    wait_until(lambda: not np.array_equal(np.asarray(viewer.layers[PREDICTION_LAYER].data),
                                          predicted), "corrections: the prediction follows",
               timeout)
    select(viewer, PAINT_LAYER)
    save(viewer, "widget_corrections.png")
    undock(viewer, dock_widget)
    viewer.layers.clear()


def file_open(viewer, run: Path, timeout: float) -> None:
    """File > Open on the run folder: what ``histo-wsss demo`` shows at its end."""
    viewer.open(str(run), plugin=PLUGIN)
    viewer.reset_view()
    select(viewer, "prediction: ce")
    save(viewer, "demo_viewer.png")
    viewer.layers.clear()


STEPS = {
    "train_classifier": train_classifier,
    "pseudo_masks": pseudo_masks,
    "train_segmenter": train_segmenter,
    "compare": compare,
    "segment_slide": segment_slide,
    "corrections": corrections,
    "file_open": file_open,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "build" / "screenshots-run",
                        help="run folder (made afresh by a full call, kept for --only)")
    parser.add_argument("--only", nargs="+", choices=list(STEPS),
                        help="retake only these pictures, from the run of a full call")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds one job may take before the script gives up")
    args = parser.parse_args(argv)
    args.run = args.run.resolve()
    if not args.only:  # the training pictures show the training: start from nothing
        if args.run.is_dir() and any(args.run.iterdir()) and \
                not (args.run / "run.json").is_file():
            parser.error(f"{args.run} is not a run folder; a full call replaces it, so give "
                         "a new folder or a run folder")
        shutil.rmtree(args.run, ignore_errors=True)
    elif {"train_classifier", "pseudo_masks", "train_segmenter"} & set(args.only):
        # They show their job's progress and results (a widget opened on a finished stage
        # draws no loss curve: it draws the epochs before only when training resumes).
        parser.error("the pictures of the run's own jobs need them: run without --only")
    elif not (args.run / "run.json").is_file():
        parser.error(f"--only needs the run of a full call in {args.run}")
    os.environ.setdefault("HISTO_WSSS_DEVICE", "cpu")
    os.environ["HISTO_WSSS_CONFIG_DIR"] = tempfile.mkdtemp(prefix="histo-wsss-screens-")

    # torch before the viewer: the widgets' background import of it then has nothing to do,
    # so their lists (devices, losses) are complete when they open. (Triton is kept out of a
    # process where the canvas loaded Mesa's LLVM by the widgets' JobRunner.)
    import napari
    import torch  # noqa: F401

    import napari_histo_wsss.core.stage2.losses  # noqa: F401

    viewer = napari.Viewer(show=True, title="napari-histo-wsss")
    viewer.window._qt_window.resize(*WINDOW)
    settle(1.0)
    try:
        for name, step in STEPS.items():
            if args.only and name not in args.only:
                continue
            log(f"== {name}")
            step(viewer, args.run, args.timeout)
    finally:
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
