"""napari writer: a labels layer saved as OME-Zarr labels (NGFF 0.4, nearest pyramid).

The file opens again in napari (this plugin or napari-ome-zarr) and in other NGFF tools with
its colours, because a direct label colormap is stored as ``image-label`` colours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one labels layer to ``path`` (``.zarr`` added when missing); returns the path.

    The layer name becomes a folder in the store, so it must be one safe path component; an
    unsafe name or an unwritable ``path`` is one ``OutputError`` that napari shows.
    """
    from .core.runs.outputs import FOLDER, check_layer_name, check_output
    from .core.wsi.ome_zarr_labels import write_label_pyramid

    out = Path(path)
    if out.suffix.lower() != ".zarr":
        out = out.with_name(out.name + ".zarr")
    name = check_layer_name(meta.get("name") or "labels")
    check_output(out, kind=FOLDER)
    labels = data[0] if isinstance(data, list | tuple) else data
    if labels.ndim != 2:
        raise ValueError(f"only 2-D label images can be saved as OME-Zarr labels, "
                         f"got {labels.ndim} dimensions")
    scale = meta.get("scale") or (1.0, 1.0)
    units = meta.get("units") or ()
    unit = str(units[-1]) if units and str(units[-1]) not in ("pixel", "") else None
    write_label_pyramid(
        out, labels, name=name, colours=_label_colours(meta),
        pixel_size=float(scale[-1]), unit=unit,
    )
    return [str(out)]


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
