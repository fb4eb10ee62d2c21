"""The evaluation protocol against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_histo_wsss.core.inference.metrics import (
    ConfusionMatrix,
    format_scores,
    per_image_spread,
)


def test_hand_computed_two_images():
    # Classes 0..2, background 3. Image 1: 4 pixels, image 2: 4 pixels (one is background).
    truth_1 = np.array([[0, 0], [1, 2]])
    pred_1 = np.array([[0, 1], [1, 2]])
    truth_2 = np.array([[1, 1], [3, 2]])
    pred_2 = np.array([[1, 0], [0, 2]])  # the prediction on the background pixel is ignored
    cm = ConfusionMatrix(3)
    cm.update(pred_1, truth_1)
    cm.update(pred_2, truth_2)
    # Matrix over 7 counted pixels: class 0: TP1 FN1 FP1; class 1: TP2 FN1 FP1; class 2: TP2.
    assert cm.matrix.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 2]]
    scores = cm.scores(["a", "b", "c"])
    iou = [1 / 3, 2 / 4, 2 / 2]
    assert scores["miou"] == pytest.approx(np.mean(iou))
    assert scores["fwiou"] == pytest.approx(2 / 7 * iou[0] + 3 / 7 * iou[1] + 2 / 7 * iou[2])
    dice = [2 * 1 / (2 + 2), 2 * 2 / (3 + 3), 2 * 2 / (2 + 2)]
    assert scores["dice"] == pytest.approx(np.mean(dice))
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)
    assert scores["per_class"]["b"]["pixels"] == 3
    assert scores["pixels"] == 7


def test_set_level_matrix_is_not_a_mean_of_images():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1]))  # image IoUs: 3/4 and 0
    cm.update(np.array([1]), np.array([1]))  # image IoUs: nan and 1
    scores = cm.scores()
    assert scores["per_class"]["0"]["iou"] == pytest.approx(3 / 4)
    assert scores["per_class"]["1"]["iou"] == pytest.approx(1 / 2)


def test_background_prediction_on_tissue_is_a_miss():
    cm = ConfusionMatrix(2)
    cm.update(np.array([2, 0, 1]), np.array([0, 0, 1]))
    scores = cm.scores()
    assert cm.missed.tolist() == [1, 0]
    assert scores["per_class"]["0"]["iou"] == pytest.approx(1 / 2)
    assert scores["pixel_accuracy"] == pytest.approx(2 / 3)


def test_absent_class_is_left_out_of_the_mean():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1]), np.array([0, 1]))
    scores = cm.scores()
    assert scores["per_class"]["2"]["iou"] is None
    assert scores["miou"] == 1.0
    assert math.isnan(ConfusionMatrix(2).scores()["miou"])


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        ConfusionMatrix(2).update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_per_image_spread_leaves_out_undefined_images_and_keeps_their_place():
    spread = per_image_spread([0.5, float("nan"), 0.9, 0.1, 0.7])
    assert spread["mean"] == pytest.approx(0.55)
    assert spread["median"] == pytest.approx(0.6)
    assert spread["min"] == pytest.approx(0.1)
    assert spread["p10"] == pytest.approx(np.percentile([0.5, 0.9, 0.1, 0.7], 10))
    assert spread["miou"] == [0.5, None, 0.9, 0.1, 0.7]  # valid JSON, in image order
    assert spread["worst"] is None  # no names given
    assert per_image_spread([float("nan")])["mean"] is None
    named = per_image_spread([0.5, float("nan"), 0.1], ["a.png", "b.png", "c.png"])
    assert named["worst"] == "c.png" and named["names"] == ["a.png", "b.png", "c.png"]
    assert "worst 10.00 (c.png)" in format_scores(
        {"miou": 0.3, "fwiou": 0.3, "dice": 0.3, "pixel_accuracy": 0.3, "per_class": {},
         "per_image": named})
