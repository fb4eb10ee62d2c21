"""The dataset layer on real patches and on synthetic folders of each public layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from napari_histo_wsss.core.data.classes import (
    BCSS_WSSS,
    LUAD_HISTOSEG,
    WSSS4LUAD,
    custom_spec,
)
from napari_histo_wsss.core.data.datasets import (
    find_dataset,
    load_eval_set,
    load_patches,
    parse_label,
    read_mask,
    read_rgb,
    write_palette_mask,
)
from napari_histo_wsss.core.errors import ConfigError, DatasetError


def _write_rgb(path, size=(24, 20), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("1031280-2300-27920-[1 0 0 1].png", [1, 0, 0, 1]),
        ("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", [1, 1, 0, 1]),
        ("436219-9328-56427-[1, 1, 0].png", [1, 1, 0]),
        ("odd[name]-[0, 0, 1].png", [0, 0, 1]),
    ],
)
def test_parse_label_formats(name, expected):
    assert parse_label(name).tolist() == expected


def test_parse_label_errors_name_the_file():
    with pytest.raises(DatasetError, match=r"nolabel\.png: no label"):
        parse_label("nolabel.png")
    with pytest.raises(DatasetError, match="has 3 entries but the dataset has 4"):
        parse_label("x-[1, 0, 1].png", num_classes=4)
    with pytest.raises(DatasetError, match="only 0s and 1s"):
        parse_label("x-[1 2 0].png")


def test_bundled_sample_is_detected_as_wsss4luad(sample_dataset_dir):
    layout = find_dataset(sample_dataset_dir)
    assert layout.spec == WSSS4LUAD
    patches = layout.patches()
    assert len(patches) == 42
    assert patches.labels.shape == (42, 3)
    # Every class has single-label sources in the sample (HisynSeg needs them).
    assert all(patches.single_label_indices(c) for c in range(3))
    eval_set = layout.eval_set("val")
    image, mask = eval_set.pair(0)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert mask.shape == image.shape[:2]
    assert set(np.unique(mask)) <= {0, 1, 2, 3}


def test_patches_are_decoded_once(sample_dataset_dir):
    patches = find_dataset(sample_dataset_dir).patches()
    first = patches.image(0)
    assert patches.image(0) is first


@pytest.mark.parametrize(
    ("layout", "spec", "label"),
    [
        ("train", LUAD_HISTOSEG, "[1 0 0 1]"),
        ("training", BCSS_WSSS, "[1101]"),
        ("train/img", BCSS_WSSS, "[0110]"),
        ("1.training", WSSS4LUAD, "[1, 0, 1]"),
    ],
)
def test_layouts_and_label_formats_are_detected(tmp_path, layout, spec, label):
    for index in range(3):
        _write_rgb(tmp_path / layout / f"patch-{index}-{label}.png")
    _write_rgb(tmp_path / "val" / "img" / "a.png")
    write_palette_mask(tmp_path / "val" / "mask" / "a.png", np.zeros((20, 24), np.uint8), spec)
    found = find_dataset(tmp_path)
    assert found.spec == spec
    assert found.train_dir == tmp_path / layout
    assert len(found.patches()) == 3
    assert found.val is not None and found.test is None


def test_custom_classes(tmp_path):
    for index in range(2):
        _write_rgb(tmp_path / "train" / f"p{index}-[1 0].png")
    spec = custom_spec("tumour,stroma", background=2)
    assert find_dataset(tmp_path, spec).spec.background_index == 2
    with pytest.raises(ConfigError, match="--background 5 does not fit 2 classes"):
        custom_spec("tumour,stroma", background=5)
    with pytest.raises(DatasetError, match="match no built-in dataset"):
        find_dataset(tmp_path)


def test_empty_and_unlabelled_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="no training patches found"):
        find_dataset(tmp_path)
    with pytest.raises(DatasetError, match="no training images"):
        load_patches(tmp_path / "train", WSSS4LUAD)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        find_dataset(tmp_path / "missing")


def test_label_count_mismatch_names_the_file(tmp_path):
    _write_rgb(tmp_path / "good-[1, 0, 0].png")
    _write_rgb(tmp_path / "bad-[1, 0].png")
    with pytest.raises(DatasetError, match=r"bad-\[1, 0\]\.png: label .* has 2 entries"):
        load_patches(tmp_path, WSSS4LUAD)


def test_grayscale_and_rgba_are_converted(tmp_path):
    Image.fromarray(np.full((5, 6), 90, np.uint8), "L").save(tmp_path / "g.png")
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :3, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    gray = read_rgb(tmp_path / "g.png")
    assert gray.shape == (5, 6, 3) and (gray == 90).all()
    composite = read_rgb(tmp_path / "a.png")
    assert composite[0, 0].tolist() == [200, 0, 0]
    assert composite[0, 5].tolist() == [255, 255, 255]


def test_unreadable_image_names_the_file(tmp_path):
    broken = tmp_path / "broken-[1, 0, 0].png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"broken-\[1, 0, 0\]\.png: cannot read image"):
        read_rgb(broken)


def test_masks_palette_rgb_and_bad_values(tmp_path):
    mask = np.array([[0, 1], [2, 3]], np.uint8)
    write_palette_mask(tmp_path / "p.png", mask, WSSS4LUAD)
    assert (read_mask(tmp_path / "p.png", WSSS4LUAD) == mask).all()
    rgb = np.array(WSSS4LUAD.colours, np.uint8)[mask]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert (read_mask(tmp_path / "rgb.png", WSSS4LUAD) == mask).all()
    Image.fromarray(np.array([[0, 7]], np.uint8), "L").save(tmp_path / "bad.png")
    with pytest.raises(DatasetError, match=r"bad\.png: mask values \[7\] are outside"):
        read_mask(tmp_path / "bad.png", WSSS4LUAD)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb_bad.png")
    with pytest.raises(DatasetError, match=r"colour \(1, 2, 3\)"):
        read_mask(tmp_path / "rgb_bad.png", WSSS4LUAD)


def test_mask_size_mismatch_and_missing_mask(tmp_path, sample_dataset_dir):
    images = tmp_path / "img"
    masks = tmp_path / "mask"
    shutil.copytree(sample_dataset_dir / "val" / "img", images)
    masks.mkdir()
    first = sorted(images.iterdir())[0]
    write_palette_mask(masks / first.name, np.zeros((3, 3), np.uint8), WSSS4LUAD)
    with pytest.raises(DatasetError, match="no mask named like"):
        load_eval_set(images, masks, WSSS4LUAD)
    for image in sorted(images.iterdir())[1:]:
        image.unlink()
    eval_set = load_eval_set(images, masks, WSSS4LUAD)
    with pytest.raises(DatasetError, match="mask is 3x3 but its image"):
        eval_set.pair(0)
