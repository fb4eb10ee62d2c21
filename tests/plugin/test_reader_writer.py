"""The napari reader, writer, sample data and manifest, without a viewer."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from napari.utils.colormaps import DirectLabelColormap

from napari_histo_wsss._reader import get_reader, read_segmentation, read_slide
from napari_histo_wsss._sample_data import sample_labelled_patches, sample_slide
from napari_histo_wsss._writer import write_labels
from napari_histo_wsss.core.data.classes import WSSS4LUAD

WSI = Path(__file__).resolve().parents[3] / "shared" / "data" / "wsi"


@pytest.fixture
def notifications():
    """Messages napari would show as notifications."""
    from napari.utils.notifications import notification_manager

    received = []
    notification_manager.notification_ready.connect(received.append)
    yield received
    notification_manager.notification_ready.disconnect(received.append)


@pytest.mark.parametrize("name", ["notes.txt", "photo.png", "table.csv", "empty-folder"])
def test_foreign_paths_are_declined(tmp_path, name):
    path = tmp_path / name
    if name == "empty-folder":
        path.mkdir()
    else:
        path.write_text("x")
    assert get_reader(str(path)) is None
    assert get_reader([str(path), str(path)]) is None


def test_slide_opens_as_a_lazy_multiscale_image_in_microns(sample_slide_path):
    reader = get_reader(str(sample_slide_path))
    assert reader is read_slide
    [(data, kwargs, layer_type)] = reader(str(sample_slide_path))
    assert layer_type == "image"
    assert isinstance(data, list) and all(isinstance(level, da.Array) for level in data)
    assert [level.shape for level in data] == [(2967, 2220, 3), (1483, 1110, 3), (741, 555, 3)]
    assert kwargs["multiscale"] and kwargs["rgb"]
    assert kwargs["scale"] == pytest.approx((0.499, 0.499))
    assert kwargs["metadata"]["mpp"] == pytest.approx(0.499)
    assert kwargs["metadata"]["path"] == str(sample_slide_path)
    assert kwargs["name"] == "cmu-1-small-region-pyramid"


def test_tiff_without_mpp_uses_pixel_scale(tmp_path):
    path = tmp_path / "plain.tiff"
    tifffile.imwrite(path, np.full((700, 600), 128, np.uint8), tile=(64, 64))
    [(data, kwargs, _)] = get_reader(str(path))(str(path))
    assert kwargs["scale"] == (1.0, 1.0) and "units" not in kwargs
    assert data[0].shape == (700, 600, 3) and len(data) == 2  # lazy pyramid for one level


def test_a_corrupt_slide_gives_one_clear_notification(tmp_path, notifications):
    path = tmp_path / "case-12.svs"
    path.write_bytes(b"IJrEr1vVVJCw this is not a slide")
    reader = get_reader(str(path))
    assert reader is not None  # claimed, so the user hears why it failed
    assert reader(str(path)) == [(None,)]  # napari's "read, nothing to add"
    [notification] = notifications
    assert notification.message.startswith("Cannot open case-12.svs: not a readable slide")
    assert "\n" not in notification.message


@pytest.mark.skipif(not WSI.exists(), reason="needs ../shared/data/wsi")
def test_shared_broken_svs(notifications):
    assert read_slide(str(WSI / "broken.svs")) == [(None,)]
    assert notifications[0].message.startswith("Cannot open broken.svs: not a readable slide")


def test_segmentation_opens_as_labels_and_hidden_maps_aligned_with_the_slide(
        tmp_path, write_segmentation):
    labels = np.zeros((300, 400), np.uint8)
    labels[50:250, 50:350] = 1
    labels[100:150, 100:150] = 3
    path = write_segmentation(tmp_path / "seg.zarr", labels, level0_downsample=2.0)
    assert get_reader(str(path)) is read_segmentation
    layers = read_segmentation(str(path))
    by_type = {}
    for data, kwargs, layer_type in layers:
        by_type.setdefault(layer_type, []).append((data, kwargs))
    [(label_levels, label_kwargs)] = by_type["labels"]
    assert [level.shape for level in label_levels] == [(300, 400), (150, 200)]
    np.testing.assert_array_equal(label_levels[0].compute(), labels)
    # one label pixel spans two 0.5 um slide pixels
    assert label_kwargs["scale"] == pytest.approx((1.0, 1.0))
    assert label_kwargs["translate"] == pytest.approx((0.25, 0.25))
    colormap = label_kwargs["colormap"]
    assert isinstance(colormap, DirectLabelColormap)
    # the dataset's navy tumour colour, brightened to read on a dark canvas
    assert np.allclose(colormap.map([1])[0], [0, 0.5, 1, 1])
    assert list(label_kwargs["features"]["class"]) == ["background", "tumor", "stroma", "normal"]
    assert colormap.map([0])[0][3] == 0
    images = by_type["image"]
    assert len(images) == 3 and not any(kwargs["visible"] for _, kwargs in images)
    assert [kwargs["name"] for _, kwargs in images][0] == "slide tumor probabilities"


def test_writer_saves_ome_zarr_labels_that_read_back(tmp_path):
    labels = np.zeros((1100, 900), np.uint16)
    labels[100:800, 200:700] = 2
    labels[900:1000, 50:100] = 7
    colormap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 2: (1, 0, 0, 1),
                                               7: (0, 0, 1, 1)})
    [written] = write_labels(str(tmp_path / "annotations"), labels,
                             {"name": "my labels", "scale": (0.5, 0.5),
                              "units": ("micrometer", "micrometer"), "colormap": colormap})
    assert written.endswith("annotations.zarr")
    group = zarr.open_group(written, mode="r")
    assert group["labels"].attrs["labels"] == ["my labels"]
    image = group["labels/my labels"]
    np.testing.assert_array_equal(image["0"][:], labels)
    np.testing.assert_array_equal(image["1"][:], labels[::2, ::2])
    assert image["0"].dtype == np.uint16
    multiscales = image.attrs["multiscales"][0]
    assert multiscales["axes"][1] == {"name": "x", "type": "space", "unit": "micrometer"}
    colours = {c["label-value"]: c["rgba"] for c in image.attrs["image-label"]["colors"]}
    assert colours == {0: [0, 0, 0, 0], 2: [255, 0, 0, 255], 7: [0, 0, 255, 255]}

    [(levels, kwargs, layer_type)] = get_reader(written)(written)
    assert layer_type == "labels" and kwargs["name"] == "my labels"
    assert kwargs["scale"] == (0.5, 0.5)
    np.testing.assert_array_equal(levels[0].compute(), labels)
    assert np.allclose(kwargs["colormap"].map([7])[0], [0, 0, 1, 1])


def test_writer_keeps_position_and_class_names_of_a_multiscale_layer(tmp_path):
    labels = np.zeros((600, 500), np.uint8)
    labels[100:400, 50:300] = 1
    labels[450:550, 300:450] = 3
    levels = [labels, labels[::2, ::2], labels[::4, ::4]]  # what napari hands a writer
    colormap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0),
                                               1: (0, 0.5, 1, 1), 3: (1, 0.6, 0, 1)})
    import pandas as pd

    meta = {"name": "slide labels", "scale": (1.0, 1.0), "translate": (0.25, 10.25),
            "units": ("micrometer", "micrometer"), "colormap": colormap, "multiscale": True,
            "features": pd.DataFrame({"class": ["background", "tumor", "stroma", "normal"]})}
    [written] = write_labels(str(tmp_path / "saved.zarr"), levels, meta)
    [(data, kwargs, kind)] = get_reader(written)(written)
    assert kind == "labels" and kwargs["name"] == "slide labels" and kwargs["multiscale"]
    np.testing.assert_array_equal(data[0].compute(), labels)
    np.testing.assert_array_equal(data[1].compute(), labels[::2, ::2])
    assert kwargs["scale"] == pytest.approx((1.0, 1.0))
    assert kwargs["translate"] == pytest.approx((0.25, 10.25))
    assert kwargs["units"] == ("micrometer", "micrometer")
    assert kwargs["features"]["class"] == ["background", "tumor", "stroma", "normal"]
    assert np.allclose(kwargs["colormap"].map([3])[0], [1, 0.6, 0, 1], atol=1 / 255)


def test_a_stopped_segmentation_shows_its_finished_rows_at_every_level(
        tmp_path, write_segmentation):
    labels = np.zeros((512, 512), np.uint8)
    labels[:200] = 2  # the rows done before the stop
    path = write_segmentation(tmp_path / "stopped.zarr", labels, complete=False)
    [*_, (levels, kwargs, kind)] = read_segmentation(str(path))
    assert kind == "labels" and kwargs["name"].endswith("(incomplete) labels")
    assert len(levels) == 2
    np.testing.assert_array_equal(np.asarray(levels[1]), labels[::2, ::2])  # not zeros


def test_sample_data_is_offline_and_real():
    [(levels, kwargs, layer_type)] = sample_slide()
    assert layer_type == "image" and kwargs["multiscale"] and len(levels) == 3
    assert kwargs["scale"] == pytest.approx((0.499, 0.499))
    layers = sample_labelled_patches()
    images = [layer for layer in layers if layer[2] == "image"]
    masks = [layer for layer in layers if layer[2] == "labels"]
    assert len(images) == len(masks) == 4
    for (image, image_kwargs, _), (mask, mask_kwargs, _) in zip(images, masks, strict=True):
        assert image.shape[:2] == mask.shape and image.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
        assert image_kwargs["translate"] == mask_kwargs["translate"]
        colormap = mask_kwargs["colormap"]
        assert np.allclose(colormap.map([1])[0][:3], np.asarray(WSSS4LUAD.colours[1]) / 255)
        assert colormap.background_value == 3
    assert any(2 in np.unique(mask) for mask, _, _ in masks)  # normal tissue is shown too


def test_manifest_declares_reader_writer_and_samples():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-histo-wsss")
    assert manifest.display_name == "Histo WSSS"
    [reader] = manifest.contributions.readers
    assert reader.accepts_directories and "*.svs" in reader.filename_patterns
    assert "*.zarr" in reader.filename_patterns
    assert [w.layer_types for w in manifest.contributions.writers] == [["labels"]]
    assert {s.key for s in manifest.contributions.sample_data} == {"cmu-slide",
                                                                   "wsss4luad-patches"}
