"""Class offsets fitted on val: the fit, what is saved, and how predictors apply it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.errors import CheckpointError
from napari_histo_wsss.core.inference import calibration
from napari_histo_wsss.core.inference.calibration import (
    describe_offsets,
    fit_class_offsets,
    make_val_choices,
    select_class_offsets,
)
from napari_histo_wsss.core.inference.predict import CLASS_OFFSETS_FILE, load_predictor
from napari_histo_wsss.core.models.segmenter import build_segmenter, checkpoint_config
from napari_histo_wsss.core.runs.checkpoints import save_checkpoint
from napari_histo_wsss.core.runs.run_dir import RunDirectory


def untrained_run(root, **segmenter) -> RunDirectory:
    """A run directory holding one small segmenter with random weights ("ce")."""
    torch.manual_seed(0)
    settings = SegmenterConfig(arch="pspnet", encoder_depth=3, weights="none", **segmenter)
    config = RunConfig(dataset=WSSS4LUAD.to_dict(), segmenter=settings)
    run = RunDirectory(root)
    model = build_segmenter(settings, WSSS4LUAD.num_classes)
    save_checkpoint(run.segmenter_checkpoint("ce"), kind="segmenter",
                    state_dict=model.state_dict(), spec=WSSS4LUAD,
                    config=checkpoint_config(config, "ce", 64, "divide255", (0.0,) * 3,
                                             (255.0,) * 3))
    run.create(config)
    return run


def biased_log_probabilities(rng, pixels: int = 3000, bias: float = 1.0):
    """Three classes; the model's log-probabilities favour class 0 by ``bias`` over the
    truth, so a third of class 1 is called 0, as the recipe does with stroma."""
    truth = rng.integers(0, 3, pixels)
    scores = rng.normal(0, 1, (pixels, 3))
    scores[np.arange(pixels), truth] += 2.0
    scores[:, 0] += bias
    log_probabilities = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    return log_probabilities, truth


def test_fit_recovers_a_class_bias_and_leaves_unfitted_classes_alone():
    rng = np.random.default_rng(0)
    log_probabilities, truth = biased_log_probabilities(rng)
    before = calibration._miou(log_probabilities, truth, np.zeros(3))
    offsets = fit_class_offsets(log_probabilities, truth, fitted=[0, 1, 2])
    assert calibration._miou(log_probabilities, truth, offsets) > before + 0.05
    relative = offsets - offsets[1]
    assert -1.5 <= relative[0] <= -0.5  # class 0 pulled back by about the bias
    held = fit_class_offsets(log_probabilities, truth, fitted=[0, 1])
    assert held[2] == 0.0 and held[0] < 0  # class 2 stays, class 0 pulled back ...
    assert held[0] + held[1] == pytest.approx(0)  # ... against 1 alone: 2 keeps its balance
    assert calibration._miou(log_probabilities, truth, held) > before + 0.02
    unbiased, truth2 = biased_log_probabilities(rng, bias=0.0)
    none = fit_class_offsets(unbiased, truth2, fitted=[0, 1, 2])
    assert calibration._miou(unbiased, truth2, none) - \
        calibration._miou(unbiased, truth2, np.zeros(3)) < 0.01  # nothing to correct


def test_offsets_are_saved_applied_and_checked(tmp_path, sample_dataset_dir, monkeypatch):
    run = untrained_run(tmp_path / "run")
    val = find_dataset(sample_dataset_dir).eval_set("val")
    monkeypatch.setattr(calibration, "MIN_CLASS_IMAGES", 1)  # 7 bundled val images
    record = select_class_offsets(run, "ce", val, "cpu")
    saved = json.loads((run.segmenter_dir("ce") / CLASS_OFFSETS_FILE).read_text())
    assert saved == json.loads(json.dumps(record))
    assert record["miou_with"] >= record["miou_without"]
    assert record["use"] == (record["miou_with"] >= record["miou_without"] +
                             calibration.MIN_GAIN)
    assert describe_offsets(record).startswith("class offsets ")

    # A kept record shifts the probabilities by exp(offset), renormalised.
    offsets = [0.5, -0.25, 0.0]
    (run.segmenter_dir("ce") / CLASS_OFFSETS_FILE).write_text(json.dumps(
        {**record, "use": True, "offsets": offsets}))
    image = val.pair(0)[0][:64, :64][None]
    plain = load_predictor(run.root, "cpu", "ce", use_class_offsets=False).predict_batch(image)
    shifted = load_predictor(run.root, "cpu", "ce").predict_batch(image)
    expected = plain * np.exp(offsets)[None, :, None, None]
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(shifted, expected, rtol=1e-4, atol=1e-6)
    assert load_predictor(run.root, "cpu", "ce").config["class_offsets"] == offsets

    (run.segmenter_dir("ce") / CLASS_OFFSETS_FILE).write_text(json.dumps(
        {**record, "use": True, "offsets": [1.0, 2.0]}))
    with pytest.raises(CheckpointError, match="class offsets for 2 classes"):
        load_predictor(run.root, "cpu", "ce")
    (run.segmenter_dir("ce") / CLASS_OFFSETS_FILE).write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable class offsets"):
        load_predictor(run.root, "cpu", "ce")


def test_val_choices_fit_offsets_only_where_the_recipe_asks(tmp_path, sample_dataset_dir,
                                                            monkeypatch):
    val = find_dataset(sample_dataset_dir).eval_set("val")
    plain = untrained_run(tmp_path / "plain")
    scores, lines = make_val_choices(plain, "ce", val, "cpu")
    assert lines == [] and 0 <= scores["miou"] <= 1
    assert not (plain.segmenter_dir("ce") / CLASS_OFFSETS_FILE).exists()

    asked = untrained_run(tmp_path / "asked", fit_class_offsets=True)
    _, lines = make_val_choices(asked, "ce", val, "cpu")  # 7 images: too few to fit
    assert lines == [f"class offsets not fitted: no class is in "
                     f"{calibration.MIN_CLASS_IMAGES} or more of the 7 val images"]
    monkeypatch.setattr(calibration, "MIN_CLASS_IMAGES", 1)
    scores, lines = make_val_choices(asked, "ce", val, "cpu")
    record = json.loads((asked.segmenter_dir("ce") / CLASS_OFFSETS_FILE).read_text())
    assert lines == [describe_offsets(record)]
    if record["use"]:  # the scores are those of the predictor with the offsets
        assert scores["miou"] == pytest.approx(record["miou_with"], abs=1e-6)
        assert scores["miou_without_offsets"] == pytest.approx(record["miou_without"])


def test_cli_evaluate_applies_the_offsets_and_can_leave_them_out(tmp_path, sample_dataset_dir,
                                                                 capsys):
    run = untrained_run(tmp_path / "run")
    (run.segmenter_dir("ce") / CLASS_OFFSETS_FILE).write_text(json.dumps(
        {"use": True, "offsets": [3.0, 0.0, 0.0], "classes": ["tumor", "stroma", "normal"]}))
    val = find_dataset(sample_dataset_dir).eval_set("val")
    images, masks = str(val.image_paths[0].parent), str(val.mask_paths[0].parent)
    assert main(["evaluate", str(run.root), images, masks, "--json", "--device", "cpu"]) == 0
    shifted = capsys.readouterr()
    assert "class offsets fitted on val applied (tumor +3.00)" in shifted.err
    assert main(["evaluate", str(run.root), images, masks, "--json", "--device", "cpu",
                 "--no-class-offsets"]) == 0
    plain = capsys.readouterr()
    assert "class offsets" not in plain.err
    assert json.loads(shifted.out)["miou"] != json.loads(plain.out)["miou"]


def test_the_offsets_line_counts_its_images_in_words():
    record = {"images": 0, "corrected_images": 1, "fitted_classes": [], "classes": ["a", "b"]}
    assert describe_offsets(record).endswith("of the 1 corrected image")
    record = {**record, "images": 1, "corrected_images": 2}
    assert describe_offsets(record).endswith("of the 1 val image and 2 corrected images")
