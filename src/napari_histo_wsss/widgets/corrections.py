"""Corrections widget: paint over an image, retrain, and let the review queue say where to look.

A thin front over ``core.corrections``: *Open* shows the chosen image with the segmenter's
prediction and a Labels layer to paint on (napari's own brush, fill and eraser, in the run's
class colours; 0 = not painted). While you paint, the prediction of this image follows the
strokes (its appearance model learns from them, ``SegmentationPredictor.finish``: a second,
no retraining). *Retrain* saves the strokes into the run and fine-tunes the segmenter on them
in a worker, so other images learn from them too; the preview layer shows the prediction on
this image after every epoch. *Rank* fills the review list (least trusted first); clicking an
item opens that image and zooms to its least trusted area.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, PushButton, SpinBox

from ._base import JobWidget, device_field, info_label, run_folder_field, set_info
from ._jobs import JobState
from ._layers import display_labels, layer_named, put_layer
from ._runs import open_run

if TYPE_CHECKING:
    import napari

IMAGE_LAYER, PAINT_LAYER = "correction image", "corrections"
PREDICTION_LAYER, PREVIEW_LAYER = "prediction", "retrained preview"
TIPS = {
    "image": "Image to correct: the run's val images and every image corrected before.",
    "strategy": "Segmenter to start from; the fine-tune is saved as <strategy>-corrections.",
    "epochs": "Fine-tune epochs over the corrected images and a replay sample of patches.",
    "follow": "Update this image's prediction from your strokes as you paint (a second, no "
              "retraining; Retrain teaches them to the model for every image).",
    "calibrate": "Refit the segmenter's class balance (its class offsets) on every corrected "
                 "image, with the run's val masks where it has them: what your strokes say "
                 "about the classes reaches every image, without retraining. Takes 8 images "
                 "or more.",
}
#: Quiet time after the last brush stroke before the prediction follows the strokes.
FOLLOW_DELAY_MS = 400


def paint_colormap(spec):
    """Run class colours for painted values 1..C, background (white) at C + 1, 0 clear."""
    from napari.utils.colormaps import DirectLabelColormap

    colours: dict[Any, tuple[float, ...]] = {0: (0.0, 0.0, 0.0, 0.0), None: (0, 0, 0, 0)}
    for index, colour in enumerate(spec.colours):
        colours[index + 1] = (*(channel / 255.0 for channel in colour), 1.0)
    return DirectLabelColormap(color_dict=colours)


def correction_store(run, layout):
    """The run's corrections, as the core library keeps them."""
    from ..core.corrections.store import CorrectionStore

    return CorrectionStore(run.root, layout.spec)


