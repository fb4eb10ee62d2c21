"""Class colours and names as napari shows them: one place for the widgets and the reader.

Labels layers use the value ``class index + 1`` for tissue and 0 (transparent) for background.
Their colours are the dataset's, brightened where they are dark, so that the same class has the
same colour in a live result, a result opened again from disk and the legend; the class names
go in a "class" feature column, which napari shows on hover and the legend lists.
"""

from __future__ import annotations

from typing import Any


def bright_colour(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    """A class colour scaled to full brightness (dark palette colours vanish when added)."""
    peak = max(max(colour), 1)
    return tuple(channel / peak for channel in colour)


def labels_colormap(spec):
    """The dataset's class colours for displayed labels, brightened so that dark palette
    colours (WSSS4LUAD's navy tumour) read on napari's dark canvas; background is
    transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    colours: dict[Any, tuple[float, ...]] = {0: (0.0, 0.0, 0.0, 0.0), None: (0.0, 0.0, 0.0, 0.0)}
    for index, colour in enumerate(spec.colours[: spec.num_classes]):
        colours[index + 1] = (*bright_colour(colour), 1.0)
    return DirectLabelColormap(color_dict=colours)


def class_features(spec) -> dict[str, list[str]]:
    """One row per displayed label value, so the status bar names the class under the mouse."""
    return {"class": ["background", *spec.class_names]}
