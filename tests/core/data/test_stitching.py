"""Stitching the bundled WSSS4LUAD crops back into their source images by their names."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from napari_histo_wsss.core.data.datasets import find_dataset, load_patches
from napari_histo_wsss.core.data.stitching import stitch_patches, windows_around_patches

IGNORE = 255


@pytest.fixture(scope="module")
def patches(sample_dataset_dir):
    return find_dataset(sample_dataset_dir).patches()


def _copy_source(patches, source: str, folder, rename=None):
    """The patches of one source image copied to ``folder`` (optionally renamed)."""
    folder.mkdir()
    for path in patches.paths:
        if path.name.startswith(f"{source}-"):
            shutil.copy(path, folder / (rename(path.name) if rename else path.name))
    return load_patches(folder, patches.spec)


def test_overlapping_patches_stitch_into_one_canvas_that_holds_each_patch(patches):
    stitched = stitch_patches(patches)
    assert stitched, "the sample has overlapping crops (test01, test24, ...)"
    seen = [p.index for image in stitched for p in image.placements]
    assert len(seen) == len(set(seen))
    for image in stitched:
        assert len(image.placements) >= 2
        assert len({patches.paths[p.index].name.split("-")[0] for p in image.placements}) == 1
        union = np.zeros_like(image.covered)
        for placement in image.placements:
            assert np.array_equal(image.pixels[placement.box], patches.image(placement.index))
            union[placement.box] = True
        assert np.array_equal(union, image.covered)
    # A patch overlapping none of its source's other patches is left alone.
    lone = [i for i, path in enumerate(patches.paths) if path.name.startswith("449636-")]
    assert lone and lone[0] not in seen


def test_offsets_written_x_before_y_are_found_by_the_pixels(patches, tmp_path):
    usual = stitch_patches(_copy_source(patches, "test01", tmp_path / "yx"))

    def swapped(name: str) -> str:
        source, first, second, rest = name.split("-", 3)
        return f"{source}-{second}-{first}-{rest}"

    turned = stitch_patches(_copy_source(patches, "test01", tmp_path / "xy", swapped))
    assert len(usual) == len(turned) == 1
    assert np.array_equal(usual[0].pixels, turned[0].pixels)


def test_patches_whose_overlaps_disagree_are_not_stitched(patches, tmp_path):
    from PIL import Image

    copied = _copy_source(patches, "test01", tmp_path / "changed")
    first = copied.paths[0]
    pixels = np.asarray(Image.open(first).convert("RGB")).copy()
    pixels[..., 0] = 255 - pixels[..., 0]
    Image.fromarray(pixels).save(first)
    stitched = stitch_patches(load_patches(tmp_path / "changed", patches.spec))
    assert all(0 not in [p.index for p in image.placements] for image in stitched)


def test_windows_take_the_neighbours_pixels_and_masks(patches):
    stitched = stitch_patches(patches)
    masks = [np.full(patches.image(i).shape[:2], i % 3, np.uint8) for i in range(len(patches))]
    windows, (window_masks,) = windows_around_patches(patches, [masks], margin=40, fill=IGNORE)
    assert len(windows) == len(patches) and windows.paths == patches.paths
    grown = 0
    for image in stitched:
        canvas = image.paste([masks[p.index] for p in image.placements], IGNORE)
        for placement in image.placements:
            rows, columns = image.window(placement, 40)
            window = windows.image(placement.index)
            assert np.array_equal(window, image.pixels[rows, columns])
            assert np.array_equal(window_masks[placement.index], canvas[rows, columns])
            assert IGNORE not in window_masks[placement.index]
            assert window.shape[0] >= placement.height and window.shape[1] >= placement.width
            grown += window.shape[:2] != (placement.height, placement.width)
            assert (windows.labels[placement.index] >= patches.labels[placement.index]).all()
    assert grown > 0
    alone = set(range(len(patches))) - {p.index for s in stitched for p in s.placements}
    for index in alone:
        assert windows.image(index) is patches.image(index)
        assert (windows.labels[index] == patches.labels[index]).all()
