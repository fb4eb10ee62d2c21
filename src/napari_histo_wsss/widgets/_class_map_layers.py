"""One pseudo-mask browse result as napari layers: the image, each class's map, the voted
pseudo-mask, a self-training teacher's relabelling of it and the ground truth, stacked in
that order above their image.

The layers are made on the main thread, one per ``LayerSteps`` step, so the first view's new
layers (0.1-0.6 s each in napari) do not freeze the window at once; later views update the
same layers in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._layers import (
    CAM_STYLE,
    OVERLAY_STYLE,
    TRUTH_STYLE,
    LayerSteps,
    cam_colormap,
    layer_named,
    put_class_labels,
    put_layer,
    remove_layers,
)
from .legend import ensure_legend

IMAGE_LAYER = "image (pseudo-masks)"
MASK_LAYER = "pseudo-mask"
#: A training patch's mask as the self-training teacher relabelled it (what the segmenter
#: learns from; docs/algorithms.md 16).
REFINED_LAYER = "pseudo-mask (teacher)"
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
    refined: np.ndarray | None = None  # the teacher's saved relabelling of a training patch


class ClassMapLayers:
    """Shows ``ClassMapView`` results: class maps hidden, the pseudo-mask shown, the ground
    truth as outlines; layers of an earlier view that this one lacks are removed."""

    def __init__(self, viewer, owner, show_info: Callable[[str], None]):
        self.viewer = viewer
        self._show_info = show_info
        self._steps = LayerSteps(owner)
        self._shown: set[str] = set()
        self._anchor = None  # the layer the next new layer goes above

    @property
    def busy(self) -> bool:
        return self._steps.busy

    def show(self, view: ClassMapView, source_layer=None) -> None:
        """Queue ``view``'s layers (above ``source_layer`` when the image is the user's)."""
        spec, result, transform = view.spec, view.result, view.transform
        names: list[str] = []
        steps: list[Callable[[], None]] = []
        self._anchor = source_layer if view.image is None else None
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
        if view.refined is not None:
            steps.append(self._mask_step(REFINED_LAYER, view.refined, spec, names, transform))
        if view.truth is not None:
            steps.append(self._mask_step(TRUTH_LAYER, view.truth, spec, names, transform,
                                         style=TRUTH_STYLE))
        steps.append(lambda: self._finish(view, names, reset_view[0]))
        self._steps.run(steps)

    def _put_image(self, image: np.ndarray, names: list[str], reset_view: list[bool]) -> None:
        previous = layer_named(self.viewer, IMAGE_LAYER)
        reset_view[0] = previous is None or previous.data.shape != image.shape
        self._anchor = put_layer(self.viewer, "image", IMAGE_LAYER, image, rgb=True)
        if previous is None:
            self.viewer.layers.move(self.viewer.layers.index(self._anchor), 0)
        self._created(IMAGE_LAYER, names)

    def _class_map_steps(self, spec, maps: np.ndarray, suffix: str, names: list[str],
                         transform: dict) -> list[Callable[[], None]]:
        def put(index: int, name: str) -> None:
            self._anchor = put_layer(
                self.viewer, "image", name, maps[index], above=self._anchor,
                colormap=cam_colormap(spec.class_names[index], spec.colours[index]),
                contrast_limits=(0.0, 1.0), **CAM_STYLE, **transform)
            self._created(name, names)

        return [lambda index=index, name=f"CAM {class_name}{suffix}": put(index, name)
                for index, class_name in enumerate(spec.class_names)]

    def _mask_step(self, name: str, mask: np.ndarray, spec, names: list[str], transform: dict,
                   visible: bool = True, style: dict | None = None) -> Callable[[], None]:
        def put() -> None:
            self._anchor = put_class_labels(
                self.viewer, name, mask, spec, above=self._anchor, visible=visible,
                **(style or OVERLAY_STYLE), **transform)
            self._created(name, names)

        return put

    def _created(self, name: str, names: list[str]) -> None:
        """Record a layer of this view; ``_shown`` also keeps those of a view whose last steps
        were dropped for a newer one, so that they are removed when it ends."""
        names.append(name)
        self._shown.add(name)

    def _finish(self, view: ClassMapView, names: list[str], reset_view: bool) -> None:
        remove_layers(self.viewer, self._shown - set(names))
        self._shown = set(names)
        if reset_view:
            self.viewer.reset_view()
        probabilities = ", ".join(f"{name} {p:.2f}" for name, p in
                                  zip(view.spec.class_names, view.result.probabilities,
                                      strict=True))
        self._show_info(f"{view.title} · classifier: {probabilities}")
