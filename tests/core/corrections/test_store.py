"""Corrections round trip through the run directory and through QuPath GeoJSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

from napari_histo_wsss.core.config.run_config import RunConfig
from napari_histo_wsss.core.corrections.geojson import (
    corrections_to_geojson,
    read_annotations,
    save_geojson,
)
from napari_histo_wsss.core.corrections.store import Correction, CorrectionStore
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.errors import DatasetError
from napari_histo_wsss.core.runs.run_dir import RunDirectory


@pytest.fixture
def run(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.create(RunConfig(dataset=WSSS4LUAD.to_dict()))
    return run


@pytest.fixture
def val_image(sample_dataset_dir):
    return sorted((sample_dataset_dir / "val" / "img").glob("*.png"))[0]


def strokes(shape) -> np.ndarray:
    """Two brush dabs of different classes and a background dab, the rest unpainted."""
    labels = np.zeros(shape, np.uint8)
    labels[disk((40, 50), 9, shape=shape)] = 1  # tumor
    labels[disk((90, 120), 12, shape=shape)] = 2  # stroma
    labels[disk((30, 150), 5, shape=shape)] = 4  # background
    return labels


def image_shape(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


def test_round_trip_through_the_run_directory(run, val_image):
    labels = strokes(image_shape(val_image))
    written = Correction(val_image, labels, author="pathologist")
    path = CorrectionStore.of_run(run).save(written)
    assert path.parent == run.root / "corrections" and path.suffix == ".png"

    # A new store object (napari closed and reopened) reads the same pixels and record.
    loaded = CorrectionStore.of_run(run.root).find(val_image)
    assert np.array_equal(loaded.labels, labels)
    assert loaded.image == str(val_image.resolve())
    assert loaded.region == (0, 0, *labels.shape)
    assert (loaded.author, loaded.created, loaded.kind) == ("pathologist", written.created,
                                                            "image")
    entry = json.loads((run.root / "corrections" / "index.json").read_text())["entries"][0]
    assert entry["classes"] == ["tumor", "stroma", "background"]
    assert entry["painted_pixels"] == int((labels > 0).sum())

    # Painting the same image again replaces it; erasing everything removes it.
    store = CorrectionStore.of_run(run)
    repainted = labels.copy()
    repainted[labels == 1] = 3
    store.save(Correction(val_image, repainted))
    assert len(store.load_all()) == 1
    assert np.array_equal(store.find(val_image).labels, repainted)
    store.remove(store.find(val_image))
    assert store.load_all() == [] and not path.exists()


def test_bad_labels_and_a_lost_file_are_reported_with_the_file(run, val_image):
    store = CorrectionStore.of_run(run)
    labels = strokes(image_shape(val_image))
    labels[0, 0] = 9
    with pytest.raises(DatasetError, match="painted label 9 is not a class"):
        store.save(Correction(val_image, labels))
    labels[0, 0] = 0
    path = store.save(Correction(val_image, labels))
    path.unlink()
    with pytest.raises(DatasetError, match="missing") as error:
        store.load_all()
    assert str(path) in str(error.value)


def test_round_trip_through_qupath_geojson(tmp_path, val_image):
    labels = strokes(image_shape(val_image))
    collection = corrections_to_geojson([Correction(val_image, labels)], WSSS4LUAD)
    names = {f["properties"]["classification"]["name"] for f in collection["features"]}
    assert names == {"tumor", "stroma", "background"}
    assert all(f["properties"]["objectType"] == "annotation" for f in collection["features"])
    path = save_geojson(collection, tmp_path / "corrections.geojson")

    imported = read_annotations(path, WSSS4LUAD).corrections
    assert len(imported) == 1 and imported[0].image == str(val_image.resolve())
    assert np.array_equal(imported[0].labels, labels)


def test_slide_region_round_trip_keeps_position_and_resolution(tmp_path):
    slide = tmp_path / "slide.svs"
    labels = np.zeros((40, 60), np.uint8)
    labels[10:30, 5:25] = 2
    labels[disk((20, 45), 8, shape=labels.shape)] = 1
    written = Correction(slide, labels, kind="slide", region=(1000, 2000, 160, 240),
                         downsample=4.0)
    path = save_geojson(corrections_to_geojson([written], WSSS4LUAD), tmp_path / "a.geojson")
    first_x = json.loads(path.read_text())["features"][0]["geometry"]["coordinates"][0][0][0]
    assert 2000 <= first_x <= 2240  # level-0 coordinates

    back = read_annotations(path, WSSS4LUAD, image=slide, kind="slide",
                            downsample=4.0).corrections[0]
    top, left = back.region[:2]
    # The imported region is the annotations' bounding box: compare where both are painted.
    dy, dx = (top - 1000) // 4, (left - 2000) // 4
    window = labels[dy:dy + back.labels.shape[0], dx:dx + back.labels.shape[1]]
    assert np.array_equal(back.labels, window)
    assert window.sum() == labels.sum()


def test_qupath_file_with_unknown_class_or_no_image_is_refused(tmp_path, val_image):
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    feature = {"type": "Feature", "geometry": square,
               "properties": {"classification": {"name": "Necrosis"}}}
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps([feature]))
    with pytest.raises(DatasetError, match="'Necrosis' is not one of") as error:
        read_annotations(path, WSSS4LUAD, image=val_image)
    assert str(path) in str(error.value)
    feature["properties"]["classification"]["name"] = "stroma"
    path.write_text(json.dumps([feature, {**feature, "properties": {}}]))
    with pytest.raises(DatasetError, match="which image"):
        read_annotations(path, WSSS4LUAD)
    imported = read_annotations(path, WSSS4LUAD, image=val_image)
    assert imported.skipped == 1
    assert imported.corrections[0].labels.sum() == 2 * 10 * 10  # stroma = 2, centres inside
