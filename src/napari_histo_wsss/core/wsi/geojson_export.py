"""Class polygons of a label map as GeoJSON that QuPath imports as classified annotations.

Each class becomes one feature (a Polygon or MultiPolygon, holes kept) with
``"objectType": "annotation"`` and ``"classification": {"name", "color"}``, coordinates in
level-0 slide pixels. Polygons come from marching squares on each connected component
(``skimage.measure.find_contours`` on the component's own mask, so its holes are exactly the
other contours), lightly simplified with Douglas-Peucker. Outer rings run counter-clockwise and
holes clockwise, as RFC 7946 asks.

For a segmentation written by slide inference, the label map is read at the finest pyramid
level that fits ``max_pixels``, which bounds memory whatever the slide size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..data.classes import Colour, DatasetSpec

#: Pixels read at most (16.7 M = 4096 x 4096); the pyramid level is chosen to fit.
DEFAULT_MAX_PIXELS = 4096 * 4096


def spec_classes(spec: DatasetSpec, label_offset: int = 1) -> dict[int, tuple[str, Colour]]:
    """Label value -> (name, colour) for the tissue classes of ``spec``.

    ``label_offset`` is 1 for segmentations written here (0 = background) and 0 for dataset
    masks (class index = value, background = number of classes).
    """
    return {
        index + label_offset: (name, spec.colours[index])
        for index, name in enumerate(spec.class_names)
    }


def labels_to_geojson(
    labels: np.ndarray,
    classes: Mapping[int, tuple[str, Colour]],
    *,
    scale: float | tuple[float, float] = 1.0,
    simplify: float = 0.5,
    min_area: float = 4.0,
) -> dict[str, Any]:
    """A FeatureCollection with one feature per class present in ``labels``.

    ``scale`` is level-0 pixels per label pixel (one value or ``(y, x)``); ``simplify`` is the
    Douglas-Peucker tolerance and ``min_area`` the smallest polygon or hole kept, both in label
    pixels.
    """
    scale_y, scale_x = (scale, scale) if np.isscalar(scale) else scale
    features = []
    for value, (name, colour) in classes.items():
        polygons = class_polygons(labels == value, simplify=simplify, min_area=min_area)
        if not polygons:
            continue
        rings = [
            [_to_level0(ring, scale_y, scale_x) for ring in polygon] for polygon in polygons
        ]
        geometry = (
            {"type": "Polygon", "coordinates": rings[0]}
            if len(rings) == 1
            else {"type": "MultiPolygon", "coordinates": rings}
        )
        features.append({
            "type": "Feature",
            "geometry": geometry,
            "properties": {
                "objectType": "annotation",
                "name": name,
                "classification": {"name": name, "color": [int(c) for c in colour]},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def class_polygons(
    mask: np.ndarray, simplify: float = 0.5, min_area: float = 4.0
) -> list[list[np.ndarray]]:
    """Polygons of a boolean mask: per component ``[outer, *holes]`` as ``(row, col)`` rings.

    Rings are closed (first point repeated), in pixel-centre coordinates of ``mask``; the outer
    ring is counter-clockwise and holes clockwise (in x = col, y = row terms).
    """
    from skimage.measure import find_contours, label, regionprops

    polygons = []
    for region in regionprops(label(mask, connectivity=2)):
        if region.area < min_area:
            continue
        top, left = region.bbox[0] - 1, region.bbox[1] - 1
        padded = np.pad(region.image, 1)
        contours = find_contours(padded.astype(np.uint8), 0.5, fully_connected="high")
        rings = []
        for contour in contours:
            if abs(_signed_area(contour)) < min_area:
                continue  # a speck-sized hole
            ring = _drop_collinear(contour)
            if simplify:
                ring = _douglas_peucker(ring, simplify)
            if len(ring) < 4:
                continue
            rings.append(ring + (top, left))
        if not rings:
            continue
        rings.sort(key=lambda ring: -abs(_signed_area(ring)))
        polygons.append([
            ring if (index == 0) == (_signed_area(ring) > 0) else ring[::-1]
            for index, ring in enumerate(rings)
        ])
    return polygons


def segmentation_to_geojson(
    path: str | Path,
    out_path: str | Path | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    simplify: float = 0.5,
) -> dict[str, Any]:
    """GeoJSON of a segmentation zarr written by slide inference; saved if ``out_path``."""
    from .ome_zarr_labels import open_segmentation

    segmentation = open_segmentation(path)
    levels = segmentation.labels
    fitting = [k for k, array in enumerate(levels) if array.shape[0] * array.shape[1] <= max_pixels]
    level = fitting[0] if fitting else len(levels) - 1
    labels = np.asarray(levels[level].compute(scheduler="threads"))
    slide_height, slide_width = segmentation.attrs["slide"]["shape"]
    # Level k samples every 2**k-th output pixel; one output pixel spans slide / output pixels.
    scale = (
        slide_height / levels[0].shape[0] * 2**level,
        slide_width / levels[0].shape[1] * 2**level,
    )
    collection = labels_to_geojson(
        labels, spec_classes(segmentation.spec), scale=scale, simplify=simplify
    )
    collection["properties"] = {
        "source": str(path),
        "slide": segmentation.attrs["slide"]["path"],
        "slide_shape": [slide_height, slide_width],
        "pyramid_level": level,
    }
    if out_path is not None:
        write_geojson(collection, out_path)
    return collection


def write_geojson(collection: dict[str, Any], out_path: str | Path) -> Path:
    """Save ``collection`` atomically: a crash never leaves half a file over an old one."""
    from ..runs.outputs import atomic_write_text

    return atomic_write_text(out_path, json.dumps(collection, separators=(",", ":")))


def is_exported_geojson(path: str | Path) -> bool:
    """Whether ``path`` is a GeoJSON file that :func:`segmentation_to_geojson` wrote (so a new
    export may replace it): a ``.geojson``/``.json`` file whose properties name a pyramid level."""
    path = Path(path)
    if path.suffix.lower() not in (".geojson", ".json") or not path.is_file():
        return False
    try:
        properties = json.loads(path.read_text(encoding="utf-8")).get("properties") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(properties, dict) and {"slide", "pyramid_level"} <= properties.keys()


def _to_level0(ring: np.ndarray, scale_y: float, scale_x: float) -> list[list[float]]:
    """``(row, col)`` pixel-centre ring -> ``[x, y]`` level-0 ring, counter-clockwise if outer.

    Pixel ``i`` spans level-0 ``[i * s, (i + 1) * s)``, so a coordinate ``c`` in pixel-centre
    units maps to ``(c + 0.5) * s``.
    """
    points = np.column_stack(((ring[:, 1] + 0.5) * scale_x, (ring[:, 0] + 0.5) * scale_y))
    return np.round(points, 2).tolist()


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """The closed ring without points in the middle of straight runs (exact, and fast).

    Marching squares puts a point at every pixel edge; most lie on straight runs, and dropping
    them first leaves Douglas-Peucker little to do.
    """
    points = ring[:-1]
    if len(points) < 3:
        return ring
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    turns = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9
    kept = points[turns]
    if len(kept) < 3:
        return ring
    return np.vstack([kept, kept[:1]])


def _douglas_peucker(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a closed ring, one numpy pass per split."""
    keep = np.zeros(len(ring), bool)
    keep[[0, -1]] = True
    stack = [(0, len(ring) - 1)]
    while stack:
        start, end = stack.pop()
        if end - start < 2:
            continue
        origin, direction = ring[start], ring[end] - ring[start]
        offsets = ring[start + 1 : end] - origin
        length = float(np.hypot(*direction))
        if length == 0:  # the ring's closing segment: distance to the shared end point
            distances = np.hypot(offsets[:, 0], offsets[:, 1])
        else:
            cross = direction[0] * offsets[:, 1] - direction[1] * offsets[:, 0]
            distances = np.abs(cross) / length
        farthest = int(np.argmax(distances))
        if distances[farthest] > tolerance:
            split = start + 1 + farthest
            keep[split] = True
            stack += [(start, split), (split, end)]
    return ring[keep]


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area in ``(x=col, y=row)`` terms: positive for counter-clockwise."""
    x, y = ring[:, 1], ring[:, 0]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
