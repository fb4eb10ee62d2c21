"""QuPath round trip: corrections and review items out as GeoJSON, classified annotations in.

Export follows ``core/wsi/geojson_export.py``: one feature per class and image, classified
with the run's class names and colours, coordinates in the image's full-resolution pixels
(``[x, y]``). Import reads what QuPath writes (a FeatureCollection or a bare list of features,
``Polygon`` / ``MultiPolygon`` with holes, ``properties.classification.name``) and paints
every pixel whose centre lies inside a polygon; holes are left unpainted. Features without a
class (plain QuPath annotations, our own review rectangles) are skipped and counted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.classes import DatasetSpec
from ..errors import DatasetError
from ..wsi.geojson_export import labels_to_geojson, spec_classes, write_geojson
from .store import Correction

#: Classification of the review queue's rectangles in QuPath (not a class of the run).
REVIEW_CLASS = "Review"
REVIEW_COLOUR = (255, 0, 255)


def correction_classes(spec: DatasetSpec) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """Label value -> (name, colour) in the 0-ignore convention, background included."""
    classes = spec_classes(spec, label_offset=1)
    classes[spec.background_index + 1] = ("background", tuple(spec.colours[-1]))
    return classes


def corrections_to_geojson(corrections: Sequence[Correction], spec: DatasetSpec
                           ) -> dict[str, Any]:
    """One FeatureCollection of every correction's painted classes (exact outlines)."""
    features = []
    for correction in corrections:
        top, left = correction.region[:2]
        collection = labels_to_geojson(correction.labels, correction_classes(spec),
                                       scale=correction.downsample, simplify=0.0, min_area=1.0)
        for feature in collection["features"]:
            _shift(feature["geometry"], left, top)
            feature["properties"].update(image=correction.image, kind=correction.kind,
                                         author=correction.author, created=correction.created)
            features.append(feature)
    return {"type": "FeatureCollection", "features": features}


def review_to_geojson(items: Sequence[Any]) -> dict[str, Any]:
    """The review queue as rectangles QuPath opens: each item's focus window, ranked."""
    features = []
    for rank, item in enumerate(items, start=1):
        top, left, height, width = item.focus
        ring = [[left, top], [left + width, top], [left + width, top + height],
                [left, top + height], [left, top]]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "annotation", "name": f"review {rank}: {item.score:.3f}",
                "classification": {"name": REVIEW_CLASS, "color": list(REVIEW_COLOUR)},
                "image": item.image, "rank": rank, "score": item.score,
                "entropy": item.entropy, "disagreement": item.disagreement},
        })
    return {"type": "FeatureCollection", "features": features}


def save_geojson(collection: dict[str, Any], path: str | Path) -> Path:
    return write_geojson(collection, path)


@dataclass
class ImportedAnnotations:
    corrections: list[Correction]
    skipped: int  # features without a class of the run (plain annotations, review items)


def read_annotations(path: str | Path, spec: DatasetSpec, *, image: str | Path | None = None,
                     kind: str = "image", image_shape: tuple[int, int] | None = None,
                     downsample: float = 1.0, author: str | None = None
                     ) -> ImportedAnnotations:
    """Corrections from a GeoJSON file of classified annotations.

    ``image`` says which image or slide the annotations were drawn on; without it every
    feature must name its image (``properties.image``, as our export writes). An image's
    correction covers the whole image (``image_shape``, read from the file when None); a
    slide's covers the annotations' bounding box, painted at ``downsample``.
    """
    path = Path(path)
    by_image: dict[str, list[tuple[int, list]]] = defaultdict(list)
    skipped = 0
    values = {name: value for value, (name, _) in correction_classes(spec).items()}
    for feature in _features(path):
        properties = feature.get("properties") or {}
        name = _class_name(properties)
        if name is None or name == REVIEW_CLASS:
            skipped += 1
            continue
        if name not in values:
            raise DatasetError(f"annotation class '{name}' is not one of the run's classes "
                               f"({', '.join(values)})", path)
        owner = image if image is not None else properties.get("image")
        if owner is None:
            raise DatasetError("the annotations do not say which image they belong to: give "
                               "the image (or --slide)", path)
        by_image[str(owner)].append((values[name], _polygons(feature.get("geometry"), path)))
    corrections = []
    for owner, shapes in by_image.items():
        region = _region(owner, kind, shapes, image_shape, downsample, path)
        labels = rasterise(shapes, region, downsample)
        corrections.append(Correction(owner, labels, kind, region, downsample,
                                      **({"author": author} if author is not None else {})))
    return ImportedAnnotations(corrections, skipped)


