"""napari writer: a labels layer saved as OME-Zarr labels (NGFF 0.4, nearest pyramid).

The file opens again in napari (this plugin or napari-ome-zarr) and in other NGFF tools where
the layer was: level 0's scale and translation are the layer's, a direct label colormap is
stored as ``image-label`` colours and a "class" feature column (what this plugin's layers carry)
as ``image-label`` properties, which the reader turns back into class names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one labels layer to ``path`` (``.zarr`` added when missing); returns the path.

    The layer name becomes a folder in the store, so it must be one safe path component; an
    unsafe name or an unwritable ``path`` is one ``OutputError`` that napari shows.
    """
    from .core.runs.outputs import FOLDER, OutputError, check_layer_name, check_output
    from .core.wsi.ome_zarr_labels import write_label_pyramid

    out = Path(path)
    if out.suffix.lower() != ".zarr":
        out = out.with_name(out.name + ".zarr")
    name = check_layer_name(meta.get("name") or "labels")
    check_output(out, kind=FOLDER)
    labels = finest_level(data)
    if labels.ndim != 2:
        raise OutputError(f"only 2-D label images can be saved as OME-Zarr labels, "
                          f"got {labels.ndim} dimensions", out)
    units = meta.get("units") or ()
    unit = str(units[-1]) if units and str(units[-1]) not in ("pixel", "") else None
    write_label_pyramid(
        out, labels, name=name, colours=_label_colours(meta), class_names=_class_names(meta),
        pixel_size=_last_two(meta.get("scale"), 1.0), offset=_last_two(meta.get("translate"), 0.0),
        unit=unit,
    )
    return [str(out)]


def finest_level(data: Any) -> Any:
    """Level 0 of a multiscale layer's data (napari's ``MultiScaleData``, a list), else data.

    Multiscale data is a sequence of arrays: indexing it with a 2-D slice would index the
    list of levels, not the pixels.
    """
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        return data[0]
    return data


def _last_two(values, default: float) -> tuple[float, float]:
    if values is None or len(values) < 2:
        return (default, default)
    return (float(values[-2]), float(values[-1]))


def _label_colours(meta: dict[str, Any]) -> dict[int, tuple[int, int, int, int]] | None:
    """RGBA 0-255 per label value from a direct colormap; None for napari's cyclic colours."""
    color_dict = getattr(meta.get("colormap"), "color_dict", None)
    if not color_dict:
        return None
    return {
        int(value): tuple(int(round(channel * 255)) for channel in np.asarray(colour).ravel()[:4])
        for value, colour in color_dict.items()
        if value is not None
    }


def _class_names(meta: dict[str, Any]) -> dict[int, str] | None:
    """Label value -> class name from the layer's "class" feature (row i is label value i)."""
    features = meta.get("features")
    if features is None or "class" not in getattr(features, "columns", ()):
        return None
    return {int(value): str(name) for value, name in enumerate(features["class"])}
