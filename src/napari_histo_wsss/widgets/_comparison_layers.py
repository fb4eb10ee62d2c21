"""One comparison as napari layers: the image, its pseudo-mask and ground truth, then each
strategy's prediction (linked to the others) and trust map, in the order they arrive.

Made on the main thread, one layer per ``LayerSteps`` step: the image's layers replace the
previous comparison's, the strategies' are queued behind them as the worker sends them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._layers import (
    OVERLAY_STYLE,
    TRUTH_STYLE,
    LayersShown,
    LayerSteps,
    put_class_labels,
    put_layer,
    remove_layers,
)
from .legend import ensure_legend

if TYPE_CHECKING:
    from ..core.stage2.compare import StrategyComparison

IMAGE_LAYER = "image (compare)"
TRUTH_LAYER = "ground truth (compare)"
PSEUDO_MASK_LAYER = "pseudo-mask (compare)"


@dataclass
class ComparedImage:
    """The image being compared and what is known about it (worker -> main thread)."""

    title: str
    spec: Any
    image: np.ndarray
    truth: np.ndarray | None = None
    pseudo_mask: np.ndarray | None = None
    transform: dict[str, Any] = field(default_factory=dict)  # where it sits in the viewer
    show_image: bool = True  # False: the image is the user's own layer


def prediction_layer_name(strategy: str) -> str:
    return f"prediction: {strategy}"


def trust_layer_name(strategy: str) -> str:
    return f"trust: {strategy}"


class ComparisonLayers:
    """The layers of the comparison in progress; ``on_predictions`` runs after each
    strategy's layers are in (the widget's IoU table)."""

    def __init__(self, viewer, owner, show_info: Callable[[str], None],
                 on_predictions: Callable[[], None]):
        self.viewer = viewer
        self._show_info = show_info
        self._on_predictions = on_predictions
        self._steps = LayerSteps(owner)
        #: The job waits on it after each preview it sends (``LayersShown``).
        self.shown = LayersShown()
        self._shown: set[str] = set()
        self._anchor = None  # the layer the next new layer goes above
        self._image: ComparedImage | None = None
        self._strategies: list[str] = []

    @property
    def busy(self) -> bool:
        return self._steps.busy

    def then(self, step: Callable[[], None]) -> None:
        """Run ``step`` once the layers queued so far are in."""
        self._steps.then([step])

    def show_image(self, compared: ComparedImage, source_layer=None) -> None:
        """The image (unless it is the user's ``source_layer``), then above it the pseudo-mask
        and the ground truth as outlines."""
        self._image, self._strategies = compared, []
        names: list[str] = []
        self._anchor = source_layer
        steps = []
        if compared.show_image:
            steps.append(lambda: self._put_image(compared, names))
        for name, mask, style in ((PSEUDO_MASK_LAYER, compared.pseudo_mask, OVERLAY_STYLE),
                                  (TRUTH_LAYER, compared.truth, TRUTH_STYLE)):
            if mask is not None:
                steps.append(lambda name=name, mask=mask, style=style:
                             self._put_mask(compared, name, mask, style, names))
        steps.append(lambda: self._finish_image(compared, names))
        steps.append(self.shown.shown)
        self._steps.run(steps)

    def show_result(self, result: StrategyComparison, first: bool) -> None:
        """A strategy's prediction (the first one shown, later ones hidden: tick them in the
        layer list or use the grid) and its trust map (hidden; its key is in the legend)."""
        self._strategies.append(result.strategy)
        steps = [lambda: self._put_prediction(result, first)]
        if result.trust is not None:
            steps.append(lambda: self._put_trust(result))
        steps.append(self._link_predictions)
        steps.append(self.shown.shown)
        self._steps.then(steps)

    def _put_image(self, compared: ComparedImage, names: list[str]) -> None:
        reset = IMAGE_LAYER not in self.viewer.layers or \
            self.viewer.layers[IMAGE_LAYER].data.shape != compared.image.shape
        layer = put_layer(self.viewer, "image", IMAGE_LAYER, compared.image, rgb=True)
        self.viewer.layers.move(self.viewer.layers.index(layer), 0)
        self._anchor = layer
        names.append(IMAGE_LAYER)
        if reset:
            self.viewer.reset_view()

    def _put_mask(self, compared: ComparedImage, name: str, mask: np.ndarray, style: dict,
                  names: list[str]) -> None:
        self._anchor = put_class_labels(
            self.viewer, name, mask, compared.spec, above=self._anchor,
            visible=name == TRUTH_LAYER, **style, **compared.transform)
        names.append(name)

    def _finish_image(self, compared: ComparedImage, names: list[str]) -> None:
        """Remove what the previous comparison showed and this one does not."""
        remove_layers(self.viewer, self._shown - set(names))
        self._shown = set(names)
        self._show_info(f"comparing on {compared.title}")
        ensure_legend(self.viewer)

    def _put_prediction(self, result: StrategyComparison, first: bool) -> None:
        name = prediction_layer_name(result.strategy)
        self._anchor = put_class_labels(
            self.viewer, name, result.labels, self._image.spec, above=self._anchor,
            visible=first, **OVERLAY_STYLE, **self._image.transform)
        self._shown.add(name)

    def _put_trust(self, result: StrategyComparison) -> None:
        trust = trust_layer_name(result.strategy)
        high = float(max(np.percentile(result.trust, 99), 1e-6))
        self._anchor = put_layer(
            self.viewer, "image", trust, result.trust, above=self._anchor,
            colormap="viridis", contrast_limits=(0.0, high), opacity=0.7, visible=False,
            **self._image.transform)
        self._shown.add(trust)

    def _link_predictions(self) -> None:
        from napari.experimental import link_layers, unlink_layers

        names = [prediction_layer_name(s) for s in self._strategies]
        predictions = [self.viewer.layers[n] for n in names if n in self.viewer.layers]
        if len(predictions) > 1:
            unlink_layers(predictions)
            link_layers(predictions, ("opacity", "contour"))
        self._on_predictions()
