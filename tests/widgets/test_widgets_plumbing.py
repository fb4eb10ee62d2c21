"""The shared widget plumbing: job runner states, stop and failure, settings, layer helpers.

Jobs here are small generators of real core events, so these tests take a second; the
widgets driving real training jobs are tested in ``test_widgets_workflow.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.errors import DatasetError
from napari_histo_wsss.core.events import Batch, Done, Started
from napari_histo_wsss.widgets import _settings
from napari_histo_wsss.widgets._jobs import JobRunner, JobState, describe_error
from napari_histo_wsss.widgets._layers import display_labels, put_layer
from napari_histo_wsss.widgets.class_colours import class_features, labels_colormap


@pytest.fixture(autouse=True)
def private_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(_settings.CONFIG_DIR_ENV_VAR, str(tmp_path / "config"))


def counting_job(steps: int, delay: float = 0.01):
    """A job that honours the stop token between steps, like the core's training loops."""

    def make_job(stop):
        yield Started("count", total_epochs=1, batches_per_epoch=steps)
        for index in range(steps):
            if stop.requested:
                yield Done("count", index, stopped=True)
                return
            time.sleep(delay)
            yield Batch("count", epoch=0, index=index, total=steps, loss=1.0 / (index + 1))
        yield Done("count", steps)

    return make_job


def failing_job(stop):
    yield Started("broken", total_epochs=1, batches_per_epoch=1)
    raise DatasetError("no label in the file name", "/data/patch.png")


def test_settings_round_trip_and_broken_file(tmp_path):
    _settings.save_settings("train_classifier", {"epochs": 3, "run_folder": "/runs/a"})
    _settings.save_settings("compare", {"grid": True})
    assert _settings.load_settings("train_classifier") == {"epochs": 3, "run_folder": "/runs/a"}
    assert _settings.load_settings("compare") == {"grid": True}
    _settings.settings_path().write_text("{not json")
    assert _settings.load_settings("compare") == {}


def test_describe_error_is_one_line():
    assert describe_error(DatasetError("bad label", "/d/x.png")) == "/d/x.png: bad label"
    assert describe_error(RuntimeError("CUDA out of memory.\nTried to allocate")) == \
        "out of memory: try a smaller batch size, or the CPU"
    assert describe_error(MemoryError()) == describe_error(RuntimeError("CUDA out of memory"))
    assert describe_error(RuntimeError("a memory error elsewhere")) == \
        "RuntimeError: a memory error elsewhere"
    assert describe_error(ValueError("first\nsecond")) == "ValueError: first"


def test_display_labels_and_colours():
    mask = np.array([[0, 1, 2, 3, 255]], dtype=np.uint8)  # tumor, stroma, normal, bg, unlabelled
    assert display_labels(mask, WSSS4LUAD.num_classes).tolist() == [[1, 2, 3, 0, 0]]
    colormap = labels_colormap(WSSS4LUAD)
    assert np.allclose(colormap.color_dict[1], [0, 0.5, 1, 1])  # navy, brightened to read
    assert colormap.color_dict[0][3] == 0  # background is transparent
    assert class_features(WSSS4LUAD)["class"] == ["background", "tumor", "stroma", "normal"]


@pytest.mark.gui
def test_runner_done_then_stopped(qtbot):
    runner = JobRunner("counting")
    states, events = [], []
    runner.state_changed.connect(states.append)
    runner.event.connect(events.append)

    runner.start(counting_job(5))
    qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
    assert states == [JobState.RUNNING, JobState.DONE]
    assert [type(e).__name__ for e in events] == ["Started"] + ["Batch"] * 5 + ["Done"]

    states.clear()
    runner.start(counting_job(10_000, delay=0.005))
    qtbot.waitUntil(lambda: sum(isinstance(e, Batch) for e in events) > 8, timeout=10_000)
    runner.stop()
    assert runner.state is JobState.STOPPING
    qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
    assert states == [JobState.RUNNING, JobState.STOPPING, JobState.STOPPED]
    assert runner.last_done.stopped and runner.last_done.result < 10_000