class CorrectionsWidget(JobWidget):
    """Paint corrections, fine-tune on them with a live preview, review where to look."""

    settings_key = "corrections"
    start_text = "Retrain"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer, "Retrain with corrections", plot=False)
        from ..core.corrections.recipe import FINETUNE_EPOCHS

        self.run_folder = run_folder_field()
        self.run_info = info_label()
        # Callables: napari resets every combo's choices when layers change.
        self._strategies: list[str] = []
        self._images: list[str] = []
        self.strategy = ComboBox(label="start from", choices=lambda _: self._strategies,
                                 tooltip=TIPS["strategy"])
        self.image = ComboBox(label="image", choices=lambda _: self._images,
                              tooltip=TIPS["image"])
        self.open_button = PushButton(text="Open image")
        self.follow = CheckBox(text="prediction follows my strokes", value=True,
                               tooltip=TIPS["follow"])
        self.epochs = SpinBox(label="epochs", value=FINETUNE_EPOCHS, min=1, max=500,
                              tooltip=TIPS["epochs"])
        self.device = device_field()
        self.rank_button = PushButton(text="Rank images to review")
        self.calibrate_button = PushButton(text="Calibrate class balance",
                                           tooltip=TIPS["calibrate"])
        self.extend([self.run_folder, self.run_info, self.strategy, self.image,
                     self.open_button, self.follow, self.calibrate_button, self.epochs])
        self.advanced.extend([self.device])
        self.review_runner = self.add_runner("Review queue")
        self.review_runner.event.connect(self._on_review_result)
        self.image_runner = self.add_runner("This image")
        self.image_runner.event.connect(self._on_image_result)
        self.image_runner.state_changed.connect(self._after_image_job)
        self.calibrate_runner = self.add_runner("Class balance")
        self.calibrate_runner.event.connect(self._on_calibrated)
        from qtpy.QtCore import QTimer

        self._follow_timer = QTimer(singleShot=True, interval=FOLLOW_DELAY_MS)
        self._follow_timer.timeout.connect(self.apply_strokes)
        self._strokes_pending = False
        self._queued_job: Any = None
        #: The open image's predictor and network probabilities (None: too large to refine).
        self._predictor: Any = None
        self._network: np.ndarray | None = None
        from qtpy.QtWidgets import QListWidget

        self.review_list = QListWidget()
        self.review_list.itemActivated.connect(self._jump)
        self.review_list.itemClicked.connect(self._jump)
        self.review_items: list[Any] = []
        self.current: Path | None = None
        self.finish_layout(below=(self.rank_button.native, self.review_list))
        self.remember(run_folder=self.run_folder, epochs=self.epochs, device=self.device,
                      follow=self.follow)
        self.run_folder.changed.connect(self._on_run_changed)
        self.open_button.changed.connect(lambda *_: self.open_image())
        self.rank_button.changed.connect(lambda *_: self.rank())
        self.calibrate_button.changed.connect(lambda *_: self.calibrate())
        self.restore_settings()
        self._on_run_changed()

    # -- run and image ------------------------------------------------------------------------
    def _on_run_changed(self, *_: Any) -> None:
        from ..core.errors import HistoWsssError

        try:
            run, _, layout = open_run(self.run_folder.value)
        except HistoWsssError as error:
            set_info(self.run_info, str(error), error=True)
            return
        from ..core.corrections.store import CorrectionStore

        strategies = [s for s in run.segmenter_strategies() if not s.endswith("-corrections")]
        self._strategies = strategies
        val = layout.eval_set("val")
        images = [str(p) for p in (val.image_paths if val else [])]
        corrected = [e["image"] for e in CorrectionStore(run.root, layout.spec).entries()
                     if e["kind"] == "image"]
        self._images = list(dict.fromkeys([*corrected, *images]))
        self.strategy.reset_choices()
        self.image.reset_choices()
        set_info(self.run_info, f"segmenters: {', '.join(strategies) or 'none yet'} · "
                                f"{len(corrected)} corrected image"
                                f"{'' if len(corrected) == 1 else 's'}")

    def open_image(self, path: str | Path | None = None) -> None:
        """Show ``path`` (default: the chosen image) and its strokes at once; its prediction
        follows from a worker (the network's pass would stall the window)."""
        from napari.utils.notifications import show_error

        from ..core.data.datasets import read_rgb
        from ..core.errors import HistoWsssError

        path = Path(path or self.image.value or "")
        try:
            run, _, layout = open_run(self.run_folder.value)
            image = read_rgb(path)
            saved = correction_store(run, layout).find(path)
        except HistoWsssError as error:
            show_error(str(error))
            return
        self.current, self.spec = path, layout.spec
        self._predictor = self._network = None
        put_layer(self.viewer, "image", IMAGE_LAYER, image, rgb=True)
        put_layer(self.viewer, "labels", PREDICTION_LAYER,
                  np.zeros(image.shape[:2], np.uint8), colormap=paint_colormap(layout.spec),
                  opacity=0.4)
        strokes = saved.labels if saved is not None else np.zeros(image.shape[:2], np.uint8)
        layer = put_layer(self.viewer, "labels", PAINT_LAYER, strokes.copy(),
                          colormap=paint_colormap(layout.spec), opacity=0.8)
        layer.mode = "paint"
        layer.brush_size = 8
        layer.selected_label = 1
        if self._on_paint not in layer.events.paint.callbacks:
            layer.events.paint.connect(self._on_paint)
        self.viewer.layers.selection.active = layer
        self._start_on_image(prediction_job(run.root, self._strategy_in_use(run),
                                           self.device.value, path, image, saved))

    def _strategy_in_use(self, run) -> str:
        """The strategy the open image is predicted with: the retrained one where it exists."""
        tuned = f"{self.strategy.value}-corrections"
        return tuned if tuned in run.segmenter_strategies() else self.strategy.value

    # -- strokes on this image ----------------------------------------------------------------
    def _on_paint(self, *_: Any) -> None:
        if self.follow.value:
            self._follow_timer.start()  # restarts: follows once the brush rests

    def apply_strokes(self) -> None:
        """Refine the open image's prediction with the painted strokes, in a worker."""
        layer = layer_named(self.viewer, PAINT_LAYER)
        if layer is None or self.current is None:
            return
        if self.image_runner.busy or self._network is None:
            self._strokes_pending = self.image_runner.busy  # once the prediction is there
            return
        predictor, network, path = self._predictor, self._network, self.current
        image = np.asarray(self.viewer.layers[IMAGE_LAYER].data)
        painted = np.array(layer.data, dtype=np.uint8)

        def make_job(stop):
            from ..core.events import Done

            refined = predictor.finish(network, image, painted)
            labels = refined.argmax(axis=0).astype(np.uint8)
            yield Done("prediction", (path, predictor, network, labels))

        self._start_on_image(make_job)

    def _start_on_image(self, make_job) -> None:
        """Start a job on the open image, or queue it after the running one (whose result
        is dropped if another image was opened meanwhile)."""
        if self.image_runner.busy:
            self._queued_job = make_job
        else:
            self.image_runner.start(make_job, self.device.value)

    def _on_image_result(self, event: Any) -> None:
        from ..core.events import Done

        if not isinstance(event, Done) or event.stopped:
            return
        path, predictor, network, labels = event.result
        if path != self.current or layer_named(self.viewer, PREDICTION_LAYER) is None:
            return  # another image was opened meanwhile
        self._predictor, self._network = predictor, network
        self.viewer.layers[PREDICTION_LAYER].data = display_labels(labels,
                                                                   self.spec.num_classes)
        if network is None:
            set_info(self.run_info, "this image is too large for the prediction to follow "
                                    "your strokes; Retrain teaches them to the model")

    def _after_image_job(self, state: JobState) -> None:
        if state.busy:
            return
        queued, self._queued_job = self._queued_job, None
        if queued is not None:
            self.image_runner.start(queued, self.device.value)
        elif self._strokes_pending:
            self._strokes_pending = False
            self.apply_strokes()

    def save_strokes(self) -> None:
        """Write the paint layer into the run (nothing painted removes the correction)."""
        from ..core.corrections.store import Correction

        layer = layer_named(self.viewer, PAINT_LAYER)
        if layer is None or self.current is None:
            return
        run, _, layout = open_run(self.run_folder.value)
        correction_store(run, layout).save(Correction(self.current, np.asarray(layer.data)))

    # -- retrain ------------------------------------------------------------------------------
    def build_job(self):
        from ..core.corrections.finetune import finetune_with_corrections
        from ..core.errors import ConfigError

        if self.current is None:
            raise ConfigError("open an image and paint on it first")
        if not self.strategy.value:
            raise ConfigError("this run has no trained segmenter to start from")
        self.save_strokes()
        run, config, layout = open_run(self.run_folder.value)
        image = np.asarray(self.viewer.layers[IMAGE_LAYER].data)
        strategy, epochs, device = self.strategy.value, self.epochs.value, self.device.value

        def make_job(stop):
            return finetune_with_corrections(run, config, layout.patches(), strategy=strategy,
                                             epochs=epochs, device=device, stop=stop,
                                             resume=False, preview=image)

        return make_job, device

    def on_job_event(self, event: Any) -> None:
        from ..core.events import Preview

        if isinstance(event, Preview) and event.name == "prediction":
            put_layer(self.viewer, "labels", PREVIEW_LAYER,
                      display_labels(event.data["labels"], self.spec.num_classes),
                      colormap=paint_colormap(self.spec), opacity=0.5)

    def on_job_finished(self, state: JobState) -> None:
        if state is JobState.DONE:
            self._on_run_changed()
            self._predict_with_retrained()

    def _predict_with_retrained(self) -> None:
        """The open image predicted again by the retrained strategy with its companion,
        appearance model and the strokes (the epoch previews are its network alone)."""
        from ..core.errors import HistoWsssError

        if self.current is None or layer_named(self.viewer, PAINT_LAYER) is None:
            return
        try:
            self.save_strokes()  # strokes painted while it trained are kept too
            run, _, layout = open_run(self.run_folder.value)
            saved = correction_store(run, layout).find(self.current)
        except HistoWsssError as error:
            set_info(self.run_info, str(error), error=True)
            return
        image = np.asarray(self.viewer.layers[IMAGE_LAYER].data)
        self._start_on_image(prediction_job(run.root, self._strategy_in_use(run),
                                           self.device.value, self.current, image, saved))

    # -- class balance ------------------------------------------------------------------------
    def calibrate(self) -> None:
        """Refit the class offsets of the strategy the open image is predicted with on the
        corrections and val, in a worker."""
        from ..core.errors import HistoWsssError

        try:
            self.save_strokes()
            run, _, layout = open_run(self.run_folder.value)
        except HistoWsssError as error:
            set_info(self.run_info, str(error), error=True)
            return
        self.calibrate_runner.start(calibration_job(run, layout, self._strategy_in_use(run),
                                                    self.device.value), self.device.value)

    def _on_calibrated(self, event: Any) -> None:
        from ..core.events import Done

        if isinstance(event, Done):
            set_info(self.run_info, event.result)
            if self.current is not None:
                self.open_image(self.current)  # predicted again with the new offsets

    # -- review -------------------------------------------------------------------------------
    def rank(self) -> None:
        """Rank the listed images in a worker (least trusted first)."""
        self.review_runner.start(review_job(self.run_folder.value, self.device.value,
                                            self.strategy.value or None,
                                            list(self.image.choices)), self.device.value)

    def _on_review_result(self, event: Any) -> None:
        from ..core.events import Done

        if not isinstance(event, Done):
            return
        self.review_items = list(event.result)
        self.review_list.clear()
        for rank, item in enumerate(self.review_items, start=1):
            self.review_list.addItem(f"{rank}. {Path(item.image).name}  trust score "
                                     f"{item.score:.3f}")

    def _jump(self, list_item) -> None:
        """Open the item's image and centre the viewer on its least trusted window."""
        item = self.review_items[self.review_list.row(list_item)]
        if self.current is None or str(self.current) != item.image:
            self.save_strokes()
            self.image.value = item.image
            self.open_image(item.image)
        top, left, height, width = item.focus
        self.viewer.camera.center = (top + height / 2, left + width / 2)
        self.viewer.camera.zoom = max(self.viewer.camera.zoom, 2.0)


