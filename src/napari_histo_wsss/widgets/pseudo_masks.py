"""Pseudo-masks widget: a run's recipe on the whole dataset (a job), or on one image at a time.

Browsing shows, for the chosen training patch, validation image or viewer image layer, each
class's map as a colour layer (transparent where the class is not active), the voted
pseudo-mask in the dataset's class colours, and the ground truth where the image has one. With
"per-scale and per-layer maps" on, the maps and masks of every layer (multi-layer recipes) and
every scale (MSV's voting) are added as hidden layers, to see what the vote was made of. The
class maps are computed in a worker by the core recipe (``pseudo_masks_for_images``); only the
layers are made here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, PushButton, Slider, create_widget

from ..core.runs.model_cache import ModelCache
from ..core.runs.stages import PSEUDO_MASKS
from ._base import (
    JobWidget,
    device_field,
    info_label,
    moved_dataset_field,
    run_folder_field,
    set_info,
)
from ._jobs import JobState
from ._layers import (
    CAM_STYLE,
    OVERLAY_STYLE,
    TRUTH_STYLE,
    LayerSteps,
    cam_colormap,
    display_labels,
    layer_named,
    layer_transform,
    put_layer,
    remove_layers,
    rgb_pixels,
)
from ._runs import describe_run, given_path, open_run
from ._shared_run import shared_run_folder
from ._tooltips import TOOLTIPS
from .class_colours import class_features, labels_colormap
from .legend import ensure_legend

if TYPE_CHECKING:
    import napari

STAGE = PSEUDO_MASKS
SOURCES = ("training patches", "validation images", "viewer image")
IMAGE_LAYER = "image (pseudo-masks)"
MASK_LAYER = "pseudo-mask"
TRUTH_LAYER = "ground truth"


@dataclass
class ClassMapView:
    """What one browse step shows; computed in the worker, turned into layers on the main
    thread."""

    title: str
    spec: Any
    image: np.ndarray | None  # None: the image is the user's own layer
    truth: np.ndarray | None
    result: Any  # core PseudoMasks at the recipe's scales
    main_map: str
    extra: bool = False  # also the other layers' and scales' maps and masks
    per_scale: dict[float, Any] = field(default_factory=dict)
    transform: dict[str, Any] = field(default_factory=dict)  # scale/translate of the source


def _trained_classifier(checkpoint: Path, device):
    """The run's stage-1 classifier with its BatchNorms folded for class maps (kept for the
    whole browse), or one clear error when it has not been trained."""
    from ..core.errors import CheckpointError
    from ..core.models.classifier import load_classifier
    from ..core.models.folding import fold_batchnorm

    if not checkpoint.is_file():
        raise CheckpointError("no trained classifier yet: train one first", checkpoint)
    model, _ = load_classifier(checkpoint, device)
    return fold_batchnorm(model.eval())


class PseudoMaskWidget(JobWidget):
    """Generate a run's pseudo-masks, and look at class maps and pseudo-masks image by image."""

    settings_key = "pseudo_masks"
    start_text = "Generate pseudo-masks for the dataset"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer, "Pseudo-masks", epochs=False, plot=False)
        import napari.layers

        self.run_folder = run_folder_field()
        self.run_info = info_label()
        self.device = device_field()
        self.source = ComboBox(label="show", choices=SOURCES, value=SOURCES[0],
                               tooltip=TOOLTIPS["source"])
        self.index = Slider(label="image #", min=0, max=0, tooltip=TOOLTIPS["index"])
        self.image_layer = create_widget(annotation=napari.layers.Image, label="image layer",
                                         options={"tooltip": TOOLTIPS["image_layer"]})
        self.show_button = PushButton(text="Show class maps")
        self.view_info = info_label()
        self.dataset = moved_dataset_field()
        self.show_extra = CheckBox(text="per-scale and per-layer maps", value=False,
                                   tooltip=TOOLTIPS["show_scales"])
        self.extend([self.run_folder, self.run_info, self.device, self.source, self.index,
                     self.image_layer, self.show_button, self.view_info])
        self.advanced.extend([self.dataset, self.show_extra])
        self.finish_layout()
        self.remember(run_folder=self.run_folder, device=self.device, source=self.source,
                      dataset=self.dataset, show_extra=self.show_extra)

        self.preview_runner = self.add_runner("Class maps")
        self.preview_runner.event.connect(self._on_preview_event)
        self.preview_runner.state_changed.connect(self._on_preview_state)
        self._models = ModelCache(capacity=1)  # the run's one classifier
        self._context = None  # (run, config, layout) of the chosen run folder
        self._pending_preview = False
        self._shown_layers: set[str] = set()
        self._source_layer = None  # the viewer image being browsed, if any
        self._anchor = None  # the layer the next new layer goes above
        self._layer_steps = LayerSteps(self.native)

        self.run_folder.changed.connect(self._load_run)
        self.dataset.changed.connect(self._load_run)
        self.source.changed.connect(self._on_source_changed)
        self.index.changed.connect(self.show_class_maps)
        self.show_button.changed.connect(lambda *_: self.show_class_maps(notify=True))
        self.restore_settings()
        shared_run_folder(viewer).follow(self.run_folder)
        self._load_run()

    # -- run and source ----------------------------------------------------------------------
    def _load_run(self, *_: Any) -> None:
        from ..core.errors import HistoWsssError

        self._context = None
        try:
            set_info(self.run_info, describe_run(given_path(self.run_folder.value)))
            if given_path(self.run_folder.value) is not None:
                self._context = open_run(self.run_folder.value, given_path(self.dataset.value))
        except HistoWsssError as error:
            set_info(self.run_info, str(error), error=True)
        self._on_source_changed()

    def _on_source_changed(self, *_: Any) -> None:
        from_viewer = self.source.value == "viewer image"
        self.image_layer.visible = from_viewer
        self.index.visible = not from_viewer
        count = self._source_length()
        self.index.max = max(count - 1, 0)
        if not from_viewer:
            self.index.enabled = count > 0

    def _source_length(self) -> int:
        if self._context is None:
            return 0
        _, _, layout = self._context
        if self.source.value == "training patches":
            return len(layout.patches().paths)
        evaluation = layout.eval_set("val")
        return 0 if evaluation is None else len(evaluation)

    # -- browsing ------------------------------------------------------------------------------
    def show_class_maps(self, *_: Any, notify: bool = False) -> None:
        """Compute and show the class maps of the current image (in a worker).

        ``notify`` also raises a notification for a problem (an explicit button press);
        browsing only writes it under the fields.
        """
        from napari.utils.notifications import show_error

        from ..core.errors import HistoWsssError

        if self.preview_runner.busy:
            self._pending_preview = True  # the latest request runs when this one ends
            return
        try:
            make_job = self._class_map_job()
        except HistoWsssError as error:
            set_info(self.view_info, str(error), error=True)
            if notify:
                show_error(str(error))
            return
        set_info(self.view_info, "computing class maps...")
        self.preview_runner.start(make_job, self.device.value)

    def _class_map_job(self):
        """Read the fields now (main thread) and return the worker's job."""
        from ..core.errors import ConfigError

        if self._context is None:
            raise ConfigError("choose a run folder with a trained classifier first")
        run, config, layout = self._context
        recipe = config.pseudo_masks
        load = self._image_loader(layout)
        models, device_name = self._models, self.device.value
        extra_wanted = self.show_extra.value
        per_scale_wanted = extra_wanted and len(recipe.scales) > 1

        def make_job(stop):
            from ..core.devices import resolve_device
            from ..core.events import Preview
            from ..core.stage1.pseudo_masks import final_map_name, pseudo_masks_for_images

            device = resolve_device(device_name)
            checkpoint = run.classifier_checkpoint
            model = models.get(checkpoint, device, lambda: _trained_classifier(checkpoint, device))
            title, image, labels, truth, transform = load()
            used = recipe if labels is not None else dataclasses.replace(recipe,
                                                                         gating="predicted")
            label_rows = None if labels is None else labels[None]
            result = pseudo_masks_for_images(model, [image], label_rows, used, layout.spec,
                                             device)[0]
            per_scale = {}
            if per_scale_wanted:
                for scale in used.scales:
                    single = dataclasses.replace(used, scales=(scale,))
                    per_scale[scale] = pseudo_masks_for_images(
                        model, [image], label_rows, single, layout.spec, device)[0]
            view = ClassMapView(
                title=title, spec=layout.spec, image=None if transform else image,
                truth=truth, result=result, main_map=final_map_name(model, used),
                extra=extra_wanted, per_scale=per_scale, transform=transform or {},
            )
            yield Preview(STAGE, title, view)

        return make_job

    def _image_loader(self, layout):
        """A function returning (title, image, patch label or None, truth or None, transform)."""
        from ..core.errors import ConfigError

        source, index = self.source.value, int(self.index.value)
        if source == "viewer image":
            layer = self.image_layer.value
            if layer is None:
                raise ConfigError("add an RGB image layer to the viewer first")
            image = rgb_pixels(layer)
            transform = layer_transform(layer)
            self._source_layer = layer
            return lambda: (f"layer '{layer.name}' (classes gated by prediction)", image, None,
                            None, transform)
        if source == "training patches":
            patches = layout.patches()
            if not len(patches):
                raise ConfigError("the dataset has no training patches")
            index = min(index, len(patches) - 1)

            def load_patch():
                label = patches.labels[index]
                names = [n for n, on in zip(layout.spec.class_names, label, strict=True) if on]
                title = f"{patches.paths[index].name} · label: {', '.join(names) or 'none'}"
                return title, patches.image(index), label, None, None

            return load_patch
        evaluation = layout.eval_set("val")
        if evaluation is None or not len(evaluation):
            raise ConfigError("the dataset has no validation images with masks", layout.root)
        index = min(index, len(evaluation) - 1)

        def load_val():
            image, truth = evaluation.pair(index)
            present = np.isin(np.arange(layout.spec.num_classes), truth).astype(np.uint8)
            title = f"{evaluation.image_paths[index].name} · classes in its mask gate the maps"
            return title, image, present, truth, None

        return load_val

    def _on_preview_event(self, event: Any) -> None:
        from ..core.events import Preview

        if isinstance(event, Preview) and isinstance(event.data, ClassMapView):
            self._show_view(event.data)

    def _on_preview_state(self, state: JobState) -> None:
        if state is JobState.FAILED:
            set_info(self.view_info, f"failed: {self.preview_runner.error}", error=True)
        if not state.busy and self._pending_preview:
            self._pending_preview = False
            self.show_class_maps()

    def _show_view(self, view: ClassMapView) -> None:
        """Turn one browse result into layers (main thread), stacked above their image: class
        maps (hidden), the pseudo-mask (shown), the ground truth as outlines. One layer per
        step of ``LayerSteps``, so the first view's new layers do not freeze the window at
        once."""
        spec, result, transform = view.spec, view.result, view.transform
        names: list[str] = []
        steps: list = []
        self._anchor = self._source_layer if view.image is None else None
        reset_view = [False]
        if view.image is not None:
            steps.append(lambda: self._put_image(view.image, names, reset_view))
        steps.append(lambda: ensure_legend(self.viewer))
        for map_name, maps in result.maps.items():
            main = map_name == view.main_map
            if main or view.extra:
                suffix = "" if main else f" [{map_name}]"
                steps += self._class_map_steps(spec, maps, suffix, names, transform)
        for scale, scaled in view.per_scale.items():
            steps += self._class_map_steps(spec, scaled.maps[view.main_map], f" @{scale:g}",
                                           names, transform)
            steps.append(self._mask_step(f"{MASK_LAYER} @{scale:g}", scaled.masks["final"],
                                         spec, names, transform, visible=False))
        if view.extra:
            for mask_name, mask in result.masks.items():
                if mask_name not in ("final", view.main_map):  # those two are the same mask
                    steps.append(self._mask_step(f"{MASK_LAYER} [{mask_name}]", mask, spec,
                                                 names, transform, visible=False))
        steps.append(self._mask_step(MASK_LAYER, result.masks["final"], spec, names, transform))
        if view.truth is not None:
            steps.append(self._mask_step(TRUTH_LAYER, view.truth, spec, names, transform,
                                         style=TRUTH_STYLE))
        steps.append(lambda: self._finish_view(view, names, reset_view[0]))
        self._layer_steps.run(steps)

    @property
    def showing(self) -> bool:
        """Whether a browse result is still being turned into layers."""
        return self._layer_steps.busy

    def _put_image(self, image: np.ndarray, names: list[str], reset_view: list[bool]) -> None:
        previous = layer_named(self.viewer, IMAGE_LAYER)
        reset_view[0] = previous is None or previous.data.shape != image.shape
        self._anchor = put_layer(self.viewer, "image", IMAGE_LAYER, image, rgb=True)
        if previous is None:
            self.viewer.layers.move(self.viewer.layers.index(self._anchor), 0)
        self._created(IMAGE_LAYER, names)

    def _created(self, name: str, names: list[str]) -> None:
        """Record a layer of this view; ``_shown_layers`` also keeps those of a view whose
        last steps were dropped for a newer one, so that they are removed at its end."""
        names.append(name)
        self._shown_layers.add(name)

    def _finish_view(self, view: ClassMapView, names: list[str], reset_view: bool) -> None:
        remove_layers(self.viewer, self._shown_layers - set(names))
        self._shown_layers = set(names)
        if reset_view:
            self.viewer.reset_view()
        probabilities = ", ".join(f"{name} {p:.2f}" for name, p in
                                  zip(view.spec.class_names, view.result.probabilities,
                                      strict=True))
        set_info(self.view_info, f"{view.title} · classifier: {probabilities}")

    def _class_map_steps(self, spec, maps: np.ndarray, suffix: str, names: list[str],
                         transform: dict) -> list:
        def put(index: int, name: str) -> None:
            self._anchor = put_layer(
                self.viewer, "image", name, maps[index], above=self._anchor,
                colormap=cam_colormap(spec.class_names[index], spec.colours[index]),
                contrast_limits=(0.0, 1.0), **CAM_STYLE, **transform)
            self._created(name, names)

        return [lambda index=index, name=f"CAM {class_name}{suffix}": put(index, name)
                for index, class_name in enumerate(spec.class_names)]

    def _mask_step(self, name: str, mask: np.ndarray, spec, names: list[str], transform: dict,
                   visible: bool = True, style: dict | None = None):
        def put() -> None:
            self._anchor = put_layer(
                self.viewer, "labels", name, display_labels(mask, spec.num_classes),
                above=self._anchor, colormap=labels_colormap(spec),
                features=class_features(spec), visible=visible, **(style or OVERLAY_STYLE),
                **transform)
            self._created(name, names)

        return put

    # -- the generation job ----------------------------------------------------------------------
    def build_job(self):
        run, config, layout = open_run(self.run_folder.value, given_path(self.dataset.value))

        def make_job(stop):
            from ..core.devices import resolve_device
            from ..core.events import Message
            from ..core.inference.metrics import format_scores
            from ..core.stage1.pseudo_masks import generate_pseudo_masks, pseudo_mask_report

            device = resolve_device(device_name)
            patches = layout.patches()
            yield Message(STAGE, f"decoding {len(patches)} patches")
            patches.decode_all()
            yield from generate_pseudo_masks(run, config, patches, device=device, stop=stop)
            evaluation = layout.eval_set("val")
            if evaluation is not None and run.is_complete(STAGE):
                report = pseudo_mask_report(run, config, evaluation, device)
                yield Message(STAGE, "done; quality on val: "
                              + format_scores(report).splitlines()[0])

        device_name = self.device.value
        return make_job, device_name

    def on_job_finished(self, state: JobState) -> None:
        self._load_run()

