"""Segment slide widget: a run's segmenter over a whole slide, tile by tile, into OME-Zarr.

The job is the core's lazy tiled inference: it reads windows with a halo at the model's
resolution, skips glass, blends tile borders and writes finished rows into the output zarr; a
stopped run continues where it stopped when started again with the same settings.

While it runs, the result is a multiscale labels layer over the slide that fills in: the full
resolution level is read from the zarr (refreshed from the main thread as rows are written),
and the coarse levels, which the core only builds at the end, are painted in memory from the
rows the job reports, so the overview fills in too. At the end the layer shows the finished
pyramid, the class probabilities are added as hidden layers, and the result can be exported
as OME-Zarr or as GeoJSON for QuPath.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, SpinBox
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QWidget

from ..core.inference.tiling import BLEND_MODES
from ._base import (
    JobWidget,
    device_field,
    engine_fields,
    engine_message,
    engine_options,
    info_label,
    run_folder_field,
    set_info,
)
from ._jobs import JobState
from ._layers import LayersShown, LayerSteps
from ._runs import describe_run, given_path
from ._shared_run import shared_run_folder
from ._tooltips import TOOLTIPS
from .legend import ensure_legend

if TYPE_CHECKING:
    import napari

STAGE = "segment-slide"
BEST = "best on validation"
#: Coarse levels painted in memory while the job runs, up to this many pixels in all.
LIVE_LEVELS_BUDGET = 64 * 2**20
#: How often the growing result is redrawn.
REFRESH_MS = 500
#: The job's Previews carrying the opened ``LiveSegmentation`` and, at the end, the layer data
#: of the finished output.
LIVE_OUTPUT = "live output"
FINISHED_OUTPUT = "finished output"
#: The longest the job waits for its live layer to be shown (a closed widget never shows it).
LIVE_LAYER_WAIT_S = 3.0


class LiveSegmentation:
    """The pyramid shown while a slide is segmented: zarr level 0, in-memory coarse levels.

    Level k of the core's label pyramid samples level 0 at every 2**k-th pixel, so painting
    each finished row with the same stride reproduces the final pyramid exactly (rows a
    resumed run wrote before are sampled from level 0 when it opens): the finished layer is
    this one, renamed. Opened in the job's thread (zarr reads).
    """

    def __init__(self, path: Path):
        import zarr

        from ..core.wsi.ome_zarr_labels import DONE_PATH, LABELS_PATH, open_segmentation

        root = zarr.open_group(str(path), mode="r")
        group = root[LABELS_PATH]
        datasets = group.attrs["multiscales"][0]["datasets"]
        self.path = path
        self.segmentation = open_segmentation(path)
        #: Set by the widget once the layer is in the viewer.
        self.shown = LayersShown(LIVE_LAYER_WAIT_S)
        self.stored = [group[dataset["path"]] for dataset in datasets]
        self.levels: list[Any] = [self.stored[0]]
        budget = LIVE_LEVELS_BUDGET
        in_memory = []
        for array in reversed(self.stored[1:]):  # coarsest first, while the budget lasts
            size = int(np.prod(array.shape))
            in_memory.append(size <= budget)
            budget -= size if size <= budget else 0
        resumed = bool(np.asarray(root[DONE_PATH][:]).any())
        for level, (array, painted) in enumerate(
                zip(self.stored[1:], reversed(in_memory), strict=True), start=1):
            if not painted:
                self.levels.append(array)
            elif resumed:  # rows written before this run: sampled as the core will
                step = 2**level
                self.levels.append(np.asarray(self.stored[0][::step, ::step]))
            else:
                self.levels.append(np.zeros(array.shape, dtype=array.dtype))

    def paint(self, y: int, x: int, labels: np.ndarray) -> None:
        """Copy a finished block row (level-0 origin ``y, x``) into the in-memory levels."""
        for level, array in enumerate(self.levels[1:], start=1):
            if not isinstance(array, np.ndarray):
                continue
            step = 2**level
            row0, col0 = (-y) % step, (-x) % step
            sampled = labels[row0::step, col0::step]
            top, left = (y + row0) // step, (x + col0) // step
            height = min(sampled.shape[0], array.shape[0] - top)
            width = min(sampled.shape[1], array.shape[1] - left)
            if height > 0 and width > 0:
                array[top:top + height, left:left + width] = sampled[:height, :width]


def segment_with_layer_data(predictor, slide_path: Path, out: Path, stop, options: dict):
    """The core's ``segment_slide`` events, plus what the widget shows read here, in the job's
    thread (opening the output's zarr levels costs the main thread 0.2-1 s): the live pyramid
    after ``Started``, and the finished output's layer data before ``Done``."""
    from .._reader import segmentation_layer_data
    from ..core.events import Done, Preview, Started
    from ..core.wsi.ome_zarr_labels import open_segmentation
    from ..core.wsi.slide_inference import segment_slide

    for event in segment_slide(predictor, slide_path, out, stop=stop, resume=True, **options):
        if isinstance(event, Done) and event.stage == STAGE and not event.stopped:
            yield Preview(STAGE, FINISHED_OUTPUT, segmentation_layer_data(open_segmentation(out)))
        yield event
        if isinstance(event, Started) and event.stage == STAGE:
            live = LiveSegmentation(out)
            yield Preview(STAGE, LIVE_OUTPUT, live)
            # napari builds the layer 3-5x slower while this thread computes beside it
            # (Python's lock): wait until it is shown (or a stop).
            live.shown.wait(stop)


def segmentation_geometry(slide_layer, level0_downsample: float) -> dict[str, tuple]:
    """Scale, translate and units that put output pixels over the slide pixels they cover."""
    scale = np.asarray(slide_layer.scale[-2:], dtype=float)
    translate = np.asarray(slide_layer.translate[-2:], dtype=float)
    return {"scale": tuple(scale * level0_downsample),
            "translate": tuple(translate + scale * (level0_downsample - 1) / 2),
            "units": tuple(slide_layer.units[-2:])}


def slide_path_of(layer) -> Path | None:
    """Where a slide layer was read from (our reader's metadata, else napari's source)."""
    path = (layer.metadata or {}).get("path") or getattr(layer.source, "path", None)
    return Path(path) if path else None


class SegmentSlideWidget(JobWidget):
    """Whole-slide segmentation with a run's segmenter, shown as it is written."""

    settings_key = "segment_slide"
    start_text = "Segment slide"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer, "Segment slide", epochs=False, plot=False)
        self.slide_layer = ComboBox(label="slide layer", choices=self._slide_layers,
                                    tooltip=TOOLTIPS["slide_layer"])
        self.slide_file = FileEdit(mode="r", label="or slide file", nullable=True,
                                   tooltip=TOOLTIPS["slide_file"])
        self.run_folder = run_folder_field()
        self.run_info = info_label()
        self.strategy = ComboBox(label="segmenter", choices=self._strategy_choices,
                                 tooltip=TOOLTIPS["strategy"])
        self.output = FileEdit(mode="d", label="output (.zarr)", nullable=True,
                               tooltip=TOOLTIPS["output"])
        self.device = device_field()
        self.target_mpp = FloatSpinBox(label="target mpp", min=0.0, max=100.0, step=0.05,
                                       value=0.0, tooltip=TOOLTIPS["target_mpp"])
        self.target_mpp.native.setSpecialValueText("model's")
        self.level = SpinBox(label="level", min=-1, max=20, value=-1, tooltip=TOOLTIPS["level"])
        self.level.native.setSpecialValueText("auto")
        self.tile = SpinBox(label="tile", min=64, max=4096, step=64, value=512,
                            tooltip=TOOLTIPS["tile"])
        self.halo = SpinBox(label="halo", min=0, max=1024, step=8, value=64,
                            tooltip=TOOLTIPS["halo"])
        self.blend = ComboBox(label="blend", choices=BLEND_MODES.names(),
                              value="gaussian", tooltip=TOOLTIPS["blend"])
        self.batch_size = SpinBox(label="batch size", min=1, max=256, value=8,
                                  tooltip=TOOLTIPS["batch_size"])
        self.tissue_mask = CheckBox(text="skip glass (tissue mask)", value=True,
                                    tooltip=TOOLTIPS["tissue_mask"])
        self.extend([self.slide_layer, self.slide_file, self.run_folder, self.run_info,
                     self.strategy, self.output, self.device])
        self.engine, self.precision = engine_fields()
        self.advanced.extend([self.target_mpp, self.level, self.tile, self.halo, self.blend,
                              self.batch_size, self.tissue_mask, self.engine, self.precision])

        self.export_zarr_button = QPushButton("Export OME-Zarr...")
        self.export_zarr_button.setToolTip(TOOLTIPS["export_zarr"])
        self.export_geojson_button = QPushButton("Export GeoJSON...")
        self.export_geojson_button.setToolTip(TOOLTIPS["export_geojson"])
        exports = QWidget()
        row = QHBoxLayout(exports)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.export_zarr_button)
        row.addWidget(self.export_geojson_button)
        self.finish_layout(below=(exports,))
        self.remember(slide_file=self.slide_file, run_folder=self.run_folder,
                      strategy=self.strategy, device=self.device, target_mpp=self.target_mpp,
                      level=self.level, tile=self.tile, halo=self.halo, blend=self.blend,
                      batch_size=self.batch_size, tissue_mask=self.tissue_mask,
                      engine=self.engine, precision=self.precision)
        self._locked.append(self.output)

        self.export_runner = self.add_runner("Export")
        self.export_runner.event.connect(self.progress.show_event)
        self.export_zarr_button.clicked.connect(self._ask_zarr_destination)
        self.export_geojson_button.clicked.connect(self._ask_geojson_destination)
        self._live: LiveSegmentation | None = None
        self._finished_layers: list[tuple] = []
        self._live_layer = None
        self._slide_layer_at_start = None
        self._geometry: dict[str, tuple] = {}
        self._dirty = False
        self._result: Path | None = None
        self._refresh_timer = QTimer(interval=REFRESH_MS, timeout=self._refresh_live_layer)
        self._layer_steps = LayerSteps(self.native)
        self.run_folder.changed.connect(self._load_run)
        self.restore_settings()
        shared_run_folder(viewer).follow(self.run_folder)
        self._load_run()
        self._set_result(None)

    # -- fields --------------------------------------------------------------------------------
    def _slide_layers(self, *_: Any) -> list[tuple[str, Any]]:
        """RGB image layers, slides (multiscale) first: the choices of the slide combo."""
        from napari.layers import Image

        layers = [layer for layer in self.viewer.layers
                  if isinstance(layer, Image) and getattr(layer, "rgb", False)]
        layers.sort(key=lambda layer: not layer.multiscale)
        return [(layer.name, layer) for layer in layers]

    def _strategy_choices(self, *_: Any) -> list[str]:
        from ..core.runs.run_dir import RunDirectory

        folder = given_path(self.run_folder.value) if hasattr(self, "run_folder") else None
        trained = RunDirectory(folder).segmenter_strategies() if folder is not None else []
        return [BEST, *trained]

    def _load_run(self, *_: Any) -> None:
        from ..core.errors import HistoWsssError

        try:
            set_info(self.run_info, describe_run(given_path(self.run_folder.value)))
        except HistoWsssError as error:
            set_info(self.run_info, str(error), error=True)
        self.strategy.reset_choices()

    def _slide_source(self) -> tuple[Path, Any]:
        """(slide file, slide layer or None); the layer's own file wins over the file field."""
        from ..core.errors import ConfigError

        layer = self.slide_layer.value
        path = slide_path_of(layer) if layer is not None else None
        if path is None:
            path = given_path(self.slide_file.value)
            layer = None if path is None else layer
        if path is None:
            raise ConfigError("open a slide (File > Open, or the sample slide) or choose its "
                              "file")
        return path, layer

    # -- the job -------------------------------------------------------------------------------
    def build_job(self):
        from ..core.errors import ConfigError
        from ..core.runs.run_dir import RunDirectory

        slide_path, layer = self._slide_source()
        run_folder = given_path(self.run_folder.value)
        if run_folder is None or not RunDirectory(run_folder).segmenter_strategies():
            raise ConfigError("choose a run folder with a trained segmenter")
        strategy = None if self.strategy.value == BEST else self.strategy.value
        out = given_path(self.output.value) or (
            run_folder / "slides" / f"{slide_path.stem}-{strategy or 'best'}.zarr")
        self.output.value = out
        options = {
            "target_mpp": self.target_mpp.value or None,
            "level": None if self.level.value < 0 else self.level.value,
            "tile": self.tile.value, "halo": self.halo.value, "blend": self.blend.value,
            "batch_size": self.batch_size.value, "tissue_mask": self.tissue_mask.value,
        }
        device_name, engine = self.device.value, engine_options(self.engine, self.precision)
        self._slide_layer_at_start = layer

        def make_job(stop):
            from ..core.devices import resolve_device
            from ..core.inference.predict import load_predictor

            predictor = load_predictor(run_folder, resolve_device(device_name),
                                       strategy=strategy, **engine)
            yield engine_message(STAGE, predictor.engine.record())
            yield from segment_with_layer_data(predictor, slide_path, out, stop, options)

        return make_job, device_name

    def on_job_starting(self) -> None:
        self._set_result(None)
        self._live = None
        self._finished_layers = []

    def on_job_event(self, event: Any) -> None:
        from ..core.events import Done, Preview

        if isinstance(event, Preview) and event.name == LIVE_OUTPUT:
            self._start_live_layer(event.data)
        elif isinstance(event, Preview) and event.name == FINISHED_OUTPUT:
            self._finished_layers = event.data
        elif isinstance(event, Preview) and event.name == "labels" and self._live is not None:
            data = event.data
            self._live.paint(int(data["y"]), int(data["x"]), np.asarray(data["labels"]))
            self._dirty = True
        elif isinstance(event, Done) and event.stage == STAGE and not event.stopped:
            self._show_result(Path(event.result), self._finished_layers)

    def on_job_finished(self, state: JobState) -> None:
        self._refresh_timer.stop()
        self._refresh_live_layer()

    def _start_live_layer(self, live: LiveSegmentation) -> None:
        """Show the output zarr (opened in the job's thread) as a multiscale labels layer
        that fills in."""
        segmentation = live.segmentation
        self._live = live
        self._geometry = self._geometry_for(segmentation)
        try:
            self._live_layer = self._put_labels_layer(
                f"{segmentation.attrs.get('slide', {}).get('name', live.path.stem)} "
                "(segmenting)", self._live.levels, segmentation.spec)
        finally:
            live.shown.shown()
        self._refresh_timer.start()
        ensure_legend(self.viewer)

    def _geometry_for(self, segmentation) -> dict[str, tuple]:
        layer = self._slide_layer_at_start
        if layer is not None and layer in self.viewer.layers:
            return segmentation_geometry(layer, segmentation.level0_downsample)
        slide_pixel = segmentation.slide_mpp or 1.0
        pixel = slide_pixel * segmentation.level0_downsample
        offset = (pixel - slide_pixel) / 2
        unit = "micrometer" if segmentation.slide_mpp else "pixel"
        return {"scale": (pixel, pixel), "translate": (offset, offset), "units": (unit, unit)}

    def _put_labels_layer(self, name: str, levels: list, spec):
        from .class_colours import class_features, labels_colormap

        if self._live_layer is not None and self._live_layer in self.viewer.layers:
            self.viewer.layers.remove(self._live_layer)
        return self.viewer.add_labels(levels, name=name, multiscale=True, opacity=0.5,
                                      colormap=labels_colormap(spec),
                                      features=class_features(spec), **self._geometry)

    def _refresh_live_layer(self) -> None:
        if self._dirty and self._live_layer is not None and self._live_layer in self.viewer.layers:
            self._dirty = False
            self._live_layer.refresh()
            ensure_legend(self.viewer).recount(self._live_layer)  # shares follow the rows

    def _show_result(self, out: Path, layer_data: list[tuple]) -> None:
        """The live pyramid becomes the result; probabilities come as hidden layers (the
        layers napari's reader makes for this zarr, read in the job's thread, put over the
        slide layer), one per event-loop pass (``LayerSteps``: 0.1-0.25 s each in napari)."""
        self._refresh_timer.stop()
        steps = [lambda data=data, kwargs=kwargs, kind=kind: self._put_result_layer(data, kwargs,
                                                                                   kind)
                 for data, kwargs, kind in layer_data]
        steps.append(lambda: self._set_result(out))
        self._live = None
        self._layer_steps.run(steps)

    @property
    def showing(self) -> bool:
        """Whether the finished output is still being turned into layers."""
        return self._layer_steps.busy

    def _put_result_layer(self, data, kwargs: dict, kind: str) -> None:
        from napari.layers import Layer

        kwargs = {**kwargs, **self._geometry}
        live = self._live_layer
        if kind == "labels" and live is not None and live in self.viewer.layers:
            # The live pyramid already holds the finished labels (its coarse levels were
            # painted as the core samples them): renaming it spares napari a layer removal
            # and a multiscale layer build, 0.2-0.5 s each on the main thread.
            live.metadata = kwargs["metadata"]
            live.name = kwargs["name"]
            live.refresh()  # levels kept in the zarr are written when the slide is done
            return
        if kwargs["name"] in self.viewer.layers:
            self.viewer.layers.remove(kwargs["name"])
        layer = Layer.create(data, kwargs, kind)
        if kind == "labels":
            self._live_layer = layer
        self.viewer.add_layer(layer)

    @property
    def live_layer(self):
        """The labels layer of the current (or last) segmentation."""
        return self._live_layer

    # -- exports -------------------------------------------------------------------------------
    def _set_result(self, out: Path | None) -> None:
        self._result = out
        for button in (self.export_zarr_button, self.export_geojson_button):
            button.setEnabled(out is not None)

    def _ask_zarr_destination(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getSaveFileName(self.native, "Export OME-Zarr",
                                             str(self._result.with_name(
                                                 self._result.stem + "-copy.zarr")),
                                             "OME-Zarr (*.zarr)")[0]
        if folder:
            self.export_zarr(Path(folder))

    def _ask_geojson_destination(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path = QFileDialog.getSaveFileName(self.native, "Export GeoJSON",
                                           str(self._result.with_suffix(".geojson")),
                                           "GeoJSON (*.geojson *.json)")[0]
        if path:
            self.export_geojson(Path(path))

    def _finished_result(self) -> Path:
        from ..core.errors import ConfigError

        if self._result is None:
            raise ConfigError("segment a slide to the end before exporting it")
        return self._result

    def export_zarr(self, destination: Path) -> None:
        """Copy the finished OME-Zarr to ``destination`` (in a worker)."""
        self.export_runner.start(copy_zarr_job(self._finished_result(), destination))
        self.progress.set_status(f"exporting OME-Zarr to {destination}")

    def export_geojson(self, destination: Path) -> None:
        """Write the tissue regions as GeoJSON polygons for QuPath (in a worker)."""
        self.export_runner.start(geojson_job(self._finished_result(), destination))
        self.progress.set_status(f"exporting GeoJSON to {destination}")


def copy_zarr_job(source: Path, destination: Path):
    """The job that copies a finished output, refusing to write over anything."""

    def make_job(stop):
        import shutil

        from ..core.errors import ConfigError
        from ..core.events import Done

        if destination.exists():
            raise ConfigError("already exists; choose a new folder", destination)
        shutil.copytree(source, destination)
        yield Done("export", destination)

    return make_job


def geojson_job(source: Path, destination: Path):
    """The job that writes an output's tissue regions as GeoJSON."""

    def make_job(stop):
        from ..core.events import Done
        from ..core.wsi.geojson_export import segmentation_to_geojson

        collection = segmentation_to_geojson(source, destination)
        yield Done("export", {"path": destination,
                              "features": len(collection.get("features", []))})

    return make_job
