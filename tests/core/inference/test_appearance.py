"""The per-image appearance refinement, on the bundled real val images and their masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.inference.appearance import (
    appearance_features,
    fit_logistic,
    refine_by_appearance,
)
from napari_histo_wsss.core.inference.metrics import ConfusionMatrix

CLASSES = WSSS4LUAD.num_classes


@pytest.fixture(scope="module")
def val(sample_dataset_dir):
    return find_dataset(sample_dataset_dir, WSSS4LUAD).eval_set("val")


def pair(val, name: str):
    index = [path.name for path in val.image_paths].index(name)
    return val.pair(index)


def coarse_prediction(truth: np.ndarray, blur: float = 12.0, sharpness: float = 10.0):
    """What a segmenter trained on CAM pseudo-masks gives: the true regions as confident
    blobs whose boundaries miss the thin structures (blurred one-hot, sharpened softmax)."""
    one_hot = np.stack([(truth == c).astype(np.float32) for c in range(CLASSES)])
    scores = np.stack([ndi.gaussian_filter(plane, blur) for plane in one_hot]) * sharpness
    probabilities = np.exp(scores - scores.max(axis=0))
    return probabilities / probabilities.sum(axis=0, keepdims=True)


def miou(probabilities: np.ndarray, truth: np.ndarray) -> float:
    matrix = ConfusionMatrix(CLASSES)
    matrix.update(probabilities.argmax(axis=0).astype(np.uint8), truth)
    return matrix.scores()["miou"]


@pytest.mark.parametrize("name", ["00.png", "21.png"])
def test_refinement_moves_coarse_boundaries_towards_the_true_ones(val, name):
    image, truth = pair(val, name)
    coarse = coarse_prediction(truth)
    refined = refine_by_appearance(coarse, image, 0.5, WSSS4LUAD.white_threshold)
    assert refined.shape == coarse.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-5)
    assert miou(refined, truth) > miou(coarse, truth) + 0.01


def test_one_class_images_and_weight_zero_are_left_as_they_are(val):
    image, truth = pair(val, "02.png")  # normal tissue only
    coarse = coarse_prediction(truth)
    assert refine_by_appearance(coarse, image, 0.5) is coarse
    image, truth = pair(val, "00.png")
    coarse = coarse_prediction(truth)
    assert refine_by_appearance(coarse, image, 0.0) is coarse


def test_a_class_the_model_does_not_know_never_wins_a_pixel_it_did_not_have(val):
    image, truth = pair(val, "00.png")  # tumour and stroma
    coarse = coarse_prediction(truth)
    # "normal" nearly tied everywhere and first where tumour and stroma are close: no
    # confident pixel teaches the appearance model what it looks like.
    coarse[2] = coarse.max(axis=0) * np.where(np.abs(coarse[0] - coarse[1]) < 0.2, 1.01, 0.9)
    coarse /= coarse.sum(axis=0, keepdims=True)
    refined = refine_by_appearance(coarse, image, 2.0)
    before, after = coarse.argmax(axis=0), refined.argmax(axis=0)
    assert (before == 2).any()
    assert not ((after == 2) & (before != 2)).any()


def test_features_are_standardised_per_image(val):
    image, _ = pair(val, "03.png")
    features = appearance_features(image)
    assert features.shape[0] == image.shape[0] * image.shape[1]
    np.testing.assert_allclose(features.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(features.std(axis=0), 1, atol=1e-3)


def test_the_regression_weighs_each_class_equally():
    """A rare class separable on one feature still gets its own side of the boundary."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(1000, 2)).astype(np.float32)
    labels = (features[:, 0] > 1.8).astype(np.int64)  # about 4 % of the samples
    weights = fit_logistic(features, labels, 2)
    predicted = (np.concatenate([features, np.ones((1000, 1))], 1) @ weights).argmax(axis=1)
    rare = labels == 1
    assert rare.sum() > 10 and predicted[rare].mean() > 0.9 and predicted[~rare].mean() < 0.1


