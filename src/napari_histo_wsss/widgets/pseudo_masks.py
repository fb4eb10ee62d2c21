"""Pseudo-masks widget: a run's recipe on the whole dataset (a job), or on one image at a time.

Browsing shows, for the chosen training patch, validation image or viewer image layer, each
class's map as a colour layer (transparent where the class is not active), the voted
pseudo-mask in the dataset's class colours, and the ground truth where the image has one. With
"per-scale and per-layer maps" on, the maps and masks of every layer (multi-layer recipes) and
every scale (MSV's voting) are added as hidden layers, to see what the vote was made of. The
class maps are computed in a worker by the core recipe (``pseudo_masks_for_images``); the
layers are made by ``_class_map_layers``.
"""

from __future__ import annotations

import dataclasses
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
from ._class_map_layers import ClassMapLayers, ClassMapView
from ._jobs import JobState
from ._layers import layer_transform, rgb_pixels
from ._runs import describe_run, given_path, open_run
from ._shared_run import shared_run_folder
from ._tooltips import TOOLTIPS

if TYPE_CHECKING:
    import napari

STAGE = PSEUDO_MASKS
STITCHED = "stitched"  # marks a loader's result as a stitched source image
SOURCES = ("training patches", "stitched source images", "validation images", "viewer image")
def _trained_classifier(checkpoint: Path, device):
    """The run's stage-1 classifier prepared for class maps (``frozen_for_class_maps``, kept
    for the whole browse), or one clear error when it has not been trained."""
    from ..core.errors import CheckpointError
    from ..core.models.classifier import load_classifier
    from ..core.stage1.cams import frozen_for_class_maps

    if not checkpoint.is_file():
        raise CheckpointError("no trained classifier yet: train one first", checkpoint)
    model, _ = load_classifier(checkpoint, device)
    return frozen_for_class_maps(model)


def _stitched_view(model, loaded, recipe, device) -> ClassMapView:
    """A stitched source image with the fused class maps and pseudo-mask the generation job
    cuts its patches' masks from."""
    from ..core.stage1.pseudo_masks import final_map_name, fused_pseudo_masks

    _, title, image, patches = loaded
    result = fused_pseudo_masks(model, image, patches, recipe, device)
    return ClassMapView(title=title, spec=patches.spec, image=image.pixels, truth=None,
                        result=result, main_map=final_map_name(model, recipe))


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
        self._source_layer = None  # the viewer image being browsed, if any
        self._stitched_of = None  # (layout, patches, stitched images) of the run's dataset
        self._layers = ClassMapLayers(viewer, self.native,
                                      lambda text: set_info(self.view_info, text))

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
        if self.source.value == "stitched source images":  # known once the worker stitched
            known = self._stitched_of is not None and self._stitched_of[0] is layout
            return len(self._stitched_of[2]) if known else 1
        evaluation = layout.eval_set("val")
        return 0 if evaluation is None else len(evaluation)

    def _stitched(self, layout) -> list:
        """The dataset's overlapping patches stitched into their source images (in the worker,
        once per run folder: it decodes every patch)."""
        from ..core.data.stitching import stitch_patches

        if self._stitched_of is None or self._stitched_of[0] is not layout:
            patches = layout.patches()
            self._stitched_of = (layout, patches, stitch_patches(patches))
        return self._stitched_of[2]

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
        refined_path = self._refined_mask_path(run, layout)

        def make_job(stop):
            from ..core.data.datasets import read_mask
            from ..core.devices import resolve_device
            from ..core.events import Preview
            from ..core.stage1.pseudo_masks import final_map_name, pseudo_masks_for_images

            device = resolve_device(device_name)
            checkpoint = run.classifier_checkpoint
            model = models.get(checkpoint, device, lambda: _trained_classifier(checkpoint, device))
            loaded = load()
            if loaded[0] == STITCHED:
                yield Preview(STAGE, loaded[1], _stitched_view(model, loaded, recipe, device))
                return
            title, image, labels, truth, transform = loaded
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
                refined=None if refined_path is None else read_mask(refined_path, layout.spec),
            )
            yield Preview(STAGE, title, view)

        return make_job

    def _refined_mask_path(self, run, layout):
        """The self-training teacher's saved relabelling of the training patch on show, or
        None (another source, a run without a teacher, or not relabelled yet)."""
        from ..core.config.run_config import REFINED_TARGET

        if self.source.value != "training patches":
            return None
        paths = layout.patches().paths
        if not len(paths):
            return None
        name = paths[min(int(self.index.value), len(paths) - 1)].with_suffix(".png").name
        path = run.pseudo_mask_dir(REFINED_TARGET) / name
        return path if path.is_file() else None

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
        if source == "stitched source images":
            def load_stitched():
                stitched = self._stitched(layout)
                if not stitched:
                    raise ConfigError("no training patches overlap in a source image (names "
                                      "<image>-<y>-<x>-[labels] whose pixels agree)",
                                      layout.root)
                image = stitched[min(index, len(stitched) - 1)]
                title = f"{image.source} · {len(image.placements)} patches stitched"
                return STITCHED, title, image, self._stitched_of[1]

            return load_stitched
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
            self._layers.show(event.data, self._source_layer)
            if self.source.value == "stitched source images":
                self.index.max = max(self._source_length() - 1, 0)

    @property
    def showing(self) -> bool:
        """Whether a browse result is still being turned into layers."""
        return self._layers.busy

    def _on_preview_state(self, state: JobState) -> None:
        if state is JobState.FAILED:
            set_info(self.view_info, f"failed: {self.preview_runner.error}", error=True)
        if not state.busy and self._pending_preview:
            self._pending_preview = False
            self.show_class_maps()

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
            if config.pseudo_masks.teacher and run.is_complete(STAGE):  # self-training
                from ..core.stage2.self_training import refine_pseudo_masks

                yield from refine_pseudo_masks(run, config, patches, device=device, stop=stop,
                                               val=evaluation, resume=False)

        device_name = self.device.value
        return make_job, device_name

    def on_job_finished(self, state: JobState) -> None:
        self._load_run()