def rasterise(shapes: list[tuple[int, list]], region: tuple[int, int, int, int],
              downsample: float) -> np.ndarray:
    """Label map of ``region``: pixels whose centre is inside a polygon take its value, in
    file order (later annotations paint over earlier ones); holes stay as they were."""
    from skimage.draw import polygon as fill

    top, left, height, width = region
    shape = (max(1, round(height / downsample)), max(1, round(width / downsample)))
    labels = np.zeros(shape, np.uint8)
    for value, polygons in shapes:
        for rings in polygons:
            inside = np.zeros(shape, bool)
            for index, ring in enumerate(rings):
                points = np.asarray(ring, dtype=np.float64)
                rows = (points[:, 1] - top) / downsample - 0.5
                cols = (points[:, 0] - left) / downsample - 0.5
                rr, cc = fill(rows, cols, shape)
                inside[rr, cc] = index == 0
            labels[inside] = value
    return labels


def _features(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError("annotation file not found", path) from None
    except (OSError, ValueError) as error:
        raise DatasetError(f"not a readable GeoJSON file ({error})", path) from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        data = [data]
    if not isinstance(data, list) or not all(isinstance(f, dict) for f in data):
        raise DatasetError("expected a GeoJSON FeatureCollection or a list of features", path)
    return data


def _class_name(properties: dict[str, Any]) -> str | None:
    classification = properties.get("classification")
    if isinstance(classification, dict):
        return classification.get("name")
    if isinstance(classification, str):
        return classification
    return None


def _polygons(geometry: Any, path: Path) -> list[list]:
    """A geometry's polygons, each ``[outer, *holes]`` of ``[x, y]`` rings."""
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    if kind == "Polygon":
        return [geometry["coordinates"]]
    if kind == "MultiPolygon":
        return list(geometry["coordinates"])
    raise DatasetError(f"annotation geometry '{kind}' cannot be painted: draw areas "
                       "(Polygon or MultiPolygon), not lines or points", path)


def _region(owner: str, kind: str, shapes: list[tuple[int, list]],
            image_shape: tuple[int, int] | None, downsample: float, path: Path
            ) -> tuple[int, int, int, int]:
    if kind == "image":
        if image_shape is None:
            image_shape = _image_shape(owner, path)
        return 0, 0, int(image_shape[0]), int(image_shape[1])
    points = np.concatenate([np.asarray(ring, dtype=np.float64).reshape(-1, 2)
                             for _, polygons in shapes for rings in polygons for ring in rings])
    left, top = np.floor(points.min(axis=0)).clip(0).astype(int)
    right, bottom = np.ceil(points.max(axis=0)).astype(int)
    step = max(1, round(downsample))
    return int(top), int(left), int(-(-(bottom - top) // step) * step), \
        int(-(-(right - left) // step) * step)


def _image_shape(owner: str, path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(owner) as opened:
            return opened.height, opened.width
    except OSError as error:
        raise DatasetError(f"cannot open the annotated image {owner} ({error})", path) from None


def _shift(geometry: dict[str, Any], dx: float, dy: float) -> None:
    rings = [geometry["coordinates"]] if geometry["type"] == "Polygon" \
        else geometry["coordinates"]
    for polygon in rings:
        for ring in polygon:
            for point in ring:
                point[0] = round(point[0] + dx, 2)
                point[1] = round(point[1] + dy, 2)
