"""The dock widgets driven through short real jobs on the bundled WSSS4LUAD sample and slide.

Every test uses a real napari viewer (Xvfb) and real training on the 42 bundled patches, with
tiny budgets (one epoch, batches of 8, 64-pixel crops, the plain CAM recipe) so the whole file
stays within a couple of minutes on two cores. Runs that several tests start from (a trained
classifier with its pseudo-masks; two trained strategies) are made once per module with the
core API, and copied where a test changes them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_histo_wsss.widgets import _settings
from napari_histo_wsss.widgets._jobs import JobState
from napari_histo_wsss.widgets.legend import class_rows

pytestmark = pytest.mark.gui

PLUGIN = "napari-histo-wsss"
METHOD = "cam-ce"
TINY_CLASSIFIER = {"epochs": 1, "batch_size": 8, "input_size": 64}
TINY_SEGMENTER = {"epochs": 1, "batch_size": 8, "input_size": 64}
JOB_TIMEOUT_MS = 300_000


@pytest.fixture(autouse=True)
def private_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(_settings.CONFIG_DIR_ENV_VAR, str(tmp_path / "config"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, sample_dataset_dir) -> Path:
    """A run with a trained (tiny) classifier and its pseudo-masks, made with the core API."""
    from napari_histo_wsss.core.devices import resolve_device
    from napari_histo_wsss.core.events import run_to_completion
    from napari_histo_wsss.core.pipeline import prepare_run
    from napari_histo_wsss.core.stage1.pseudo_masks import generate_pseudo_masks
    from napari_histo_wsss.core.stage1.train_classifier import train_classifier
    from napari_histo_wsss.widgets._jobs import avoid_triton_llvm_clash

    avoid_triton_llvm_clash()  # an earlier test's viewer may have loaded Mesa's LLVM
    out = tmp_path_factory.mktemp("runs") / "base"
    run, config, layout = prepare_run(sample_dataset_dir, out, METHOD, device="cpu",
                                      classifier=TINY_CLASSIFIER, segmenter=TINY_SEGMENTER)
    patches = layout.patches()
    device = resolve_device("cpu")
    run_to_completion(train_classifier(run, config, patches, device=device))
    run_to_completion(generate_pseudo_masks(run, config, patches, device=device))
    return out


@pytest.fixture(scope="module")
def two_strategy_run(base_run, tmp_path_factory) -> Path:
    """``base_run`` plus segmenters trained with two strategies (ce and onss)."""
    from napari_histo_wsss.core.events import run_to_completion
    from napari_histo_wsss.core.pipeline import prepare_run, run_pipeline

    out = tmp_path_factory.mktemp("runs") / "two-strategies"
    shutil.copytree(base_run, out)
    config_data = json.loads((out / "run.json").read_text())
    run, config, layout = prepare_run(config_data["data_dir"], out, METHOD)
    run_to_completion(run_pipeline(run, config, layout, strategies=["ce", "onss"]))
    return out


def copy_run(source: Path, tmp_path: Path) -> Path:
    destination = tmp_path / source.name
    shutil.copytree(source, destination)
    return destination


def docked(viewer, widget_class):
    widget = widget_class(viewer)
    viewer.window.add_dock_widget(widget, name=widget_class.__name__)
    return widget


def wait_for_job(qtbot, runner, timeout=JOB_TIMEOUT_MS) -> JobState:
    qtbot.waitUntil(lambda: not runner.busy, timeout=timeout)
    return runner.state


def test_every_widget_opens_from_the_plugins_menu(make_napari_viewer):
    from napari_histo_wsss.widgets.compare import CompareWidget
    from napari_histo_wsss.widgets.pseudo_masks import PseudoMaskWidget
    from napari_histo_wsss.widgets.segment_slide import SegmentSlideWidget
    from napari_histo_wsss.widgets.train_classifier import TrainClassifierWidget
    from napari_histo_wsss.widgets.train_segmenter import TrainSegmenterWidget

    viewer = make_napari_viewer()
    expected = {
        "1. Train classifier": TrainClassifierWidget,
        "2. Pseudo-masks": PseudoMaskWidget,
        "3. Train segmenter": TrainSegmenterWidget,
        "4. Compare strategies": CompareWidget,
        "5. Segment slide": SegmentSlideWidget,
    }
    for name, widget_class in expected.items():
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        assert isinstance(widget, widget_class)


def test_classifier_dataset_feedback_and_remembered_settings(make_napari_viewer,
                                                             sample_dataset_dir, tmp_path):
    from napari_histo_wsss.widgets.train_classifier import TrainClassifierWidget

    viewer = make_napari_viewer()
    widget = docked(viewer, TrainClassifierWidget)
    widget.dataset.value = sample_dataset_dir
    assert widget.dataset_info.value.startswith("wsss4luad: tumor, stroma, normal")
    assert "42 training patches" in widget.dataset_info.value
    widget.dataset.value = tmp_path  # an empty folder: the problem is shown under the field
    assert "no training patches found" in widget.dataset_info.value
    widget.epochs.value = 7
    widget.run_folder.value = tmp_path / "run"

    again = docked(viewer, TrainClassifierWidget)
    assert again.epochs.value == 7 and Path(again.run_folder.value) == tmp_path / "run"


def test_train_classifier_stop_then_resume(make_napari_viewer, qtbot, sample_dataset_dir,
                                           tmp_path):
    from napari.utils import progress
    from napari.utils.notifications import notification_manager

    from napari_histo_wsss.core.events import Batch, Done
    from napari_histo_wsss.core.runs.run_dir import RunDirectory
    from napari_histo_wsss.widgets.train_classifier import TrainClassifierWidget

    viewer = make_napari_viewer()
    widget = docked(viewer, TrainClassifierWidget)
    assert widget.epochs.native.text() == "preset"  # not "0", which reads as "don't train"
    assert widget.input_size.native.text() == "preset"
    assert widget.candidates.native.text() == "preset"  # the method's own: one for cam-ce
    widget.dataset.value = sample_dataset_dir
    widget.run_folder.value = tmp_path / "run"
    widget.method.value = METHOD
    widget.epochs.value = 1
    assert widget.epochs.native.text() == "1" and widget.epochs.value == 1
    widget.batch_size.value = TINY_CLASSIFIER["batch_size"]
    widget.input_size.value = TINY_CLASSIFIER["input_size"]
    widget.self_train.value = True
    events, activity = [], []  # the activity dock's bar position at each batch
    widget.runner.event.connect(events.append)
    widget.runner.event.connect(lambda event: isinstance(event, Batch) and activity.append(
        (widget.activity.bar in progress._all_instances, widget.activity.bar.n)))
    messages = []
    notification_manager.notification_ready.connect(messages.append)

    widget.toggle_button.click()
    assert widget.runner.state is JobState.RUNNING
    assert widget.toggle_button.text() == "Stop" and not widget.dataset.enabled
    qtbot.waitUntil(lambda: any(isinstance(e, Batch) for e in events), timeout=JOB_TIMEOUT_MS)
    widget.toggle_button.click()  # Stop: finish the batch, save, keep the model
    assert wait_for_job(qtbot, widget.runner) is JobState.STOPPED
    assert activity[0] == (True, 1)  # a bar in napari's activity dock, at batch 1
    assert widget.activity.bar is None  # closed with the job
    assert any("Train classifier: stopped" in m.message for m in messages)
    run = RunDirectory(tmp_path / "run")
    assert run.classifier_checkpoint.is_file() and not run.is_complete("classifier")
    stopped_at = sum(isinstance(e, Batch) for e in events)
    assert stopped_at < 5  # 42 patches in batches of 8: 5 steps
    assert "resumes" in widget.run_info.value
    assert not widget.epochs.enabled  # an existing run keeps its settings
    assert run.config().pseudo_masks.teacher and run.config().segmenter.targets == ("refined",)
    assert widget.self_train.value and not widget.self_train.enabled
    assert widget.candidates.value == 1 and not widget.candidates.enabled

    events.clear()
    activity.clear()
    widget.toggle_button.click()  # Train again: continue from the checkpoint
    assert wait_for_job(qtbot, widget.runner) is JobState.DONE
    notification_manager.notification_ready.disconnect(messages.append)
    assert activity[0] == (True, stopped_at + 1)  # the bar continues where it stopped
    assert any(m.message == "Train classifier: finished" for m in messages)
    batches = [e for e in events if isinstance(e, Batch)]
    assert len(batches) == 5 - stopped_at
    assert (batches[0].epoch, batches[0].index) == (0, stopped_at)
    assert isinstance(events[-1], Done) and events[-1].result == run.classifier_checkpoint
    assert run.is_complete("classifier") and "classifier trained" in widget.run_info.value
    curves = widget.progress.loss_plot.series()
    assert len(curves["classifier batch"][0]) == 5 - stopped_at
    logged = (run.classifier_dir / "losses.csv").read_text().splitlines()[1].split(",")
    assert curves["classifier train"] == ([1.0], [pytest.approx(float(logged[1]), rel=1e-5)])
    assert widget.progress.epoch_bar.value() == 1


def test_pseudo_masks_generate_and_browse(make_napari_viewer, qtbot, base_run, tmp_path):
    from napari.layers import Image, Labels

    from napari_histo_wsss.core.runs.run_dir import RunDirectory
    from napari_histo_wsss.core.runs.stages import PSEUDO_MASKS
    from napari_histo_wsss.widgets.pseudo_masks import PseudoMaskWidget

    run_folder = copy_run(base_run, tmp_path)
    viewer = make_napari_viewer()
    widget = docked(viewer, PseudoMaskWidget)
    widget.run_folder.value = run_folder
    assert "pseudo-masks done" in widget.run_info.value

    widget.toggle_button.click()  # regenerate every patch's pseudo-mask (a job)
    assert wait_for_job(qtbot, widget.runner) is JobState.DONE
    assert len(list((run_folder / "pseudo_masks" / "final").glob("*.png"))) == 42
    assert RunDirectory(run_folder).is_complete(PSEUDO_MASKS)
    assert "quality on val: mIoU" in widget.progress.status.text()

    widget.index.value = 5  # browse: the class maps of training patch 5
    wait_for_job(qtbot, widget.preview_runner)
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    qtbot.waitUntil(lambda: "pseudo-mask" in viewer.layers, timeout=JOB_TIMEOUT_MS)
    for name in ("tumor", "stroma", "normal"):
        cam = viewer.layers[f"CAM {name}"]
        assert isinstance(cam, Image) and cam.colormap.colors[0][3] == 0  # inactive: clear
        assert cam.data.shape == viewer.layers["image (pseudo-masks)"].data.shape[:2]
    mask = viewer.layers["pseudo-mask"]
    assert isinstance(mask, Labels) and mask.data.max() <= 3
    assert "ground truth" not in viewer.layers  # training patches have none
    assert "label:" in widget.view_info.value
    # Readable by default: the patch, then the class maps (hidden), then the pseudo-mask shown
    # half transparent; the legend dock names its classes.
    names = [layer.name for layer in viewer.layers]
    assert names.index("image (pseudo-masks)") < names.index("CAM tumor") < \
        names.index("pseudo-mask")
    assert not any(viewer.layers[f"CAM {n}"].visible for n in ("tumor", "stroma", "normal"))
    assert mask.visible and mask.opacity == 0.5
    legend = viewer.window._histo_wsss_legend
    viewer.layers.selection.active = mask
    assert [text for _, text, _ in class_rows(mask)] == ["tumor", "stroma", "normal"]
    assert legend.title.text().startswith("<b>pseudo-mask</b>")
    assert "pseudo-mask (teacher)" not in viewer.layers  # no self-training in this run

    # A run whose teacher relabelled the patches: its saved mask is shown above the other.
    from napari_histo_wsss.core.data.datasets import find_dataset, write_palette_mask

    layout = find_dataset(RunDirectory(run_folder).config().data_dir)
    relabelled = np.full(mask.data.shape, 1, np.uint8)  # all stroma: told apart at once
    folder = run_folder / "pseudo_masks" / "refined"
    folder.mkdir()
    write_palette_mask(folder / layout.patches().paths[5].with_suffix(".png").name, relabelled,
                       layout.spec)
    widget.show_button.clicked.emit()
    wait_for_job(qtbot, widget.preview_runner)
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    qtbot.waitUntil(lambda: "pseudo-mask (teacher)" in viewer.layers, timeout=JOB_TIMEOUT_MS)
    assert np.array_equal(viewer.layers["pseudo-mask (teacher)"].data, relabelled + 1)  # 0: none
    names = [layer.name for layer in viewer.layers]
    assert names.index("pseudo-mask") < names.index("pseudo-mask (teacher)")

    widget.source.value = "validation images"
    widget.index.value = 0
    widget.show_button.clicked.emit()
    wait_for_job(qtbot, widget.preview_runner)
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    qtbot.waitUntil(lambda: "ground truth" in viewer.layers, timeout=JOB_TIMEOUT_MS)
    truth = viewer.layers["ground truth"]
    assert truth.data.shape == viewer.layers["pseudo-mask"].data.shape
    assert set(np.unique(truth.data)) <= {0, 1, 2, 3}
    assert truth.contour == 2 and truth.visible  # outlines over the pseudo-mask
    names = [layer.name for layer in viewer.layers]
    assert names.index("pseudo-mask") < names.index("ground truth")
    assert "pseudo-mask (teacher)" not in viewer.layers  # val images are not relabelled

    # The training patches stitched back into their source images, with the fused mask.
    from napari_histo_wsss.core.data.datasets import find_dataset
    from napari_histo_wsss.core.data.stitching import stitch_patches

    stitched = stitch_patches(find_dataset(RunDirectory(run_folder).config().data_dir).patches())
    widget.source.value = "stitched source images"
    assert widget.index.max == 0  # counted in the worker, on the first view
    widget.show_button.clicked.emit()
    wait_for_job(qtbot, widget.preview_runner)
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    qtbot.waitUntil(lambda: "patches stitched" in widget.view_info.value,
                    timeout=JOB_TIMEOUT_MS)
    assert widget.index.max == len(stitched) - 1 > 0
    assert viewer.layers["image (pseudo-masks)"].data.shape == stitched[0].pixels.shape
    assert viewer.layers["pseudo-mask"].data.shape == stitched[0].covered.shape
    assert "ground truth" not in viewer.layers

    # An image layer of the viewer (the CMU slide region is multiscale, so a crop of it).
    viewer.add_image(viewer.layers["image (pseudo-masks)"].data.copy(), name="my image",
                     rgb=True, translate=(0, 500))
    widget.source.value = "viewer image"
    widget.image_layer.value = viewer.layers["my image"]
    widget.show_button.clicked.emit()
    wait_for_job(qtbot, widget.preview_runner)
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    qtbot.waitUntil(lambda: tuple(viewer.layers["CAM tumor"].translate) == (0, 500),
                    timeout=JOB_TIMEOUT_MS)
    assert "ground truth" not in viewer.layers and "gated by prediction" in \
        widget.view_info.value
    names = [layer.name for layer in viewer.layers]  # over the user's image, not under it
    assert names.index("my image") < names.index("CAM tumor") < names.index("pseudo-mask")


def test_train_segmenter_with_two_strategies(make_napari_viewer, qtbot, base_run, tmp_path):
    from napari_histo_wsss.core.events import Done
    from napari_histo_wsss.core.runs.run_dir import RunDirectory
    from napari_histo_wsss.widgets.train_segmenter import TrainSegmenterWidget

    run_folder = copy_run(base_run, tmp_path)
    viewer = make_napari_viewer()
    widget = docked(viewer, TrainSegmenterWidget)
    widget.run_folder.value = run_folder
    assert widget.method.value == METHOD and not widget.dataset.enabled
    widget.strategies.value = ["ce", "onss"]
    widget.epochs.value = TINY_SEGMENTER["epochs"]
    widget.batch_size.value = TINY_SEGMENTER["batch_size"]
    widget.input_size.value = TINY_SEGMENTER["input_size"]
    events = []
    widget.runner.event.connect(events.append)

    widget.toggle_button.click()
    assert wait_for_job(qtbot, widget.runner) is JobState.DONE
    run = RunDirectory(run_folder)
    assert run.segmenter_strategies() == ["ce", "onss"]
    done = [e for e in events if isinstance(e, Done)]
    assert [e.stage for e in done] == ["segmenter:ce", "segmenter:onss", "pipeline"]
    assert set(done[-1].result["val"]) == {"ce", "onss"}
    curves = widget.progress.loss_plot.series()
    assert {"segmenter:ce batch", "segmenter:onss batch", "segmenter:ce train"} <= set(curves)
    assert "ce: val mIoU" in widget.progress.status.text()
    assert "segmenters: ce, onss" in widget.run_info.value


def test_compare_two_strategies(make_napari_viewer, qtbot, two_strategy_run):
    from napari.layers import Image, Labels

    from napari_histo_wsss.widgets.compare import CompareWidget

    viewer = make_napari_viewer()
    widget = docked(viewer, CompareWidget)
    widget.run_folder.value = two_strategy_run
    assert list(widget.strategies.value) == ["ce", "onss"]
    widget.source.value = "validation image"
    widget.index.value = 1
    widget.grid.value = True

    widget.toggle_button.click()
    assert wait_for_job(qtbot, widget.runner) is JobState.DONE
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    predictions = [viewer.layers[f"prediction: {s}"] for s in ("ce", "onss")]
    image = viewer.layers["image (compare)"]
    for layer in predictions:
        assert isinstance(layer, Labels) and layer.data.shape == image.data.shape[:2]
    assert predictions[0].visible and not predictions[1].visible  # one overlay at a time
    assert viewer.layers["ground truth (compare)"].contour == 2
    names = [layer.name for layer in viewer.layers]
    assert names.index("image (compare)") < names.index("ground truth (compare)") < \
        names.index("prediction: ce") < names.index("prediction: onss")
    predictions[0].opacity = 0.25  # linked: the other prediction follows
    assert predictions[1].opacity == 0.25
    assert "ground truth (compare)" in viewer.layers and viewer.grid.enabled
    zoom_in_grid = viewer.camera.zoom
    widget.grid.value = False  # the camera is fitted again: one image fills the canvas
    assert not viewer.grid.enabled and viewer.camera.zoom > 1.2 * zoom_in_grid
    widget.grid.value = True
    assert viewer.camera.zoom == pytest.approx(zoom_in_grid)
    table = widget.iou_rows()
    assert set(table) == {"ce", "onss"}
    assert list(table["ce"]) == ["tumor", "stroma", "normal", "mIoU"]
    assert all(text == "–" or 0 <= float(text) <= 100 for text in table["onss"].values())

    widget.source.value = "training patch"  # trust maps over the pseudo-mask
    widget.index.value = 2
    widget.toggle_button.click()
    assert wait_for_job(qtbot, widget.runner) is JobState.DONE
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    assert "ground truth (compare)" not in viewer.layers
    assert isinstance(viewer.layers["pseudo-mask (compare)"], Labels)
    trust = viewer.layers["trust: onss"]  # ONSS weighs pixels; plain CE trusts them all
    assert isinstance(trust, Image) and trust.data.shape == image.data.shape[:2]
    assert "trust: ce" not in viewer.layers
    legend = viewer.window._histo_wsss_legend
    viewer.layers.selection.active = trust  # its colour key
    assert not legend.ramp.isHidden() and legend.ramp.low.text() == "0"

    widget.strategies.value = []
    widget.toggle_button.click()  # nothing selected: said as such, not "no segmenter"
    assert widget.progress.status.text() == "select at least one strategy to compare"


def test_segment_slide_fills_in_and_exports(make_napari_viewer, qtbot, two_strategy_run,
                                            sample_slide_path, tmp_path):
    from napari.layers import Labels

    from napari_histo_wsss._reader import read_slide
    from napari_histo_wsss.core.wsi.ome_zarr_labels import open_segmentation
    from napari_histo_wsss.widgets.segment_slide import SegmentSlideWidget

    viewer = make_napari_viewer()
    data, kwargs, _ = read_slide(str(sample_slide_path))[0]
    slide_layer = viewer.add_image(data, **kwargs)
    widget = docked(viewer, SegmentSlideWidget)
    assert widget.slide_layer.value is slide_layer
    widget.run_folder.value = two_strategy_run
    widget.strategy.value = "onss"
    widget.output.value = tmp_path / "slide.zarr"
    widget.level.value = 2  # the 4x-downsampled level keeps the job short
    widget.tile.value = 256
    widget.halo.value = 32
    widget.batch_size.value = 4
    live = []

    def remember_live_layer(event):
        if widget.live_layer is not None and not live:
            live.append((widget.live_layer.name, widget.live_layer.multiscale))

    widget.runner.event.connect(remember_live_layer)
    widget.toggle_button.click()
    assert wait_for_job(qtbot, widget.runner) is JobState.DONE
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    assert live and live[0][1] and live[0][0].endswith("(segmenting)")
    segmentation = open_segmentation(tmp_path / "slide.zarr")
    assert segmentation.complete
    labels = widget.live_layer
    assert isinstance(labels, Labels) and labels.multiscale
    assert labels.name == f"{slide_layer.name} labels"
    assert labels.data[0].shape == segmentation.labels[0].shape
    # The result covers the slide: same extent in world coordinates, within one label pixel.
    slide_extent = np.asarray(slide_layer.data[0].shape[:2]) * slide_layer.scale
    label_extent = np.asarray(labels.data[0].shape) * labels.scale
    assert np.all(np.abs(label_extent - slide_extent) <= labels.scale)
    assert np.asarray(labels.data[-1]).max() > 0  # the overview holds tissue classes
    for shown, stored in zip(labels.data, segmentation.labels, strict=True):
        np.testing.assert_array_equal(np.asarray(shown), np.asarray(stored))
    assert labels.metadata["path"] == str(tmp_path / "slide.zarr")

    widget.export_geojson(tmp_path / "slide.geojson")
    wait_for_job(qtbot, widget.export_runner)
    collection = json.loads((tmp_path / "slide.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    widget.export_zarr(tmp_path / "copy.zarr")
    wait_for_job(qtbot, widget.export_runner)
    assert open_segmentation(tmp_path / "copy.zarr").complete


def test_compare_runs_the_engine_chosen_in_its_advanced_settings(
        make_napari_viewer, qtbot, two_strategy_run, monkeypatch):
    from napari_histo_wsss.core.events import Message
    from napari_histo_wsss.widgets.compare import CompareWidget

    monkeypatch.delenv("HISTO_WSSS_ENGINE", raising=False)  # the suite forces torch fp32
    viewer = make_napari_viewer()
    widget = docked(viewer, CompareWidget)
    assert (widget.engine.value, widget.precision.value) == ("auto", "auto")
    widget.run_folder.value = two_strategy_run
    widget.strategies.value = ["ce"]
    widget.source.value = "validation image"
    widget.engine.value, widget.precision.value = "torch", "bf16"
    messages = []
    widget.runner.event.connect(
        lambda event: messages.append(event.text) if isinstance(event, Message) else None)

    widget.toggle_button.click()
    assert wait_for_job(qtbot, widget.runner) is JobState.DONE
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    assert widget._results["ce"].engine["name"] == "torch"
    assert widget._results["ce"].engine["precision"] == "bf16"
    assert "ce: engine torch bf16" in messages
    saved = _settings.load_settings("compare")
    assert (saved["engine"], saved["precision"]) == ("torch", "bf16")


def test_segment_slide_runs_the_engine_chosen_in_its_advanced_settings(
        make_napari_viewer, qtbot, two_strategy_run, sample_slide_path, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the [fast] extra is not installed")
    from napari_histo_wsss.core.wsi.ome_zarr_labels import read_attrs
    from napari_histo_wsss.widgets.segment_slide import SegmentSlideWidget

    monkeypatch.delenv("HISTO_WSSS_ENGINE", raising=False)
    run = copy_run(two_strategy_run, tmp_path)  # the export is cached inside the run
    viewer = make_napari_viewer()
    widget = docked(viewer, SegmentSlideWidget)
    widget.slide_file.value = sample_slide_path
    widget.run_folder.value = run
    widget.strategy.value = "ce"
    widget.output.value = tmp_path / "slide.zarr"
    widget.level.value = 2
    widget.tile.value = 256
    widget.engine.value, widget.precision.value = "onnxruntime", "fp32"

    widget.toggle_button.click()
    assert wait_for_job(qtbot, widget.runner) is JobState.DONE
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    engine = read_attrs(tmp_path / "slide.zarr")["engine"]
    assert (engine["name"], engine["precision"]) == ("onnxruntime", "fp32")
    assert list((run / "segmenter" / "ce" / "engines").glob("segmenter-*.onnx"))


def test_a_run_folder_opens_with_file_open(make_napari_viewer, two_strategy_run):
    viewer = make_napari_viewer()
    layers = viewer.open(str(two_strategy_run), plugin=PLUGIN)
    shown = {layer.name: layer.visible for layer in layers}
    assert {"val images", "ground truth", "prediction: ce", "prediction: onss",
            "training patches", "pseudo-masks", "CAM tumor"} <= set(shown)
    # one overlay at a time: the first prediction and the pseudo-masks; the rest hidden
    assert shown["prediction: ce"] and not shown["prediction: onss"]
    assert not shown["ground truth"] and not shown["CAM tumor"]
    assert list(viewer.layers["prediction: ce"].features["class"]) == [
        "background", "tumor", "stroma", "normal"]


def test_widgets_share_one_run_folder_and_scroll(make_napari_viewer, base_run):
    from napari_histo_wsss.widgets.compare import CompareWidget
    from napari_histo_wsss.widgets.pseudo_masks import PseudoMaskWidget
    from napari_histo_wsss.widgets.train_segmenter import TrainSegmenterWidget

    viewer = make_napari_viewer()
    masks = docked(viewer, PseudoMaskWidget)
    masks.run_folder.value = base_run
    compare = docked(viewer, CompareWidget)  # opened later: starts on the chosen run
    assert Path(compare.run_folder.value) == base_run
    segmenter = docked(viewer, TrainSegmenterWidget)
    segmenter.run_folder.value = base_run.parent / "other"
    assert Path(masks.run_folder.value) == Path(compare.run_folder.value) == \
        base_run.parent / "other"
    from qtpy.QtWidgets import QScrollArea

    assert isinstance(masks.native, QScrollArea)  # a long form scrolls in its dock
    assert masks.native.widget() is masks.form


def test_train_more_epochs_on_an_existing_run(make_napari_viewer, qtbot, two_strategy_run,
                                              sample_dataset_dir, tmp_path):
    """The explicit "more epochs" control: offered only for finished models, the button says
    what it does, the run grows by the epochs asked for, and the control resets after."""
    import torch

    from napari_histo_wsss.core.runs.checkpoints import load_checkpoint
    from napari_histo_wsss.core.runs.run_dir import RunDirectory
    from napari_histo_wsss.widgets.train_classifier import TrainClassifierWidget
    from napari_histo_wsss.widgets.train_segmenter import TrainSegmenterWidget

    run_folder = copy_run(two_strategy_run, tmp_path)
    run = RunDirectory(run_folder)
    viewer = make_napari_viewer()
    segmenter = docked(viewer, TrainSegmenterWidget)
    segmenter.run_folder.value = tmp_path / "new"  # no run yet: nothing to train longer
    assert not segmenter.more_epochs.enabled
    assert segmenter.more_epochs.native.text() == "none"
    segmenter.run_folder.value = run_folder
    segmenter.strategies.value = ["ce"]
    assert segmenter.more_epochs.enabled
    segmenter.more_epochs.value = 2
    assert segmenter.toggle_button.text() == "Train 2 more epochs"
    last_before = load_checkpoint(run.segmenter_dir("ce") / "last.pt", kind="segmenter")

    segmenter.toggle_button.click()
    assert wait_for_job(qtbot, segmenter.runner) is JobState.DONE
    assert segmenter.more_epochs.value == 0 and segmenter.toggle_button.text() == "Train"
    assert run.config().extended_epochs == {"segmenter:ce": 3}
    assert run.status()["segmenter:ce"]["epochs"] == 3
    assert run.status()["segmenter:onss"]["epochs"] == 1  # not selected: untouched
    history = json.loads((run.segmenter_dir("ce") / "metrics.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    last_after = load_checkpoint(run.segmenter_dir("ce") / "last.pt", kind="segmenter")
    name = next(k for k, v in last_after["state_dict"].items() if v.ndim == 4)
    assert not torch.equal(last_before["state_dict"][name], last_after["state_dict"][name])
    assert "ce: val mIoU" in segmenter.progress.status.text()

    classifier = docked(viewer, TrainClassifierWidget)  # follows the shared run folder
    classifier.dataset.value = sample_dataset_dir
    assert not classifier.epochs.enabled and classifier.epochs.value == 1
    assert classifier.more_epochs.enabled
    classifier.more_epochs.value = 1
    assert classifier.toggle_button.text() == "Train 1 more epoch"
    classifier.toggle_button.click()
    assert wait_for_job(qtbot, classifier.runner) is JobState.DONE
    assert classifier.epochs.value == 2 and classifier.more_epochs.value == 0
    assert run.status()["classifier"]["epochs"] == 2
    assert "no pseudo-masks yet" in classifier.run_info.value
    assert "ce (stale: older pseudo-masks)" in classifier.run_info.value


def test_segment_slide_resumes_its_progress_where_it_stopped(
        make_napari_viewer, qtbot, two_strategy_run, sample_slide_path, tmp_path):
    """After Stop, Start again continues the output, and its progress bars (the dock's and
    napari's activity dock) start at the tiles already done instead of at 0."""
    from napari.utils import progress

    from napari_histo_wsss._reader import read_slide
    from napari_histo_wsss.core.events import Batch, Started
    from napari_histo_wsss.core.wsi.ome_zarr_labels import open_segmentation
    from napari_histo_wsss.widgets.segment_slide import SegmentSlideWidget

    viewer = make_napari_viewer()
    data, kwargs, _ = read_slide(str(sample_slide_path))[0]
    viewer.add_image(data, **kwargs)
    widget = docked(viewer, SegmentSlideWidget)
    widget.run_folder.value = two_strategy_run
    widget.strategy.value = "ce"
    widget.output.value = tmp_path / "slide.zarr"
    widget.level.value = 2
    widget.tile.value = 128  # 48 tiles: the job is still running when Stop lands
    widget.halo.value = 16
    widget.batch_size.value = 8
    events, bars = [], []
    # Recorded before the widget's handler, which may let queued events in (yield order).
    widget.runner.event.connect(events.append, priority=1)
    widget.runner.event.connect(lambda event: isinstance(event, Batch) and bars.append(
        (widget.progress.batch_bar.value(), widget.activity.bar in progress._all_instances,
         widget.activity.bar.n)))

    widget.toggle_button.click()  # Stop once two rows of 8 tiles can be done
    qtbot.waitUntil(lambda: sum(isinstance(e, Batch) for e in events) >= 16,
                    timeout=JOB_TIMEOUT_MS)
    widget.toggle_button.click()  # Stop
    assert wait_for_job(qtbot, widget.runner) is JobState.STOPPED
    done_before = sum(isinstance(e, Batch) for e in events)
    total = next(e for e in events if isinstance(e, Started)).batches_per_epoch
    assert done_before < total
    assert not open_segmentation(tmp_path / "slide.zarr").complete

    events.clear()
    bars.clear()
    widget.toggle_button.click()  # Start again: resumes the output
    assert wait_for_job(qtbot, widget.runner) is JobState.DONE
    qtbot.waitUntil(lambda: not widget.showing, timeout=JOB_TIMEOUT_MS)
    batches = [e for e in events if isinstance(e, Batch)]
    assert next(e for e in events if isinstance(e, Started)).batches_per_epoch == total
    first = batches[0].index
    assert first == total - len(batches) >= 8  # starts at the tiles already done
    assert [b.index for b in batches] == list(range(first, total))
    # Both bars (the dock's and napari's activity dock) go on from there, never from 0; the
    # activity dock's moves at most twice a second, so it may trail the dock's.
    assert all(first < activity <= panel for panel, shown, activity in bars if shown)
    assert bars[-1] == (total, True, total)
    segmentation = open_segmentation(tmp_path / "slide.zarr")
    assert segmentation.complete
    # The live layer is kept as the result: at every zoom it shows the finished pyramid,
    # rows written before the stop included.
    assert widget.live_layer.name.endswith(" labels")
    assert len(widget.live_layer.data) == len(segmentation.labels) > 1
    for shown, stored in zip(widget.live_layer.data, segmentation.labels, strict=True):
        np.testing.assert_array_equal(np.asarray(shown), np.asarray(stored))
