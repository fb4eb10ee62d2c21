"""Compare widget: the trained strategies of a run, side by side on one image.

The image is a validation image (with per-class IoU against its mask), a training patch (with
each strategy's per-pixel trust map over the patch's pseudo-mask: what the noise-suppression
loss believed while training), an image layer, or the part of a slide layer in view. Every
strategy's prediction becomes a labels layer in the dataset's colours; the prediction layers
are linked (opacity and contour change together) and can be laid out in napari's grid. The
predictions, scores and trust maps come from ``core.stage2.compare`` (as for ``histo-wsss
compare``); this module picks the image, ``_comparison_layers`` makes the layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Select, Slider, create_widget
from qtpy.QtWidgets import QTableWidget, QTableWidgetItem

from ..core.runs.model_cache import ModelCache
from ._base import (
    JobWidget,
    device_field,
    engine_fields,
    engine_message,
    engine_options,
    info_label,
    moved_dataset_field,
    run_folder_field,
    set_info,
)
from ._comparison_layers import ComparedImage, ComparisonLayers
from ._jobs import JobState
from ._layers import layer_transform, rgb_pixels
from ._runs import describe_run, given_path, open_run
from ._shared_run import shared_run_folder
from ._tooltips import TOOLTIPS

if TYPE_CHECKING:
    import napari

    from ..core.stage2.compare import StrategyComparison

STAGE = "compare"
SOURCES = ("validation image", "training patch", "image layer", "slide view")
#: The longest side read from a slide view; coarser pyramid levels are used beyond it.
MAX_VIEW_SIDE = 2048


def slide_view_loader(layer, spec):
    """Read the part of a (multiscale) slide layer that is in view, at most MAX_VIEW_SIDE."""
    from ..core.errors import ConfigError

    if not getattr(layer, "rgb", False):
        raise ConfigError(f"'{layer.name}' is not an RGB slide layer")
    levels = list(layer.data) if layer.multiscale else [layer.data]
    factors = np.asarray(layer.downsample_factors)[:, -2:] if layer.multiscale \
        else np.ones((1, 2))
    level = int(layer.data_level) if layer.multiscale else 0
    corners = np.asarray(layer.corner_pixels)[:, -2:].astype(int)
    if np.any(corners[1] - corners[0] <= 0):
        corners = np.array([[0, 0], list(levels[level].shape[:2])])
    # Go to coarser levels until the view fits.
    while max(corners[1] - corners[0]) > MAX_VIEW_SIDE and level + 1 < len(levels):
        ratio = factors[level + 1] / factors[level]
        corners = np.stack([corners[0] // ratio, -(-corners[1] // ratio)]).astype(int)
        level += 1
    (y0, x0), (y1, x1) = corners
    if max(y1 - y0, x1 - x0) > MAX_VIEW_SIDE:
        raise ConfigError("zoom in: the view is larger than the coarsest level can show")
    array = levels[level]
    factor = factors[level]
    scale = np.asarray(layer.scale[-2:]) * factor
    translate = np.asarray(layer.translate[-2:]) + np.asarray(layer.scale[-2:]) * (
        np.array([y0, x0]) * factor + (factor - 1) / 2)
    transform = {"scale": tuple(scale), "translate": tuple(translate),
                 "units": tuple(layer.units[-2:])}
    title = f"view of '{layer.name}' (level {level}, {x1 - x0}x{y1 - y0} px)"

    def load_view():
        pixels = np.asarray(array[y0:y1, x0:x1])
        if pixels.dtype != np.uint8:
            pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        return ComparedImage(title, spec, np.ascontiguousarray(pixels[..., :3]),
                             transform=transform, show_image=False), None

    return load_view


class CompareWidget(JobWidget):
    """Predictions of several strategies of one run on the same image, with IoU and trust."""

    settings_key = "compare"
    start_text = "Compare"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer, "Compare strategies", epochs=False, plot=False)
        import napari.layers

        self.run_folder = run_folder_field()
        self.run_info = info_label()
        self._context = None
        self.strategies = Select(label="strategies", choices=self._trained_strategies,
                                 tooltip=TOOLTIPS["compare_strategies"])
        self.strategies.native.setMaximumHeight(110)
        self.source = ComboBox(label="image", choices=SOURCES, value=SOURCES[0],
                               tooltip=TOOLTIPS["compare_source"])
        self.index = Slider(label="image #", min=0, max=0, tooltip=TOOLTIPS["index"])
        self.image_layer = create_widget(annotation=napari.layers.Image, label="layer",
                                         options={"tooltip": TOOLTIPS["image_layer"]})
        self.grid = CheckBox(text="side by side (grid)", value=False, tooltip=TOOLTIPS["grid"])
        self.device = device_field()
        self.dataset = moved_dataset_field()
        self.engine, self.precision = engine_fields()
        self.extend([self.run_folder, self.run_info, self.strategies, self.source, self.index,
                     self.image_layer, self.grid, self.device])
        self.advanced.extend([self.dataset, self.engine, self.precision])
        self.iou_table = QTableWidget()
        self.iou_table.setMinimumHeight(150)
        self.iou_table.setVisible(False)
        self.finish_layout(below=(self.iou_table,))
        self.remember(run_folder=self.run_folder, source=self.source, grid=self.grid,
                      device=self.device, dataset=self.dataset, engine=self.engine,
                      precision=self.precision)
        self._models = ModelCache()
        self._source_layer = None  # the viewer layer compared on, if any
        self._layers = ComparisonLayers(
            viewer, self.native, show_info=lambda text: set_info(self.run_info, text),
            on_predictions=self._update_table)
        self._results: dict[str, StrategyComparison] = {}
        self._image: ComparedImage | None = None
        self.run_folder.changed.connect(self._load_run)
        self.dataset.changed.connect(self._load_run)
        self.source.changed.connect(self._on_source_changed)
        self.grid.changed.connect(self._apply_grid)
        self.restore_settings()
        shared_run_folder(viewer).follow(self.run_folder)
        self._load_run()

    # -- run and source ------------------------------------------------------------------------
    def _trained_strategies(self, *_: Any) -> list[str]:
        """Choices of the strategy list (a callable, so napari's ``reset_choices`` keeps them)."""
        return [] if self._context is None else self._context[0].segmenter_strategies()

    def _load_run(self, *_: Any) -> None:
        from ..core.errors import HistoWsssError

        self._context = None
        try:
            set_info(self.run_info, describe_run(given_path(self.run_folder.value)))
            if given_path(self.run_folder.value) is not None:
                self._context = open_run(self.run_folder.value, given_path(self.dataset.value))
        except HistoWsssError as error:
            set_info(self.run_info, str(error), error=True)
        self.strategies.reset_choices()
        self.strategies.value = list(self.strategies.choices)
        self._on_source_changed()

    def _on_source_changed(self, *_: Any) -> None:
        source = self.source.value
        from_layer = source in ("image layer", "slide view")
        self.image_layer.visible = from_layer
        self.index.visible = not from_layer
        count = 0
        if self._context is not None and not from_layer:
            layout = self._context[2]
            if source == "training patch":
                count = len(layout.patches().paths)
            else:
                evaluation = layout.eval_set("val")
                count = 0 if evaluation is None else len(evaluation)
        self.index.max = max(count - 1, 0)

    # -- the job -------------------------------------------------------------------------------
    def build_job(self):
        from ..core.errors import ConfigError

        if self._context is None:
            raise ConfigError("choose a run folder with trained segmenters")
        strategies = list(self.strategies.value)
        if not strategies and self.strategies.choices:
            raise ConfigError("select at least one strategy to compare")
        if not strategies:
            raise ConfigError("this run has no trained segmenter to compare yet")
        run, _, layout = self._context
        load = self._image_loader(layout)
        models, device_name = self._models, self.device.value
        engine = engine_options(self.engine, self.precision)
        layers_shown = self._layers.shown

        def make_job(stop):
            from ..core.events import Batch, Done, Preview, Started
            from ..core.stage2.compare import iter_comparisons

            compared, patch = load()
            layers_shown.expect()
            yield Preview(STAGE, "image", compared)
            yield Started(STAGE, total_epochs=1, batches_per_epoch=len(strategies))
            layers_shown.wait(stop)  # napari builds layers slower while this thread works
            shown = 0
            for shown, result in enumerate(iter_comparisons(
                    run, compared.image, strategies, truth=compared.truth, patch=patch,
                    device=device_name, models=models, stop=stop, **engine), start=1):
                yield engine_message(STAGE, result.engine, result.strategy)
                layers_shown.expect()
                yield Preview(STAGE, result.strategy, result)
                yield Batch(STAGE, epoch=0, index=shown - 1, total=len(strategies))
                layers_shown.wait(stop)
            if shown < len(strategies):
                yield Done(STAGE, None, stopped=True)
            else:
                yield Done(STAGE, strategies)

        return make_job, device_name

    def _image_loader(self, layout):
        """A worker-side function returning (ComparedImage, (patch name, label) or None)."""
        from ..core.errors import ConfigError

        spec, source, index = layout.spec, self.source.value, int(self.index.value)
        self._source_layer = None
        if source == "validation image":
            evaluation = layout.eval_set("val")
            if evaluation is None or not len(evaluation):
                raise ConfigError("the dataset has no validation images with masks", layout.root)
            index = min(index, len(evaluation) - 1)

            def load_val():
                image, truth = evaluation.pair(index)
                return ComparedImage(evaluation.image_paths[index].name, spec, image,
                                     truth=truth), None

            return load_val
        if source == "training patch":
            patches = layout.patches()
            index = min(index, len(patches) - 1)
            run = self._context[0]

            def load_patch():
                from ..core.data.datasets import read_mask

                name = patches.paths[index].name
                mask_path = run.pseudo_mask_dir("final") / Path(name).with_suffix(".png").name
                pseudo = read_mask(mask_path, spec) if mask_path.is_file() else None
                return (ComparedImage(name, spec, patches.image(index), pseudo_mask=pseudo),
                        (name, patches.labels[index]))

            return load_patch
        layer = self.image_layer.value
        if layer is None:
            raise ConfigError("add an image layer (or open a slide) first")
        if source == "image layer":
            image = rgb_pixels(layer)
            transform = layer_transform(layer)
            self._source_layer = layer
            return lambda: (ComparedImage(f"layer '{layer.name}'", spec, image,
                                          transform=transform, show_image=False), None)
        self._source_layer = layer
        return slide_view_loader(layer, spec)

    # -- results -> layers (main thread) -------------------------------------------------------
    def on_job_starting(self) -> None:
        self._results = {}
        self._image = None
        self.iou_table.setVisible(False)

    def on_job_event(self, event: Any) -> None:
        from ..core.events import Preview
        from ..core.stage2.compare import StrategyComparison

        if not isinstance(event, Preview):
            return
        if isinstance(event.data, ComparedImage):
            self._image = event.data
            self._layers.show_image(event.data, self._source_layer)
        elif isinstance(event.data, StrategyComparison):
            first = not self._results
            self._results[event.data.strategy] = event.data
            self._layers.show_result(event.data, first)

    @property
    def showing(self) -> bool:
        """Whether results are still being turned into layers."""
        return self._layers.busy


    def _update_table(self) -> None:
        scored = {name: r for name, r in self._results.items() if r.per_class_iou is not None}
        if not scored:
            self.iou_table.setVisible(False)
            return
        spec = self._image.spec
        rows = [*spec.class_names, "mIoU"]
        self.iou_table.clear()
        self.iou_table.setRowCount(len(rows))
        self.iou_table.setColumnCount(len(scored))
        self.iou_table.setHorizontalHeaderLabels(list(scored))
        self.iou_table.setVerticalHeaderLabels(rows)
        for column, result in enumerate(scored.values()):
            values = [result.per_class_iou.get(name) for name in spec.class_names]
            for row, value in enumerate([*values, result.miou]):
                text = "–" if value is None or np.isnan(value) else f"{100 * value:.1f}"
                self.iou_table.setItem(row, column, QTableWidgetItem(text))
        self.iou_table.resizeColumnsToContents()
        self.iou_table.setVisible(True)

    def iou_rows(self) -> dict[str, dict[str, str]]:
        """The IoU table as text, by strategy then row (what the user reads)."""
        table = {}
        for column in range(self.iou_table.columnCount()):
            strategy = self.iou_table.horizontalHeaderItem(column).text()
            table[strategy] = {
                self.iou_table.verticalHeaderItem(row).text(): self.iou_table.item(row, column)
                .text() for row in range(self.iou_table.rowCount())
            }
        return table

    def on_job_finished(self, state: JobState) -> None:
        if state is JobState.DONE:
            self._layers.then(self._apply_grid)

    def _apply_grid(self, *_: Any) -> None:
        """Grid on or off, then fit the camera to the new layout (napari keeps the old zoom)."""
        self.viewer.grid.enabled = bool(self.grid.value)
        self.viewer.reset_view()