def prediction_job(root: Path, strategy: str, device: str, path: Path, image: np.ndarray,
                   saved):
    """A job predicting ``image``; it keeps the network's probabilities (images up to the
    whole-image limit), so strokes refine them without another forward pass."""
    from ..core.inference.predict import WHOLE_IMAGE_LIMIT, load_predictor, predict_image

    def make_job(stop):
        from ..core.events import Done

        # The run's own choices (class gate, offsets): what `segment` and `corrections
        # apply` give, and what the strokes benchmark measured.
        predictor = load_predictor(root, device, strategy, tta="none")
        if max(image.shape[:2]) > WHOLE_IMAGE_LIMIT:
            network, labels = None, predict_image(predictor, image)[0]
        else:
            network = predictor.network_probabilities(image[None])[0]
            strokes = saved.labels if saved is not None else None
            labels = predictor.finish(network, image, strokes).argmax(axis=0)
        yield Done("prediction", (path, predictor, network, labels.astype(np.uint8)))

    return make_job


def calibration_job(run, layout, strategy: str, device: str):
    """A job refitting ``strategy``'s class offsets on the run's corrections and its val
    masks (``core.corrections.calibrate``); its result is the line describing them."""
    from ..core.corrections.calibrate import calibrate_with_corrections
    from ..core.errors import ConfigError
    from ..core.inference.calibration import MIN_CLASS_IMAGES, describe_offsets

    corrections = correction_store(run, layout).load_all()
    val = layout.eval_set("val")

    def make_job(stop):
        from ..core.events import Done

        if not strategy:
            raise ConfigError("this run has no trained segmenter to calibrate")
        record = calibrate_with_corrections(run, strategy, corrections, val, device)
        if record is None:
            raise ConfigError(f"calibrating needs a class seen in {MIN_CLASS_IMAGES} images "
                              f"or more (corrected and val): {len(corrections)} corrected so "
                              "far")
        yield Done("class balance", describe_offsets(record))

    return make_job


def review_job(folder, device: str, strategy: str | None, images: list[str]):
    """A job ranking ``images`` by how little the run's segmenter can be trusted there."""
    from ..core.corrections.review import review_queue
    from ..core.inference.predict import load_predictor

    def make_job(stop):
        from ..core.events import Done

        predictor = load_predictor(folder, device, strategy, tta="none", use_class_gate=False)
        yield Done("review", review_queue(predictor, images))

    return make_job
