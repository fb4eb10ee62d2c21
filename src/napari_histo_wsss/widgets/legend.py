"""Legend dock: the classes of the selected labels layer, or the colour key of a map.

For a labels layer with a direct colormap (every layer this plugin makes, and segmentations or
saved labels opened again with its reader) each class gets a row: its colour, its name (the
layer's "class" feature, else the label value), a check box that hides or shows that class
alone, and its share of the labelled pixels. For an image layer with a colormap (class maps,
trust maps) the legend is the colour ramp with the values at both ends.

The legend follows napari's selected layer. Pixel shares are counted in a worker thread on
the coarsest level of a multiscale layer, so a slide never stalls the viewer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QLinearGradient
from qtpy.QtWidgets import (
    QCheckBox,
    QFrame,
    QGridLayout,
    QLabel,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari

#: Largest pixel count read for the shares (a 2D layer above it is sampled with a stride).
SHARE_SAMPLE_PIXELS = 4_000_000


def class_rows(layer) -> list[tuple[int, str, tuple[float, ...]]]:
    """(label value, class name, RGBA) for each coloured value of a labels layer other than
    its background."""
    color_dict = getattr(layer.colormap, "color_dict", None) or {}
    background = _background(layer)
    names = _class_names(layer)
    rows = []
    for value, colour in sorted((k, v) for k, v in color_dict.items() if k is not None):
        if int(value) == background:
            continue
        rgba = tuple(float(c) for c in np.asarray(colour).ravel()[:4])
        rows.append((int(value), names.get(int(value), str(value)), rgba))
    return rows


def _background(layer) -> int:
    return int(getattr(layer.colormap, "background_value", 0))


def _class_names(layer) -> dict[int, str]:
    features = getattr(layer, "features", None)
    if features is None or "class" not in getattr(features, "columns", ()):
        return {}
    return {value: str(name) for value, name in enumerate(features["class"])}


def share_source(layer):
    """The array the pixel shares are counted on: the coarsest level, or a strided 2D view."""
    if layer.multiscale:
        return layer.data[-1]
    data = layer.data
    stride = max(1, int(np.ceil(np.sqrt(np.prod(data.shape) / SHARE_SAMPLE_PIXELS))))
    return data[..., ::stride, ::stride]


def pixel_shares(data, values: list[int], background: int = 0) -> dict[int, float]:
    """Each value's share of the labelled (not ``background``) pixels of ``data``."""
    array = np.asarray(data).ravel()
    array = array[(array != background) & (array >= 0)].astype(np.int64)
    counts = np.bincount(array, minlength=max(values, default=0) + 1)
    total = counts.sum()
    return {value: (counts[value] / total if total else 0.0) for value in values}


