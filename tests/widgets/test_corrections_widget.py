"""The corrections widget with a real viewer (Xvfb): paint, retrain, watch the preview change,
and jump to a review item. The run's tiny segmenter is trained on the bundled real patches."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from napari_histo_wsss.widgets import _settings
from napari_histo_wsss.widgets._jobs import JobState

pytestmark = pytest.mark.gui

PLUGIN = "napari-histo-wsss"
JOB_TIMEOUT_MS = 300_000


@pytest.fixture(autouse=True)
def private_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(_settings.CONFIG_DIR_ENV_VAR, str(tmp_path / "config"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, train_tiny_segmenter):
    """One epoch of a tiny PSPNet on every third bundled patch; every patch has a
    pseudo-mask, since the widget fine-tunes on all of them."""
    from napari_histo_wsss.widgets._jobs import avoid_triton_llvm_clash

    avoid_triton_llvm_clash()
    return train_tiny_segmenter(tmp_path_factory.mktemp("widget") / "run")[0]


def test_paint_retrain_preview_and_review(make_napari_viewer, qtbot, trained_run):
    from napari_histo_wsss.core.corrections.store import CorrectionStore
    from napari_histo_wsss.widgets.corrections import (
        PAINT_LAYER,
        PREDICTION_LAYER,
        PREVIEW_LAYER,
        CorrectionsWidget,
    )

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "6. Correct and retrain")
    assert isinstance(widget, CorrectionsWidget)
    widget.run_folder.value = trained_run.root
    assert widget.strategy.value == "ce" and len(widget.image.choices) == 7

    widget.open_image()
    assert widget.strategy.value == "ce"  # kept when napari resets choices on new layers
    paint = viewer.layers[PAINT_LAYER]  # at once: the prediction follows from a worker
    qtbot.waitUntil(lambda: np.asarray(viewer.layers[PREDICTION_LAYER].data).any(),
                    timeout=JOB_TIMEOUT_MS)
    assert paint.data.shape == viewer.layers[PREDICTION_LAYER].data.shape
    assert not paint.data.any()
    before = np.array(viewer.layers[PREDICTION_LAYER].data)
    # A broad stroke of "normal" (3), a class the tiny model predicts nowhere here.
    assert not (before == 3).any()
    # Painted with napari's brush: the prediction follows once the brush rests.
    paint.brush_size = 24
    paint.paint((paint.data.shape[0] // 2, paint.data.shape[1] // 2), 3)
    dab = np.asarray(paint.data) == 3
    assert dab.sum() > 100 and widget._follow_timer.isActive()
    qtbot.waitUntil(lambda: (np.asarray(viewer.layers[PREDICTION_LAYER].data)[dab] == 3).all(),
                    timeout=JOB_TIMEOUT_MS)
    # The layer is set from the job's last event, just before the job reports it finished.
    qtbot.waitUntil(lambda: not widget.image_runner.busy, timeout=JOB_TIMEOUT_MS)
    assert widget.image_runner.state is JobState.DONE, widget.image_runner.error
    stroke = np.zeros(paint.data.shape, bool)
    for x in range(20, paint.data.shape[1] - 20, 6):
        stroke[disk((paint.data.shape[0] // 2, x), 30, shape=stroke.shape)] = True
    paint.data[stroke] = 3
    paint.refresh()

    widget.epochs.value = 8
    widget.toggle()
    qtbot.waitUntil(lambda: not widget.runner.busy, timeout=JOB_TIMEOUT_MS)
    assert widget.runner.state is JobState.DONE, widget.runner.error
    saved = CorrectionStore.of_run(trained_run).find(widget.current)
    assert np.array_equal(saved.labels, paint.data)
    assert trained_run.segmenter_checkpoint("ce-corrections").is_file()
    preview = np.asarray(viewer.layers[PREVIEW_LAYER].data)
    assert preview.shape == before.shape
    assert (preview != before).any()  # the retrained model sees the image differently
    # Then the prediction layer comes from the retrained strategy as it predicts.
    qtbot.waitUntil(lambda: widget._predictor is not None and "ce-corrections" in
                    widget._predictor.config["checkpoint"], timeout=JOB_TIMEOUT_MS)
    qtbot.waitUntil(lambda: not widget.image_runner.busy, timeout=JOB_TIMEOUT_MS)
    assert (np.asarray(viewer.layers[PREDICTION_LAYER].data)[stroke] == 3).all()

    widget.rank()
    qtbot.waitUntil(lambda: widget.review_list.count() == 7, timeout=JOB_TIMEOUT_MS)
    item = widget.review_items[-1]
    widget._jump(widget.review_list.item(6))
    assert str(widget.current) == item.image
    top, left, height, width = item.focus
    assert tuple(viewer.camera.center[-2:]) == pytest.approx((top + height / 2,
                                                              left + width / 2))


def test_calibrate_refits_the_class_balance_and_predicts_again(make_napari_viewer, qtbot,
                                                                trained_run, monkeypatch):
    from napari_histo_wsss.core.corrections import calibrate
    from napari_histo_wsss.core.inference import calibration
    from napari_histo_wsss.widgets.corrections import PAINT_LAYER, CorrectionsWidget

    # The 7 bundled val images and the corrected ones: no class is in 8 of them.
    monkeypatch.setattr(calibration, "MIN_CLASS_IMAGES", 2)
    monkeypatch.setattr(calibrate, "MIN_CLASS_IMAGES", 2)

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "6. Correct and retrain")
    assert isinstance(widget, CorrectionsWidget)
    widget.run_folder.value = trained_run.root
    widget.image.value = widget.image.choices[-1]
    widget.open_image()
    qtbot.waitUntil(lambda: widget._predictor is not None, timeout=JOB_TIMEOUT_MS)
    qtbot.waitUntil(lambda: not widget.image_runner.busy, timeout=JOB_TIMEOUT_MS)
    paint = viewer.layers[PAINT_LAYER]
    paint.data[disk((60, 60), 25, shape=paint.data.shape)] = 2  # stroma
    paint.refresh()
    strategy = "ce-corrections" if trained_run.segmenter_checkpoint(
        "ce-corrections").is_file() else "ce"
    saved = trained_run.segmenter_dir(strategy) / "class_offsets.json"
    saved.unlink(missing_ok=True)

    widget.calibrate_button.clicked.emit()
    qtbot.waitUntil(lambda: widget.calibrate_runner.state in (JobState.DONE, JobState.FAILED),
                    timeout=JOB_TIMEOUT_MS)
    assert widget.calibrate_runner.state is JobState.DONE, widget.calibrate_runner.error
    assert saved.is_file()
    assert widget.run_info.value.startswith("class offsets")
    assert "7 val images" in widget.run_info.value
    qtbot.waitUntil(lambda: widget._predictor is not None and not widget.image_runner.busy,
                    timeout=JOB_TIMEOUT_MS)
