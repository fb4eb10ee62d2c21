"""HisynSeg synthesis: masks match images pixel for pixel, seeds reproduce, blobs have shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import minimum_filter

from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import PatchSet
from napari_histo_wsss.core.errors import DatasetError
from napari_histo_wsss.core.hisynseg.synthesis import (
    BlobShape,
    Synthesizer,
    SyntheticPool,
    bezier_blob,
    blob_outline,
    mask_labels,
    random_blob_points,
)

#: One flat colour per class (all darker than the white threshold), then white background.
CLASS_COLOURS = np.array([(200, 40, 40), (40, 160, 40), (40, 40, 200), (255, 255, 255)],
                         dtype=np.uint8)


def colour_coded_patches(labels: list[list[int]], sizes: list[tuple[int, int]]) -> PatchSet:
    """Patches painted in their class colour (multi-label ones in grey); the first has a white
    40x40 hole, which the synthesiser must label background (WSSS4LUAD asks for it)."""
    images = {}
    for index, (label, (height, width)) in enumerate(zip(labels, sizes, strict=True)):
        colour = CLASS_COLOURS[label.index(1)] if sum(label) == 1 else (90, 90, 90)
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[:] = colour
        images[index] = image
    images[0][20:60, 30:70] = 255
    paths = [Path(f"patch{i}-[{', '.join(map(str, lab))}].png") for i, lab in enumerate(labels)]
    return PatchSet(paths, np.array(labels, dtype=np.uint8), WSSS4LUAD, images)


@pytest.fixture
def patches() -> PatchSet:
    labels = [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 1, 0]]
    # Native size, larger and non-square (resized / cropped), smaller (mirror-padded).
    sizes = [(96, 96), (120, 100), (96, 96), (60, 60), (96, 96), (96, 96)]
    return colour_coded_patches(labels, sizes)


def assert_mask_matches_image(image: np.ndarray, mask: np.ndarray) -> None:
    """Away from class borders (where bilinear warps blend neighbours) every pixel has exactly
    its mask class's colour; borders are a thin minority. A border may lie just outside the
    image, so the outermost pixels count as near one."""
    interior = np.ones(mask.shape, dtype=bool)
    for value in np.unique(mask):
        region = mask == value
        interior &= ~region | minimum_filter(region, size=5, mode="constant", cval=False)
    assert interior.mean() > 0.5
    np.testing.assert_array_equal(image[interior], CLASS_COLOURS[mask[interior]])


@pytest.mark.parametrize("kind", ["mosaic", "bezier"])
def test_masks_match_images_pixel_for_pixel(patches, kind):
    synthesizer = Synthesizer(patches, size=96)
    rng = np.random.default_rng(0)
    saw_background = False
    for _ in range(12):
        image, mask = synthesizer(kind, rng)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 1, 2, 3}
        assert_mask_matches_image(image, mask)
        saw_background |= bool((mask == WSSS4LUAD.background_index).any())
    assert saw_background, "the white hole of a tumour source never became background"


def test_bezier_mixes_two_classes_without_interpolation(patches):
    synthesizer = Synthesizer(patches, size=96)
    image, mask = synthesizer.bezier(np.random.default_rng(3))
    # Native-size sources are pasted, not resampled: every pixel matches exactly.
    if not (mask == 0).any():  # the only resized source is a tumour patch
        np.testing.assert_array_equal(image, CLASS_COLOURS[mask])
    assert mask_labels(mask, 3).sum() == 2


def test_same_seed_same_images_other_seed_other_images(patches):
    def draw(seed):
        rng = np.random.default_rng(seed)
        synthesizer = Synthesizer(patches, size=96)
        return [synthesizer(kind, rng) for kind in ("mosaic", "bezier", "mosaic")]

    first, again, other = draw(7), draw(7), draw(8)
    for (a_image, a_mask), (b_image, b_mask) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a_image, b_image)
        np.testing.assert_array_equal(a_mask, b_mask)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))


def max_turn_degrees(outline: np.ndarray) -> float:
    """The sharpest change of direction between consecutive outline samples."""
    steps = np.diff(outline, axis=0)
    steps = steps[np.linalg.norm(steps, axis=1) > 1e-9]  # segment joints repeat a point
    angles = np.arctan2(steps[:, 1], steps[:, 0])
    return float(np.degrees(np.abs(np.angle(np.exp(1j * np.diff(angles)))).max()))


def test_blob_parameters_change_smoothness():
    points = random_blob_points(5, np.random.default_rng(1))
    polygon_like = max_turn_degrees(blob_outline(points, BlobShape(rad=0.0)))
    smooth = max_turn_degrees(blob_outline(points, BlobShape(rad=0.2, edgy=0.05)))
    edgy = max_turn_degrees(blob_outline(points, BlobShape(rad=0.2, edgy=10.0)))
    assert polygon_like > 45  # rad 0: straight edges meeting at corners
    assert smooth < 10  # the paper's setting: a smooth (C1) outline
    assert edgy > 2 * smooth


def test_blob_points_keep_their_spacing_and_blob_is_partial():
    rng = np.random.default_rng(2)
    for count in (5, 12):
        points = random_blob_points(count, rng)
        gaps = np.linalg.norm(np.diff(points, axis=0, append=points[:1]), axis=1)
        assert gaps.min() >= 0.7 / count
    blob = bezier_blob(64, np.random.default_rng(4))
    assert blob.shape == (64, 64) and 0.05 < blob.mean() < 0.95


def test_class_without_single_label_patch_is_named():
    labels = [[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1]]  # "normal" only mixed with others
    patches = colour_coded_patches(labels, [(96, 96)] * 4)
    synthesizer = Synthesizer(patches, size=96)
    assert synthesizer.missing_classes == ("normal",)
    assert "normal" in synthesizer.missing_classes_message()
    rng = np.random.default_rng(0)
    for kind in ("mosaic", "bezier"):
        _, mask = synthesizer(kind, rng)
        assert not (mask == 2).any()


def test_no_single_label_patch_at_all_is_a_clear_error():
    patches = colour_coded_patches([[1, 1, 0], [0, 1, 1]], [(96, 96)] * 2)
    with pytest.raises(DatasetError, match="single-label"):
        Synthesizer(patches, size=96)


def test_pool_round_trips_through_npz(tmp_path, patches):
    synthesizer = Synthesizer(patches, size=32)
    rng = np.random.default_rng(0)
    pairs = [synthesizer("bezier", rng) for _ in range(3)]
    pool = SyntheticPool(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]),
                         np.array([0.9, 0.7, 0.6], dtype=np.float32))
    loaded = SyntheticPool.load(pool.save(tmp_path / "bezier.npz"))
    np.testing.assert_array_equal(loaded.images, pool.images)
    np.testing.assert_array_equal(loaded.masks, pool.masks)
    np.testing.assert_array_equal(loaded.p_real, pool.p_real)
