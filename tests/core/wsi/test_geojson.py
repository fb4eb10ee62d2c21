"""Class polygons for QuPath: holes kept, islands separate, level-0 coordinates, bounded reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.wsi.geojson_export import (
    class_polygons,
    labels_to_geojson,
    segmentation_to_geojson,
    spec_classes,
)


def ring_area(ring) -> float:
    """Shoelace area of an ``[x, y]`` ring: positive when counter-clockwise."""
    points = np.asarray(ring)
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


@pytest.fixture
def donut() -> np.ndarray:
    """Class 1: a square with a hole; class 2: an island inside the hole and a separate blob."""
    labels = np.zeros((60, 80), np.uint8)
    labels[10:50, 10:50] = 1
    labels[20:40, 20:40] = 0
    labels[25:35, 25:35] = 2
    labels[5:15, 60:75] = 2
    return labels


def test_polygons_keep_holes_and_separate_islands(donut):
    tumour = class_polygons(donut == 1)
    assert len(tumour) == 1 and len(tumour[0]) == 2  # outer ring + one hole
    outer, hole = tumour[0]
    assert np.allclose(outer[0], outer[-1]) and np.allclose(hole[0], hole[-1])
    islands = class_polygons(donut == 2)
    assert len(islands) == 2 and all(len(polygon) == 1 for polygon in islands)


def test_feature_collection_is_what_qupath_imports(donut):
    classes = spec_classes(WSSS4LUAD)  # label value = class index + 1
    collection = labels_to_geojson(donut, classes, scale=4.0)
    assert collection["type"] == "FeatureCollection"
    by_name = {f["properties"]["classification"]["name"]: f for f in collection["features"]}
    assert set(by_name) == {"tumor", "stroma"}
    tumour = by_name["tumor"]
    assert tumour["properties"]["objectType"] == "annotation"
    assert tumour["properties"]["classification"]["color"] == [0, 64, 128]
    assert tumour["geometry"]["type"] == "Polygon"
    outer, hole = tumour["geometry"]["coordinates"]
    assert ring_area(outer) > 0 > ring_area(hole)  # RFC 7946 orientation
    # level-0 pixels: the square spans label pixels 10..50, i.e. 40..200 at scale 4
    xs, ys = np.asarray(outer)[:, 0], np.asarray(outer)[:, 1]
    assert xs.min() == pytest.approx(40, abs=2) and xs.max() == pytest.approx(200, abs=2)
    assert ys.min() == pytest.approx(40, abs=2) and ys.max() == pytest.approx(200, abs=2)
    assert ring_area(outer) + ring_area(hole) == pytest.approx((160**2 - 80**2), rel=0.05)
    assert by_name["stroma"]["geometry"]["type"] == "MultiPolygon"
    json.dumps(collection)  # serialisable as is


def test_segmentation_export_reads_a_level_that_fits(tmp_path, write_segmentation):
    labels = np.zeros((600, 800), np.uint8)
    labels[100:500, 100:700] = 1
    labels[200:300, 200:300] = 2
    path = write_segmentation(tmp_path / "seg.zarr", labels, level0_downsample=2.0)
    full = segmentation_to_geojson(path, tmp_path / "full.geojson")
    assert full["properties"]["pyramid_level"] == 0
    coarse = segmentation_to_geojson(path, max_pixels=200 * 200)
    assert coarse["properties"]["pyramid_level"] == 2  # 150 x 200 pixels
    for collection in (full, coarse):
        tumour = next(f for f in collection["features"]
                      if f["properties"]["classification"]["name"] == "tumor")
        outer = np.asarray(tumour["geometry"]["coordinates"][0])
        # level-0 pixels of the slide: 100..700 label pixels at 2x -> 200..1400
        assert outer[:, 0].min() == pytest.approx(200, abs=9)
        assert outer[:, 0].max() == pytest.approx(1400, abs=9)
    written = json.loads((tmp_path / "full.geojson").read_text())
    assert written["features"] == json.loads(json.dumps(full["features"]))