class LegendWidget(QWidget):
    """Class colours, names, visibility and pixel shares of napari's selected layer."""

    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.layer = None
        self._hidden: WeakKeyDictionary = WeakKeyDictionary()  # layer -> hidden values
        self._colours: WeakKeyDictionary = WeakKeyDictionary()  # layer -> colours before
        self._share_labels: dict[int, QLabel] = {}
        self._worker = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.title = QLabel("")
        self.title.setWordWrap(True)
        layout.addWidget(self.title)
        self.rows = QWidget()
        self.grid = QGridLayout(self.rows)
        self.grid.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.rows)
        self.ramp = _ColourRamp()
        layout.addWidget(self.ramp)
        layout.addStretch(1)
        viewer.layers.selection.events.active.connect(self._on_active)
        self._on_active()

    # -- which layer ---------------------------------------------------------------------------
    def _on_active(self, *_: Any) -> None:
        self.show_layer(self.viewer.layers.selection.active)

    def show_layer(self, layer) -> None:
        """Describe ``layer`` (None, or a layer the legend has nothing to say about: a hint)."""
        from napari.layers import Image, Labels

        if self.layer is not None:
            for event in (self.layer.events.data, self.layer.events.colormap):
                event.disconnect(self._refresh)
        self.layer = layer
        self._clear_rows()
        self.ramp.setVisible(False)
        if isinstance(layer, Labels) and class_rows(layer):
            self._show_classes(layer)
        elif isinstance(layer, Image) and not getattr(layer, "rgb", False):
            self._show_ramp(layer)
        else:
            self.title.setText("select a labels layer (classes) or a class or trust map "
                               "(colour key) in the layer list")
            return
        layer.events.data.connect(self._refresh)
        layer.events.colormap.connect(self._refresh)

    def _refresh(self, *_: Any) -> None:
        if self.layer is not None and self.layer in self.viewer.layers:
            layer, self.layer = self.layer, None
            for event in (layer.events.data, layer.events.colormap):
                event.disconnect(self._refresh)
            self.show_layer(layer)

    # -- labels: one row per class -------------------------------------------------------------
    def _show_classes(self, layer) -> None:
        self._keep_hidden(layer)
        self.title.setText(f"<b>{layer.name}</b> · share of labelled pixels")
        rows = class_rows(layer)
        hidden = self._hidden.get(layer, set())
        original = self._colours.get(layer, {})
        for row, (value, name, rgba) in enumerate(rows):
            shown_rgba = original.get(value, rgba)
            self.grid.addWidget(_swatch(shown_rgba), row, 0)
            box = QCheckBox(name)
            box.setChecked(value not in hidden)
            box.toggled.connect(lambda on, value=value: self.set_class_visible(value, on))
            self.grid.addWidget(box, row, 1)
            share = QLabel("…")
            share.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.grid.addWidget(share, row, 2)
            self._share_labels[value] = share
        self._count_shares(layer, [value for value, _, _ in rows])

    def _count_shares(self, layer, values: list[int]) -> None:
        from superqt.utils import create_worker

        source = share_source(layer)
        worker = create_worker(pixel_shares, source, values, _background(layer),
                               _start_thread=False)
        worker.returned.connect(lambda shares, layer=layer: self._show_shares(layer, shares))
        self._worker = worker
        worker.start()

    def recount(self, layer) -> None:
        """Count the shares again when ``layer`` is the one shown: a layer written in place
        (a slide being segmented) sends no data event, so its shares stayed at 0 %."""
        if layer is not None and layer is self.layer and self._share_labels:
            self._count_shares(layer, list(self._share_labels))

    def _show_shares(self, layer, shares: dict[int, float]) -> None:
        if layer is not self.layer:
            return
        for value, share in shares.items():
            label = self._share_labels.get(value)
            if label is not None:
                label.setText(f"{100 * share:.1f} %")

    def shares(self) -> dict[str, str]:
        """The share column as shown, by class name (for tests and scripts)."""
        names = {value: name for value, name, _ in class_rows(self.layer)} if self.layer else {}
        return {names[value]: label.text() for value, label in self._share_labels.items()
                if value in names}

    def set_class_visible(self, value: int, visible: bool) -> None:
        """Show or hide one class of the current labels layer (its colour becomes clear)."""
        layer = self.layer
        if layer is None:
            return
        colours = dict(layer.colormap.color_dict)
        original = self._colours.setdefault(layer, {})
        hidden = self._hidden.setdefault(layer, set())
        if not visible and value not in hidden:
            original[value] = tuple(np.asarray(colours[value], float).ravel())
            hidden.add(value)
            colours[value] = (*original[value][:3], 0.0)
        elif visible and value in hidden:
            hidden.discard(value)
            colours[value] = original.pop(value)
        self._set_colours(layer, colours)

    def _keep_hidden(self, layer) -> None:
        """Hide again the classes the user hid, after a widget put new colours on the layer
        (browsing to the next image updates the layer in place)."""
        hidden = self._hidden.get(layer, set())
        colours = dict(layer.colormap.color_dict)
        visible_again = [value for value in hidden
                         if value in colours and np.asarray(colours[value]).ravel()[3] > 0]
        for value in visible_again:
            self._colours.setdefault(layer, {})[value] = tuple(
                np.asarray(colours[value], float).ravel())
            colours[value] = (*np.asarray(colours[value], float).ravel()[:3], 0.0)
        if visible_again:
            self._set_colours(layer, colours)

    def _set_colours(self, layer, colours: dict) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        connected = layer is self.layer
        if connected:
            layer.events.colormap.disconnect(self._refresh)
        layer.colormap = DirectLabelColormap(color_dict=colours)
        if connected:
            layer.events.colormap.connect(self._refresh)

    def _clear_rows(self) -> None:
        self._share_labels.clear()
        while self.grid.count():
            item = self.grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()

    # -- images: the colour ramp ---------------------------------------------------------------
    def _show_ramp(self, layer) -> None:
        low, high = layer.contrast_limits
        self.title.setText(f"<b>{layer.name}</b> · colour key")
        colours = np.asarray(layer.colormap.colors)
        self.ramp.set_ramp(colours, _number(low), _number(high))
        self.ramp.setVisible(True)


