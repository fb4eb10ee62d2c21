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
    assert np.allclose(label_layer.get_color(2), [0.5, 1, 0, 1])  # brightened stroma
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


def test_plugin_segmentation_saved_and_reopened_is_the_same_layer(make_napari_viewer, tmp_path,
                                                                  write_segmentation):
    labels = np.zeros((300, 400), np.uint8)
    labels[50:250, 50:350] = 1
    labels[100:150, 100:150] = 3
    path = write_segmentation(tmp_path / "seg.zarr", labels)
    viewer = make_napari_viewer()
    opened = viewer.open(str(path), plugin=PLUGIN)
    [original] = [layer for layer in opened if layer._type_string == "labels"]
    assert original.multiscale and original.translate[0] != 0
    [written] = _save_one(viewer, original, tmp_path / "copy.zarr")
    viewer.layers.clear()
    [reopened] = viewer.open(written, plugin=PLUGIN)
    assert reopened.name == original.name and reopened.multiscale
    assert tuple(reopened.scale) == pytest.approx(tuple(original.scale))
    assert tuple(reopened.translate) == pytest.approx(tuple(original.translate))
    assert list(reopened.features["class"]) == ["background", "tumor", "stroma", "normal"]
    for value in (1, 2, 3):
        assert np.allclose(reopened.get_color(value), original.get_color(value), atol=1 / 255)
    np.testing.assert_array_equal(np.asarray(reopened.data[0]), labels)


def _save_one(viewer, layer, path):
    """File > Save Selected Layers with this plugin's writer, for one layer."""
    viewer.layers.selection = {layer}
    return viewer.layers.save(str(path), selected=True, plugin=PLUGIN)


def test_2d_labels_keep_their_position(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = np.zeros((80, 60), np.uint8)
    data[10:30, 5:50] = 2
    layer = viewer.add_labels(data, name="drawn", translate=(120.0, -40.0), scale=(0.5, 0.5))
    [written] = _save_one(viewer, layer, tmp_path / "drawn.zarr")
    [reopened] = viewer.open(written, plugin=PLUGIN)
    assert tuple(reopened.translate) == pytest.approx((120.0, -40.0))
    assert tuple(reopened.scale) == pytest.approx((0.5, 0.5))
    np.testing.assert_array_equal(np.asarray(reopened.data), data)


def test_legend_names_the_classes_of_a_reopened_segmentation(make_napari_viewer, qtbot,
                                                             tmp_path, write_segmentation):
    from napari_histo_wsss.widgets.legend import LegendWidget

    labels = np.zeros((200, 200), np.uint8)
    labels[:50] = 1  # 25 % tumor
    labels[50:200] = 2  # 75 % stroma
    path = write_segmentation(tmp_path / "seg.zarr", labels, level0_downsample=1.0)
    viewer = make_napari_viewer()
    legend = LegendWidget(viewer)
    viewer.window.add_dock_widget(legend)
    layers = viewer.open(str(path), plugin=PLUGIN)
    [label_layer] = [layer for layer in layers if layer._type_string == "labels"]
    viewer.layers.selection.active = label_layer
    qtbot.waitUntil(lambda: "…" not in legend.shares().values(), timeout=10_000)
    assert legend.shares() == {"tumor": "25.0 %", "stroma": "75.0 %", "normal": "0.0 %"}
    legend.set_class_visible(2, False)
    assert label_layer.get_color(2)[3] == 0 and label_layer.get_color(1)[3] == 1
    legend.set_class_visible(2, True)
    assert label_layer.get_color(2)[3] == 1
    probability = next(layer for layer in layers if layer._type_string == "image")
    viewer.layers.selection.active = probability
    assert not legend.ramp.isHidden()
    assert (legend.ramp.low.text(), legend.ramp.high.text()) == ("0", "255")
    assert np.allclose(legend.ramp.colours[-1][:3], [0, 0.5, 1])  # the tumour map's colour
    # The ramp is drawn under napari's stylesheet (a palette brush was overridden: no ramp).
    legend.ramp.bar.resize(100, legend.ramp.bar.height())
    image = legend.ramp.bar.grab().toImage()
    high = image.pixelColor(image.width() - 3, image.height() // 2)
    assert (high.red(), high.green(), high.blue()) == pytest.approx((0, 128, 255), abs=4)