def mislabelled_region(truth: np.ndarray, true_class: int, wrong_class: int):
    """The largest connected region of ``true_class``, and a coarse prediction that calls
    it ``wrong_class`` (what a user would paint over)."""
    components, count = ndi.label(truth == true_class)
    sizes = ndi.sum(np.ones_like(truth), components, range(1, count + 1))
    region = components == 1 + int(np.argmax(sizes))
    wrong = truth.copy()
    wrong[region] = wrong_class
    return region, coarse_prediction(wrong)


def stroke_inside(region: np.ndarray, value: int, radius: int = 4) -> np.ndarray:
    """A short horizontal brush path through the region's most interior pixel."""
    painted = np.zeros(region.shape, np.uint8)
    y, x = np.unravel_index(np.argmax(ndi.distance_transform_edt(region)), region.shape)
    painted[max(y - radius, 0):y + radius, max(x - 20, 0):x + 20] = value
    painted[~region] = 0
    return painted


def test_a_stroke_teaches_its_image_beyond_the_painted_pixels(val):
    image, truth = pair(val, "00.png")  # tumour and stroma
    region, coarse = mislabelled_region(truth, 1, 0)  # a stroma region called tumour
    painted = stroke_inside(region, value=2)  # painted "stroma" (class 1, stored as 2)
    without = refine_by_appearance(coarse, image, 1.0, WSSS4LUAD.white_threshold)
    refined = refine_by_appearance(coarse, image, 1.0, WSSS4LUAD.white_threshold, painted)
    unpainted = truth.copy()
    unpainted[painted > 0] = 255  # scored where nobody painted
    assert (refined.argmax(axis=0)[painted > 0] == 1).all()
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-5)
    assert miou(refined, unpainted) > miou(without, unpainted) + 0.02
    right_in_region = (refined.argmax(axis=0) == 1)[region & (painted == 0)].mean()
    assert right_in_region > (without.argmax(axis=0) == 1)[region].mean() + 0.1


def test_strokes_without_appearance_weight_set_only_the_painted_pixels(val):
    image, truth = pair(val, "02.png")  # normal tissue only: nothing to model on its own
    coarse = coarse_prediction(truth)
    painted = np.zeros(truth.shape, np.uint8)
    painted[10:20, 10:30] = 1  # tumour
    painted[30:40, 10:30] = CLASSES + 1  # glass: no class plane to set
    for weight in (0.0, 0.5):
        refined = refine_by_appearance(coarse, image, weight, painted=painted)
        changed = refined.argmax(axis=0) != coarse.argmax(axis=0)
        assert (refined.argmax(axis=0)[painted == 1] == 0).all()
        if weight == 0:
            assert not changed[painted != 1].any()
    with pytest.raises(ValueError, match="strokes of shape"):
        refine_by_appearance(coarse, image, 0.5, painted=painted[:-1])


def test_a_stroke_reaches_as_far_as_it_is_long():
    """One predicted region (tumour everywhere), three stroma strokes: a 61-px line reaches
    about 61 px, a dab the least reach, a line across the image no more than the limit."""
    from napari_histo_wsss.core.inference.appearance import STROKE_REACH_LIMITS, _overruled

    best = np.zeros((400, 600), np.int64)
    strokes = np.full(best.shape, -1)
    strokes[100, 100:161] = 1  # a line 61 px long
    strokes[350, 100:103] = 1  # a dab
    strokes[0, 0:600] = 1  # a line across the image
    overruled = _overruled(best, strokes.reshape(-1), reach=1.0).reshape(best.shape)
    low, high = STROKE_REACH_LIMITS
    assert overruled[100 + 55, 130] and not overruled[100 + 70, 130]  # the line's own reach
    assert overruled[350 + int(low) - 2, 101] and not overruled[350 + int(low) + 4, 101]
    assert overruled[int(high) - 2, 400] and not overruled[int(high) + 2, 400]
    agreeing = np.where(strokes >= 0, 0, -1)  # strokes of the predicted class overrule nothing
    assert not _overruled(best, agreeing.reshape(-1), reach=1.0).any()