@pytest.mark.gui
def test_runner_failure_is_one_notification(qtbot, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    runner = JobRunner("Train classifier")
    runner.start(failing_job)
    qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
    assert runner.state is JobState.FAILED
    # The toast's one line starts with the file's name; the full path stays in the status.
    assert shown == ["Train classifier: patch.png: no label in the file name"]
    assert runner.error == "/data/patch.png: no label in the file name"


@pytest.mark.gui
def test_window_close_stops_gracefully_and_shutdown_detaches(qtbot):
    """napari cancels tasks with quit() on close: the job must still end with its checkpoint."""
    runner = JobRunner("counting")
    events = []
    runner.event.connect(events.append)
    runner.start(counting_job(10_000, delay=0.005))
    qtbot.waitUntil(lambda: len(events) > 3, timeout=10_000)
    runner._worker.quit()
    qtbot.waitUntil(lambda: not runner.busy, timeout=10_000)
    assert runner.state is JobState.STOPPED and runner.last_done.stopped

    runner.start(counting_job(10_000, delay=0.005))
    worker = runner._worker
    qtbot.waitUntil(lambda: len(events) > 10, timeout=10_000)
    seen = len(events)
    finished = []
    worker.finished.connect(lambda: finished.append(True))  # before shutdown: no race
    runner.shutdown()
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    qtbot.wait(50)
    assert len(events) <= seen + 1  # nothing more reaches a closed widget


@pytest.mark.gui
def test_put_layer_updates_in_place(make_napari_viewer):
    viewer = make_napari_viewer()
    first = put_layer(viewer, "labels", "mask", np.zeros((8, 8), np.uint8), opacity=0.3)
    first.opacity = 0.8  # the user's change survives the next image
    second = put_layer(viewer, "labels", "mask", np.ones((16, 16), np.uint8), opacity=0.3)
    assert second is first and second.opacity == 0.8 and second.data.shape == (16, 16)
    image = put_layer(viewer, "image", "mask", np.zeros((4, 4, 3), np.uint8), rgb=True)
    assert image is not first and len(viewer.layers) == 1


@pytest.mark.gui
def test_put_layer_recolours_only_when_the_colours_change(make_napari_viewer):
    from napari_histo_wsss.core.data.classes import WSSS4LUAD
    from napari_histo_wsss.widgets._layers import cam_colormap
    from napari_histo_wsss.widgets.class_colours import class_features, labels_colormap

    viewer = make_napari_viewer()
    mask = np.zeros((8, 8), np.uint8)
    labels = put_layer(viewer, "labels", "mask", mask, colormap=labels_colormap(WSSS4LUAD),
                       features=class_features(WSSS4LUAD))
    kept_colours, kept_table = labels.colormap, labels.features
    put_layer(viewer, "labels", "mask", mask + 1, colormap=labels_colormap(WSSS4LUAD),
              features=class_features(WSSS4LUAD))
    assert labels.colormap is kept_colours and labels.features is kept_table
    other = WSSS4LUAD.__class__.from_dict({**WSSS4LUAD.to_dict(),
                                           "colours": [[255, 0, 0]] * 4})
    put_layer(viewer, "labels", "mask", mask, colormap=labels_colormap(other))
    assert labels.colormap is not kept_colours
    assert np.allclose(labels.colormap.map(np.array([1]))[0][:3], (1.0, 0.0, 0.0))

    cam = put_layer(viewer, "image", "cam", np.zeros((8, 8), np.float32),
                    colormap=cam_colormap("tumor", (0, 64, 128)))
    first = cam.colormap
    put_layer(viewer, "image", "cam", np.ones((8, 8), np.float32),
              colormap=cam_colormap("tumor", (0, 64, 128)))
    assert cam.colormap is first
    put_layer(viewer, "image", "cam", np.ones((8, 8), np.float32),
              colormap=cam_colormap("tumor", (128, 0, 0)))
    assert cam.colormap is not first


@pytest.mark.gui
def test_closing_the_dock_stops_the_job_gracefully(make_napari_viewer, qtbot):
    """The dock's close button orphans the widget: its job must stop (checkpoint first)."""
    from napari_histo_wsss.widgets._base import JobWidget

    endings = []

    def recording_job(stop):
        for index in range(10_000):
            if stop.requested:
                endings.append(("stopped", index))
                yield Done("count", index, stopped=True)
                return
            time.sleep(0.005)
            yield Batch("count", epoch=0, index=index, total=10_000)

    class CountingWidget(JobWidget):
        def build_job(self):
            return recording_job, "cpu"

    viewer = make_napari_viewer()
    widget = CountingWidget(viewer, "counting", plot=False)
    widget.finish_layout()
    viewer.window.add_dock_widget(widget, name="counting")
    widget.toggle_button.click()
    worker = widget.runner._worker
    qtbot.waitUntil(lambda: widget.progress.batch_bar.value() > 3, timeout=10_000)
    with qtbot.waitSignal(worker.finished, timeout=10_000):
        viewer.window.remove_dock_widget(widget.native)
    assert endings and endings[0][0] == "stopped"
    widget.native.deleteLater()


def test_legend_recounts_a_layer_written_in_place(make_napari_viewer, qtbot):
    """A slide being segmented is painted in place (no data event): the Segment slide widget
    asks the legend to count its shares again, which were stuck at 0 % before."""
    from napari_histo_wsss.widgets.legend import LegendWidget

    viewer = make_napari_viewer()
    legend = LegendWidget(viewer)
    layer = viewer.add_labels(np.zeros((100, 100), np.uint8), colormap=labels_colormap(WSSS4LUAD),
                              features=class_features(WSSS4LUAD))
    viewer.layers.selection.active = layer
    qtbot.waitUntil(lambda: "…" not in legend.shares().values(), timeout=10_000)
    assert legend.shares()["tumor"] == "0.0 %"
    layer.data[:25] = 1  # tumour, then stroma, written in place
    layer.data[25:] = 2
    legend.recount(layer)
    qtbot.waitUntil(lambda: legend.shares()["tumor"] == "25.0 %", timeout=10_000)
    assert legend.shares()["stroma"] == "75.0 %"


def last_json_line_of(code: str, tmp_path):
    """Run ``code`` in a fresh interpreter (settings under ``tmp_path``) and parse the last
    line it printed as JSON."""
    env = {**os.environ, _settings.CONFIG_DIR_ENV_VAR: str(tmp_path / "config")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_building_every_dock_widget_leaves_torch_to_the_background_import(tmp_path):
    """A dock that imports torch while it is built freezes napari for seconds (2.1 s measured
    when the classifier widget's run description pulled torch in): built in a fresh
    interpreter, no dock of the plugin's manifest may have loaded it before the event loop
    runs."""
    code = (
        "import json, sys, napari, npe2\n"
        "manifest = npe2.PluginManifest.from_distribution('napari-histo-wsss')\n"
        "viewer = napari.Viewer(show=False)\n"
        "docks = manifest.contributions.widgets\n"
        "for dock in docks:\n"
        "    dock.get_callable()(viewer)\n"
        "print(json.dumps([len(docks), 'torch' in sys.modules]))\n"
    )
    docks, torch_loaded = last_json_line_of(code, tmp_path)
    assert docks >= 7  # every dock of the manifest was built
    assert torch_loaded is False


def test_background_warmup_loads_what_the_first_job_and_layer_would(tmp_path):
    """timm (the first model), scipy.ndimage and pint's unit registry (napari's first layer)
    and vispy's dash patterns (its first labels layer) are loaded by the warm-up thread, and
    the registry it built serves napari's layers."""
    code = (
        "import json, sys, time, napari, numpy as np, pint\n"
        "from pint.registry import LazyRegistry\n"
        "from qtpy.QtWidgets import QApplication\n"
        "from napari_histo_wsss.widgets import _warmup\n"
        "from napari_histo_wsss.widgets.train_classifier import TrainClassifierWidget\n"
        "viewer = napari.Viewer(show=False)\n"
        "lazy_before = isinstance(pint.get_application_registry().get(), LazyRegistry)\n"
        "TrainClassifierWidget(viewer)\n"
        "end = time.time() + 240\n"
        "while not _warmup.ready() and time.time() < end:\n"
        "    QApplication.processEvents(); time.sleep(0.01)\n"
        "built = pint.get_application_registry().get()\n"
        "layer = viewer.add_image(np.zeros((8, 8), np.uint8))\n"
        "from vispy.visuals.line.dash_atlas import _make_pattern\n"
        "patterns = _make_pattern.cache_info().currsize\n"
        "print(json.dumps([lazy_before, isinstance(built, LazyRegistry),\n"
        "                  all(m in sys.modules for m in ('timm', 'scipy.ndimage')),\n"
        "                  str(layer.units[0]), patterns]), flush=True)\n"
        "viewer.close()\n"
        "import os; os._exit(0)  # Qt and torch can crash in their exit-time teardown\n"
    )
    lazy_before, lazy_after, imported, unit, patterns = last_json_line_of(code, tmp_path)
    assert lazy_before and not lazy_after and imported
    assert unit == "pixel"
    assert patterns > 0  # built before any labels layer exists


def test_a_dock_built_after_torch_and_the_canvas_does_not_crash_in_triton(tmp_path):
    """torch loaded before the viewer (another plugin, a script) makes a dock import timm at
    once, after the canvas: under Mesa OpenGL (Xvfb here) that loaded libLLVM, and Triton's
    import then crashed the process (segmentation fault) before Triton was kept out on this
    path too."""
    code = (
        "import json, sys, torch, napari\n"
        "from napari_histo_wsss.widgets.train_classifier import TrainClassifierWidget\n"
        "viewer = napari.Viewer(show=False)\n"
        "TrainClassifierWidget(viewer)\n"
        "print(json.dumps(['timm' in sys.modules]), flush=True)\n"
        "import os; os._exit(0)  # Qt and torch can crash in their exit-time teardown\n"
    )
    assert last_json_line_of(code, tmp_path) == [True]


def test_native_loads_without_the_gil_load_and_fail_as_python_does(tmp_path):
    """Inside the warm-up's loader, extension modules import and ctypes libraries load as
    before (a missing one raises the same OSError), and both hooks are put back after."""
    code = (
        "import ctypes, ctypes.util, importlib, importlib.machinery, importlib.util, json, sys\n"
        "from napari_histo_wsss.widgets._warmup import native_loads_without_the_gil\n"
        "plain = (ctypes._dlopen, importlib.machinery.ExtensionFileLoader.create_module)\n"
        "names = ('_sqlite3', 'audioop', '_curses', '_dbm', 'xxlimited', '_lzma', '_bz2')\n"
        "fresh = [m for m in names if m not in sys.modules and importlib.util.find_spec(m)]\n"
        "with native_loads_without_the_gil():\n"
        "    loaded = [importlib.import_module(m).__name__ for m in fresh]\n"
        "    import lzma, bz2\n"
        "    libm = ctypes.CDLL(ctypes.util.find_library('m'))\n"
        "    libm.cos.restype = ctypes.c_double; libm.cos.argtypes = [ctypes.c_double]\n"
        "    try:\n"
        "        ctypes.CDLL('libno-such-library-here.so')\n"
        "        error = ''\n"
        "    except OSError as e:\n"
        "        error = str(e)\n"
        "back = plain == (ctypes._dlopen, importlib.machinery.ExtensionFileLoader.create_module)\n"
        "print(json.dumps([loaded, lzma.decompress(lzma.compress(b'he')).decode(),\n"
        "                  bz2.decompress(bz2.compress(b'he')).decode(), libm.cos(0.0),\n"
        "                  error, back]))\n"
    )
    loaded, lz, bz, cosine, error, back = last_json_line_of(code, tmp_path)
    assert loaded  # extension modules not loaded before were imported inside
    assert lz == bz == "he" and cosine == 1.0
    assert "libno-such-library-here.so" in error
    assert back


def test_progress_bar_paints_its_new_value_asynchronously(qtbot):
    """A plain QProgressBar paints inside setValue (a whole-window flush next to napari's
    canvas); the panel's bars paint with the next event-loop pass instead."""
    from qtpy.QtWidgets import QProgressBar

    from napari_histo_wsss.widgets._progress import QuietProgressBar

    def counting(base):
        class Counting(base):
            paints = 0

            def paintEvent(self, event):  # noqa: N802
                type(self).paints += 1
                super().paintEvent(event)
        return Counting

    for base, synchronous in ((QProgressBar, True), (QuietProgressBar, False)):
        bar = counting(base)()
        bar.setFormat("batch %v / %m")
        bar.setRange(0, 40)
        qtbot.addWidget(bar)
        bar.show()
        qtbot.waitUntil(lambda bar=bar: bar.paints > 0, timeout=2000)
        before = bar.paints
        bar.setValue(3)
        assert bar.value() == 3
        assert (bar.paints > before) is synchronous
        qtbot.waitUntil(lambda bar=bar, before=before: bar.paints > before, timeout=2000)


def test_layer_steps_yield_to_the_event_loop_and_a_new_run_replaces_the_old(qtbot):
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QWidget

    from napari_histo_wsss.widgets._layers import LayerSteps

    owner = QWidget()
    qtbot.addWidget(owner)
    steps = LayerSteps(owner)
    done: list[str] = []
    ticks: list[int] = []
    timer = QTimer(owner)
    timer.timeout.connect(lambda: ticks.append(len(done)))
    timer.start(0)

    def slow(name):
        def step():
            time.sleep(LayerSteps.SLICE_MS / 1000 + 0.01)
            done.append(name)
        return step

    steps.run([slow("a"), slow("b"), slow("c")])
    assert done == ["a"] and steps.busy  # the rest waits for the event loop
    qtbot.waitUntil(lambda: not steps.busy, timeout=2000)
    assert done == ["a", "b", "c"]
    assert 1 in ticks and 2 in ticks  # the loop ran between the steps

    done.clear()
    steps.run([slow("old 1"), slow("old 2")])
    steps.run([lambda: done.append("new 1"), lambda: done.append("new 2")])  # fast: one pass
    assert done == ["old 1", "new 1", "new 2"] and not steps.busy
    qtbot.wait(50)
    assert done == ["old 1", "new 1", "new 2"]  # the old run's last step never ran


def test_layers_shown_lets_a_job_wait_for_its_layers_or_a_stop():
    """The job's side of the handshake: it waits until the widget says the layers are in,
    and gives up at once on a stop request (and after its timeout otherwise)."""
    import threading

    from napari_histo_wsss.core.events import StopToken
    from napari_histo_wsss.widgets._layers import LayersShown

    shown, stop = LayersShown(timeout_s=30.0), StopToken()
    shown.expect()
    threading.Timer(0.1, shown.shown).start()
    assert shown.wait(stop) is True

    shown.expect()
    threading.Timer(0.1, stop.request).start()
    assert shown.wait(stop) is False  # long before the 30 s timeout: the test would hang

    assert LayersShown(timeout_s=0.1).wait(StopToken()) is False  # nobody shows anything
