"""Putting results into the viewer: class-coloured labels, CAM overlays, reusable layers.

All labels layers the widgets show use one convention, the one of the slide outputs: value
``class index + 1`` for tissue and 0 (transparent) for background, so patch pseudo-masks,
ground truth and slide segmentations overlay an image the same way and hovering shows the
class name. Call these from the main thread only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .class_colours import bright_colour, class_features, labels_colormap

#: Larger image layers are refused by whole-image jobs.
MAX_IMAGE_SIDE = 4096

# Layer defaults: the tissue stays visible. One filled overlay (a prediction or a pseudo-mask)
# is shown at a time, half transparent; ground truth is drawn as outlines over it; class maps
# and the other overlays are added hidden, ready to be switched on in the layer list.
#: A filled class overlay (labels).
OVERLAY_STYLE: dict[str, Any] = {"opacity": 0.5, "blending": "translucent"}
#: Ground truth as class-coloured outlines (``contour`` is set after the layer exists).
TRUTH_STYLE: dict[str, Any] = {"opacity": 1.0, "contour": 2}
#: A class activation map: hidden until asked for, translucent over the tissue.
CAM_STYLE: dict[str, Any] = {"blending": "translucent", "opacity": 0.7, "visible": False}


def display_labels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Dataset mask (classes 0..C-1, background C, 255 unlabelled) -> displayed labels."""
    mask = np.asarray(mask)
    return np.where(mask < num_classes, mask.astype(np.int64) + 1, 0).astype(np.uint8)


def cam_colormap(class_name: str, colour: tuple[int, int, int]):
    """The class colour, from transparent (no activation) to opaque (the class's peak).

    Low activation leaves the tissue visible under every blending mode. Additive blending,
    which sums the classes' colours, saturates to white over bright H&E, so the CAM layers
    are translucent by default; switch them to additive over a dark background at will.
    """
    from napari.utils.colormaps import Colormap

    rgb = bright_colour(colour)
    return Colormap([[*rgb, 0.0], [*rgb, 1.0]], name=f"histo-wsss {class_name}")


def put_layer(viewer, kind: str, name: str, data, *, above=None, **properties):
    """Update the layer called ``name`` in place, or add it (``kind``: "image" or "labels").

    Updating keeps the user's opacity, visibility and position in the layer list between
    patches; a layer of another kind or shape family with that name is replaced. A new layer
    goes right above the layer ``above`` (its image, or the overlay placed before it), so an
    overlay is never hidden under an opaque image that was added later.
    """
    contour = properties.pop("contour", None)
    layer = layer_named(viewer, name)
    if layer is not None and _can_update(layer, kind, data, properties):
        layer.data = data
        for key in ("colormap", "features", "scale", "translate", "units", "contrast_limits",
                    "metadata"):
            if key in properties and not _unchanged(layer, key, properties[key]):
                setattr(layer, key, properties[key])
        if above is not None and above in viewer.layers:
            index, anchor = viewer.layers.index(layer), viewer.layers.index(above)
            if index < anchor:  # an image added since sits over it: lift it above its image
                viewer.layers.move(index, anchor + 1)
        return layer
    if layer is not None:
        viewer.layers.remove(layer)
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    layer = add(data, name=name, **properties)
    if contour is not None:
        layer.contour = contour
    if above is not None and above in viewer.layers:
        viewer.layers.move(viewer.layers.index(layer), viewer.layers.index(above) + 1)
    return layer


def put_class_labels(viewer, name: str, mask: np.ndarray, spec, *, above=None, **properties):
    """A dataset mask (``put_layer``) as labels in the dataset's class colours, with the
    class names a legend and hovering show."""
    return put_layer(viewer, "labels", name, display_labels(mask, spec.num_classes),
                     above=above, colormap=labels_colormap(spec), features=class_features(spec),
                     **properties)


def _unchanged(layer, key: str, value) -> bool:
    """Whether a colormap or features table equals the layer's own: setting either again
    costs napari tens of milliseconds per layer on every browse step (a recolour, a new
    table), for nothing."""
    current = getattr(layer, key, None)
    if key == "features":
        import pandas as pd

        return isinstance(current, pd.DataFrame) and current.equals(pd.DataFrame(value))
    if key == "colormap":
        return current is not None and _colormap_key(current) == _colormap_key(value)
    return False


def _colormap_key(colormap) -> tuple:
    """What a napari colormap draws: a direct labels colormap's colour per value, else the
    name and the colour stops."""
    colours = getattr(colormap, "color_dict", None)
    if colours is not None:
        return tuple(sorted((str(value), tuple(np.round(np.asarray(colour, float), 6)))
                            for value, colour in colours.items()))
    stops = np.round(np.asarray(getattr(colormap, "colors", ()), float), 6)
    return (getattr(colormap, "name", None), stops.shape, stops.tobytes())


