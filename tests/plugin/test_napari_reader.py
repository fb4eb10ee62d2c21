"""The reader, writer and sample data inside a real napari viewer (needs a display: Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui
PLUGIN = "napari-histo-wsss"


def test_sample_slide_opens_as_a_multiscale_layer_in_microns(make_napari_viewer,
                                                             sample_slide_path):
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(sample_slide_path), plugin=PLUGIN)
    assert layer.multiscale and layer.rgb and len(layer.data) == 3
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert layer.metadata["mpp"] == pytest.approx(0.499)
    assert str(layer.units[0]) == "micrometer"
    viewer.reset_view()
    assert layer.data_level >= 1  # the whole slide in view: a coarse level, never level 0


def test_corrupt_slide_adds_nothing_and_notifies_once(make_napari_viewer, tmp_path):
    from napari.utils.notifications import notification_manager

    messages = []
    notification_manager.notification_ready.connect(messages.append)
    try:
        viewer = make_napari_viewer()
        path = tmp_path / "case-3.svs"
        path.write_bytes(b"\x00" * 64)
        assert viewer.open(str(path), plugin=PLUGIN) == []
    finally:
        notification_manager.notification_ready.disconnect(messages.append)
    assert len(viewer.layers) == 0
    assert [m.message for m in messages] == [
        f"Cannot open case-3.svs: not a readable slide (not a TIFF file: header={bytes(4)!r})"]


def test_segmentation_overlays_the_slide(make_napari_viewer, tmp_path, write_segmentation):
    labels = np.zeros((300, 400), np.uint8)
    labels[50:250, 50:350] = 2
    path = write_segmentation(tmp_path / "seg.zarr", labels)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin=PLUGIN)
    [label_layer] = [layer for layer in layers if layer._type_string == "labels"]
    assert label_layer.multiscale and tuple(label_layer.scale) == pytest.approx((1.0, 1.0))
    assert np.allclose(label_layer.get_color(2), [64 / 255, 128 / 255, 0, 1])
    assert sum(layer._type_string == "image" for layer in layers) == 3


def test_both_samples_load_from_the_menu_entries(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "cmu-slide")
    viewer.open_sample(PLUGIN, "wsss4luad-patches")
    assert [layer._type_string for layer in viewer.layers].count("labels") == 4
    assert viewer.layers[0].multiscale


def test_writer_is_offered_for_labels(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.eye(64, dtype=np.uint8) * 3, name="drawn")
    [written] = viewer.layers.save(str(tmp_path / "drawn.zarr"), selected=False, plugin=PLUGIN)
    reopened = viewer.open(written, plugin=PLUGIN)
    assert not reopened[0].multiscale  # one 64 x 64 level
    np.testing.assert_array_equal(np.asarray(reopened[0].data), layer.data)