def _number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"


def _swatch(rgba: tuple[float, ...]) -> QFrame:
    swatch = QFrame()
    swatch.setFixedSize(16, 16)
    red, green, blue = (int(round(255 * c)) for c in rgba[:3])
    swatch.setStyleSheet(f"background-color: rgb({red},{green},{blue}); border: 1px solid #888;")
    return swatch


class _RampBar(QWidget):
    """The gradient itself, painted by hand: napari's stylesheet overrides widget palettes, so
    a gradient set as a frame's background brush never showed."""

    def __init__(self):
        super().__init__()
        self.setFixedHeight(14)
        self.gradient: QLinearGradient | None = None

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        from qtpy.QtGui import QPainter, QPen

        if self.gradient is None:
            return
        painter = QPainter(self)
        rect = self.rect().adjusted(0, 0, -1, -1)
        gradient = QLinearGradient(rect.left(), 0, rect.right(), 0)
        gradient.setStops(self.gradient.stops())
        # On black, so a map's transparent end reads as "nothing" (as on napari's canvas).
        painter.fillRect(rect, QColor(0, 0, 0))
        painter.fillRect(rect, gradient)
        painter.setPen(QPen(QColor(136, 136, 136)))
        painter.drawRect(rect)
        painter.end()


class _ColourRamp(QWidget):
    """A horizontal colour ramp with its low and high values underneath."""

    def __init__(self):
        super().__init__()
        layout = QGridLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.bar = _RampBar()
        self.low, self.high = QLabel(""), QLabel("")
        self.high.setAlignment(Qt.AlignmentFlag.AlignRight)
        layout.addWidget(self.bar, 0, 0, 1, 2)
        layout.addWidget(self.low, 1, 0)
        layout.addWidget(self.high, 1, 1)
        self.colours: np.ndarray = np.zeros((0, 4))

    def set_ramp(self, colours: np.ndarray, low: str, high: str) -> None:
        self.colours = colours
        gradient = QLinearGradient(0, 0, 1, 0)
        for index, colour in enumerate(colours):
            position = index / max(len(colours) - 1, 1)
            gradient.setColorAt(position, QColor.fromRgbF(*(float(c) for c in colour[:4])))
        self.bar.gradient = gradient
        self.bar.update()
        self.low.setText(low)
        self.high.setText(high)


def ensure_legend(viewer) -> LegendWidget:
    """The viewer's legend dock, added (once) the first time a widget shows results."""
    existing = getattr(viewer.window, "_histo_wsss_legend", None)
    if existing is not None:
        return existing
    legend = LegendWidget(viewer)
    viewer.window.add_dock_widget(legend, name="Legend (Histo WSSS)", area="left")
    viewer.window._histo_wsss_legend = legend
    return legend