def _can_update(layer, kind: str, data, properties: dict) -> bool:
    from napari.layers import Image, Labels

    expected = Labels if kind == "labels" else Image
    if not isinstance(layer, expected) or layer.multiscale != bool(properties.get("multiscale")):
        return False
    if kind == "image":
        return bool(getattr(layer, "rgb", False)) == bool(properties.get("rgb", False))
    return True


def layer_transform(layer) -> dict[str, tuple]:
    """Scale, translate and units that put results over ``layer``'s pixels."""
    return {"scale": tuple(layer.scale[-2:]), "translate": tuple(layer.translate[-2:]),
            "units": tuple(layer.units[-2:])}


def layer_named(viewer, name: str):
    """The viewer's layer called ``name``, or None (napari's LayerList has no ``get``)."""
    return next((layer for layer in viewer.layers if layer.name == name), None)


def remove_layers(viewer, names) -> None:
    for name in list(names):
        if name in viewer.layers:
            viewer.layers.remove(name)


def rgb_pixels(layer) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of a 2D RGB image layer, or ConfigError.

    Whole-image jobs (class maps, predictions) hold the image in memory, so slides and very
    large images are refused with a pointer to the widgets made for them.
    """
    from ..core.errors import ConfigError

    if layer.multiscale:
        raise ConfigError(f"'{layer.name}' is a multiscale slide: compare on its 'slide view', "
                          "or use the Segment slide widget")
    data = np.asarray(layer.data)
    if data.ndim != 3 or data.shape[-1] not in (3, 4):
        raise ConfigError(f"'{layer.name}' is not a 2D RGB image (shape {data.shape})")
    if max(data.shape[:2]) > MAX_IMAGE_SIDE:
        raise ConfigError(f"'{layer.name}' is {data.shape[1]}x{data.shape[0]}: crop it below "
                          f"{MAX_IMAGE_SIDE} px a side first")
    if data.dtype != np.uint8:
        span = max(float(data.max() - data.min()), 1e-12)
        data = ((data - data.min()) / span * 255).round().astype(np.uint8)
    return np.ascontiguousarray(data[..., :3])


class LayerSteps:
    """Main-thread layer updates run a few at a time, the event loop answering in between.

    napari takes 0.1-0.6 s to create a layer on the 2-core machine (docs/widgets.md), so
    showing one result's six layers in one call froze the window for a second. ``run`` does
    steps until SLICE_MS have passed (short, so a quick step and a new layer do not add up
    in one pass), then lets the event loop run before the next ones;
    updating existing layers in place is fast and usually finishes in one pass. A new
    ``run`` drops the steps of the previous one that have not run yet; ``then`` queues
    behind them. The timer is a child of ``owner`` (the widget), so steps stop with it.
    """

    SLICE_MS = 25

    def __init__(self, owner) -> None:
        from qtpy.QtCore import QTimer

        self._steps: deque[Callable[[], None]] = deque()
        self._timer = QTimer(owner)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._run_slice)

    @property
    def busy(self) -> bool:
        return bool(self._steps)

    def run(self, steps: Iterable[Callable[[], None]]) -> None:
        """Start ``steps`` now, dropping any not yet run."""
        self._timer.stop()
        self._steps = deque(steps)
        self._run_slice()

    def then(self, steps: Iterable[Callable[[], None]]) -> None:
        """Queue ``steps`` after those not yet run (at once if there are none)."""
        idle = not self._steps
        self._steps.extend(steps)
        if idle:
            self._run_slice()

    def _run_slice(self) -> None:
        began = time.perf_counter()
        while self._steps:
            self._steps.popleft()()
            if self._steps and (time.perf_counter() - began) * 1000 > self.SLICE_MS:
                self._timer.start()
                return


class LayersShown:
    """Lets a job's thread wait until the main thread has put a preview's layers in.

    napari builds a layer 3-5 times slower while a job computes beside it (the two threads
    share Python's lock; docs/widgets.md), so a job that sends layers pauses until they are
    in: ``expect`` before sending, ``wait`` after (on the job's thread); the widget calls
    ``shown`` once its steps for that preview have run. The wait ends on a stop request or
    after ``timeout_s`` (a closed widget never shows anything).
    """

    def __init__(self, timeout_s: float = 3.0):
        self.timeout_s = timeout_s
        self._event = threading.Event()

    def expect(self) -> None:
        self._event.clear()

    def shown(self) -> None:
        self._event.set()

    def wait(self, stop=None) -> bool:
        """True when the layers are in; False on a stop request or the timeout."""
        end = time.monotonic() + self.timeout_s
        while not self._event.wait(0.05):
            if (stop is not None and stop.requested) or time.monotonic() > end:
                return False
        return True
