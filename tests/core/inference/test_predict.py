"""Prediction: TTA, tiling, the class gate, evaluation, loading from runs, and the CLI."""

from __future__ import annotations

import argparse
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_histo_wsss.cli.stage2 import add_stage2_parsers
from napari_histo_wsss.core.config.run_config import ClassifierConfig, RunConfig, SegmenterConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import find_dataset, load_eval_set, read_mask
from napari_histo_wsss.core.errors import CheckpointError, ConfigError
from napari_histo_wsss.core.inference.appearance import STROKE_WEIGHT, refine_by_appearance
from napari_histo_wsss.core.inference.metrics import ConfusionMatrix
from napari_histo_wsss.core.inference.predict import (
    ClassGate,
    SegmentationPredictor,
    describe_gate_choice,
    evaluate,
    evaluate_mask_folder,
    load_predictor,
    predict_image,
    select_class_gate,
)
from napari_histo_wsss.core.models.classifier import build_classifier
from napari_histo_wsss.core.models.segmenter import (
    SegmenterOutput,
    build_segmenter,
    checkpoint_config,
)
from napari_histo_wsss.core.runs.checkpoints import save_checkpoint
from napari_histo_wsss.core.runs.run_dir import RunDirectory

DIVIDE255 = {"mean": (0.0, 0.0, 0.0), "std": (255.0, 255.0, 255.0)}


def small_segmenter(seed: int = 0):
    torch.manual_seed(seed)
    config = SegmenterConfig(arch="pspnet", encoder_depth=3, weights="none")
    return build_segmenter(config, WSSS4LUAD.num_classes), config


def predictor_of(model, tta="none", gate=None) -> SegmentationPredictor:
    return SegmentationPredictor(model, WSSS4LUAD, input_size=64, tta=tta, gate=gate,
                                 **DIVIDE255)


class LocalModel(torch.nn.Module):
    """A 3x3-convolution 'segmenter': its prediction depends on a pixel's neighbours only."""

    input_multiple = 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, WSSS4LUAD.num_classes, 3, padding=1)

    def forward(self, x):
        return SegmenterOutput(4 * self.conv(x))


class FixedClassifier(torch.nn.Module):
    """A stage-1 stand-in that gives every image the same class probabilities."""

    def __init__(self, probabilities):
        super().__init__()
        self.logits = torch.logit(torch.tensor([probabilities]))

    def normalise(self, images):
        return images.float()

    def forward(self, x):
        return SimpleNamespace(logits=self.logits.expand(x.shape[0], -1))


class BrightnessClassifier(torch.nn.Module):
    """A stage-1 stand-in: dark crops hold class 0 only, bright ones class 2 only."""

    def normalise(self, images):
        return images.float() / 255

    def forward(self, x):
        bright = (x.mean(dim=(1, 2, 3)) > 0.5).float()
        probabilities = torch.stack([0.9 - 0.89 * bright, torch.full_like(bright, 0.05),
                                     0.01 + 0.89 * bright], dim=1)
        return SimpleNamespace(logits=torch.logit(probabilities))


class BlobModel(torch.nn.Module):
    """A coarse, confident 'segmenter': tumour where a 31-px neighbourhood is darker than
    the image's mean, stroma elsewhere (blobs, as a network trained on CAMs draws them)."""

    input_multiple = 1

    def __init__(self):
        super().__init__()
        self.sharpness = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        local = F.avg_pool2d(x.mean(dim=1, keepdim=True), 31, stride=1, padding=15,
                             count_include_pad=False)
        dark = self.sharpness * (local.mean(dim=(2, 3), keepdim=True) - local)
        return SegmenterOutput(torch.cat([dark, -dark, torch.full_like(dark, -30)], dim=1))


@pytest.fixture(scope="module")
def val(sample_dataset_dir):
    return find_dataset(sample_dataset_dir).eval_set("val")


def test_d4_tta_is_equivariant_to_rotations_and_flips():
    model, _ = small_segmenter()
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    d4 = predictor_of(model, "d4")
    reference = d4.predict_batch(image)[0]
    rotated = d4.predict_batch(np.rot90(image, 1, axes=(1, 2)))[0]
    flipped = d4.predict_batch(image[:, :, ::-1])[0]
    np.testing.assert_allclose(rotated, np.rot90(reference, 1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(flipped, reference[:, :, ::-1], atol=1e-5)
    plain = predictor_of(model).predict_batch
    assert not np.allclose(plain(np.rot90(image, 1, axes=(1, 2)))[0],
                           np.rot90(plain(image)[0], 1, axes=(1, 2)), atol=1e-3)
    flip = predictor_of(model, "flip")
    np.testing.assert_allclose(flip.predict_batch(image[:, :, ::-1])[0],
                               flip.predict_batch(image)[0][:, :, ::-1], atol=1e-5)
    assert np.allclose(reference.sum(axis=0), 1, atol=1e-5)


def test_multiscale_and_odd_sizes_keep_the_image_shape():
    model, _ = small_segmenter()
    image = np.random.default_rng(1).integers(0, 256, (2, 37, 51, 3), dtype=np.uint8)
    for tta in ("none", "multiscale"):
        probabilities = predictor_of(model, tta).predict_batch(image)
        assert probabilities.shape == (2, 3, 37, 51) and probabilities.dtype == np.float32
        assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)


def test_large_images_are_tiled_like_the_whole_image_away_from_seams(val):
    image, _ = val.pair(0)
    image = np.concatenate([image, image[::-1]], axis=0)  # taller than one tile
    predictor = predictor_of(LocalModel())
    whole_labels, whole = predict_image(predictor, image, whole_image_limit=10_000)
    tiled_labels, tiled = predict_image(predictor, image, whole_image_limit=100, tile=128,
                                        overlap=32)
    assert tiled.shape == whole.shape == (3, *image.shape[:2])
    inner = (slice(None), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(tiled[inner], whole[inner], atol=0.05)
    assert np.mean(tiled_labels == whole_labels) > 0.99


def test_class_gate_removes_classes_the_classifier_rules_out():
    model, _ = small_segmenter()
    image = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    gated = predictor_of(model, gate=ClassGate(FixedClassifier([0.9, 0.05, 0.5]), 0.1, window=64))
    probabilities = gated.predict_batch(image)
    assert np.all(probabilities[:, 1] == 0)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert gated.config["class_gate"] == 0.1
    # The most probable class always stays, even below the threshold.
    alone = predictor_of(model, gate=ClassGate(FixedClassifier([0.01, 0.05, 0.02]), 0.1, window=64))
    labels, _ = predict_image(alone, image[0])
    assert set(np.unique(labels)) == {1}


@pytest.mark.parametrize("tta", ["none", "multiscale"])
def test_class_gate_decides_per_training_size_window(tta):
    model, _ = small_segmenter()
    image = np.zeros((1, 128, 96, 3), np.uint8)
    image[:, 64:] = 255  # bottom window bright
    predictor = predictor_of(model, tta, gate=ClassGate(BrightnessClassifier(), 0.1, window=64))
    labels = predictor.predict_batch(image)[0].argmax(axis=0)
    assert np.all(labels[:64] == 0) and np.all(labels[64:] == 2)


def test_overlapping_gate_windows_keep_what_every_covering_window_keeps():
    image = torch.zeros((1, 3, 128, 64), dtype=torch.uint8)
    image[:, :, 80:] = 255  # the window at rows 64-128 is bright, those above are dark
    tiled = ClassGate(BrightnessClassifier(), 0.1, window=64).present(image)[0]
    assert tiled[:, :64].all(dim=(1, 2)).tolist() == [True, False, False]
    assert tiled[:, 64:].all(dim=(1, 2)).tolist() == [False, False, True]
    overlapping = ClassGate(BrightnessClassifier(), 0.1, window=64, stride=32).present(image)[0]
    assert overlapping[:, :64].all(dim=(1, 2)).tolist() == [True, False, False]
    assert overlapping[:, 96:].all(dim=(1, 2)).tolist() == [False, False, True]
    # Rows 64-96 lie in a dark window (32-96) and a bright one (64-128): no class is kept by
    # both, so none is ruled out there.
    assert overlapping[:, 64:96].all()


def test_appearance_refinement_runs_on_each_image_after_the_network(val):
    images = np.stack([val.pair(0)[0][:200, :200], val.pair(3)[0][:200, :200]])
    plain = SegmentationPredictor(BlobModel(), WSSS4LUAD, input_size=64, **DIVIDE255)
    refined = SegmentationPredictor(BlobModel(), WSSS4LUAD, input_size=64,
                                    appearance_weight=0.5, **DIVIDE255)
    assert refined.config["appearance_weight"] == 0.5
    networks, outputs = plain.predict_batch(images), refined.predict_batch(images)
    for network, output, image in zip(networks, outputs, images, strict=True):
        expected = refine_by_appearance(network, image, 0.5, WSSS4LUAD.white_threshold)
        np.testing.assert_allclose(output, expected, atol=1e-6)
        assert (output.argmax(axis=0) != network.argmax(axis=0)).mean() > 0.01
    with pytest.raises(ConfigError, match="appearance weight"):
        SegmentationPredictor(BlobModel(), WSSS4LUAD, input_size=64, appearance_weight=-1,
                              **DIVIDE255)


def test_strokes_refine_their_image_without_retraining(val):
    """A predictor without an appearance model of its own still learns from a user's strokes
    (at ``STROKE_WEIGHT``), after the network and before the class offsets."""
    image = val.pair(0)[0][:200, :200]
    offsets = np.array([0.2, -0.1, 0.0], np.float32)
    predictor = SegmentationPredictor(BlobModel(), WSSS4LUAD, input_size=64,
                                      class_offsets=offsets, **DIVIDE255)
    network = predictor.network_probabilities(image[None])[0]
    painted = np.zeros(image.shape[:2], np.uint8)
    painted[90:110, 60:140] = 1 + (1 - network[:, 100, 100].argmax())  # the other class
    labels, probabilities = predict_image(predictor, image, painted=painted)
    expected = refine_by_appearance(network, image, STROKE_WEIGHT, WSSS4LUAD.white_threshold,
                                    painted) * np.exp(offsets)[:, None, None]
    np.testing.assert_allclose(probabilities, expected / expected.sum(axis=0), atol=1e-6)
    assert (labels[painted > 0] == painted[painted > 0] - 1).all()
    untouched = predict_image(predictor, image)[0]
    assert ((labels != untouched) & (painted == 0)).any()  # beyond the painted pixels
    # Nothing painted (or only glass): the predictor's own recipe, no appearance model.
    for empty in (np.zeros_like(painted), np.full_like(painted, WSSS4LUAD.num_classes + 1)):
        np.testing.assert_array_equal(predict_image(predictor, image, painted=empty)[0],
                                      untouched)
    with pytest.raises(ConfigError, match="do not match the image"):
        predict_image(predictor, image, painted=painted[:100])
    with pytest.raises(ConfigError, match="fine-tune with them"):
        predict_image(predictor, image, painted=painted, whole_image_limit=128)


def test_evaluate_saves_masks_that_score_the_same_as_a_mask_folder(tmp_path, val):
    model, _ = small_segmenter()
    scores = evaluate(predictor_of(model), val, save_masks=tmp_path / "pred")
    assert {"miou", "fwiou", "dice", "pixel_accuracy", "per_class"} <= set(scores)
    assert set(scores["per_class"]) == set(WSSS4LUAD.class_names)
    saved = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert saved == sorted(p.with_suffix(".png").name for p in val.image_paths)
    again = evaluate_mask_folder(tmp_path / "pred", val)
    assert again["miou"] == pytest.approx(scores["miou"])
    # Each image's own mIoU, from its saved mask against its truth.
    spread = scores["per_image"]
    assert len(spread["miou"]) == len(val)
    for index, expected in enumerate(spread["miou"]):
        one = ConfusionMatrix(WSSS4LUAD.num_classes)
        saved = tmp_path / "pred" / val.image_paths[index].with_suffix(".png").name
        one.update(read_mask(saved, WSSS4LUAD), read_mask(val.mask_paths[index], WSSS4LUAD))
        assert one.scores()["miou"] == pytest.approx(expected)
    assert spread["min"] <= spread["p10"] <= spread["median"]
    assert spread["names"] == [path.name for path in val.image_paths]
    assert spread["miou"][spread["names"].index(spread["worst"])] == spread["min"]


def test_evaluate_mask_folder_against_ground_truth(tmp_path, val):
    truth_dir = val.mask_paths[0].parent
    perfect = evaluate_mask_folder(truth_dir, val)
    assert perfect["miou"] == pytest.approx(1.0)
    shutil.copytree(truth_dir, tmp_path / "pred")
    first = tmp_path / "pred" / val.mask_paths[0].name
    from napari_histo_wsss.core.data.datasets import write_palette_mask

    mask = read_mask(first, WSSS4LUAD)
    write_palette_mask(first, np.where(mask == 0, 1, mask), WSSS4LUAD)
    assert evaluate_mask_folder(tmp_path / "pred", val)["miou"] < 1.0


def _trained_run(root, strategies: dict[str, float | None], class_gate=None) -> RunDirectory:
    """A run directory holding segmenters (untrained weights) with given val mIoUs."""
    config = RunConfig(dataset=WSSS4LUAD.to_dict(), mpp=0.5)
    run = RunDirectory(root)
    for index, (strategy, miou) in enumerate(strategies.items()):
        model, settings = small_segmenter(index)
        settings.class_gate = class_gate
        config.segmenter = settings
        save_checkpoint(run.segmenter_checkpoint(strategy), kind="segmenter",
                        state_dict=model.state_dict(), spec=WSSS4LUAD,
                        config=checkpoint_config(config, strategy, 64, "divide255",
                                                 **DIVIDE255))
        best = None if miou is None else {"miou": miou}
        (run.segmenter_dir(strategy) / "metrics.json").write_text(json.dumps({"best_val": best}))
    run.create(config)
    return run


def test_load_predictor_picks_the_best_strategy_and_explains_problems(tmp_path):
    empty = RunDirectory(tmp_path / "empty")
    empty.create(RunConfig())
    with pytest.raises(CheckpointError, match="no trained segmenter"):
        load_predictor(empty.root, "cpu")
    run = _trained_run(tmp_path / "run", {"ce": 0.4, "onss": 0.6, "anm": None})
    predictor = load_predictor(run.root, "cpu")
    assert predictor.config["strategy"] == "onss"
    assert (predictor.mpp, predictor.input_size, predictor.num_classes) == (0.5, 64, 3)
    assert predictor.spec.class_names == WSSS4LUAD.class_names
    assert load_predictor(run.root, "cpu", strategy="anm").config["strategy"] == "anm"
    checkpoint = run.segmenter_checkpoint("ce")
    assert load_predictor(checkpoint, "cpu").config["strategy"] == "ce"
    with pytest.raises(CheckpointError, match="no trained segmenter 'arml'"):
        load_predictor(run.root, "cpu", strategy="arml")


def test_load_predictor_follows_the_recipes_appearance_weight_unless_told(tmp_path, val,
                                                                         capsys):
    run = _trained_run(tmp_path / "run", {"ce": 0.5})
    assert load_predictor(run.root, "cpu").appearance_weight == 0.0
    config = run.config()
    config.segmenter.appearance_weight = 0.5
    payload = torch.load(run.segmenter_checkpoint("ce"), weights_only=True)
    payload["config"]["run"] = config.to_dict()
    torch.save(payload, run.segmenter_checkpoint("ce"))
    assert load_predictor(run.root, "cpu").appearance_weight == 0.5
    assert load_predictor(run.root, "cpu", appearance_weight=0).appearance_weight == 0.0
    images, masks = str(val.image_paths[0].parent), str(val.mask_paths[0].parent)
    with pytest.raises(SystemExit):
        run_cli(["evaluate", str(run.root), images, masks, "--appearance-weight", "-1"])
    assert "expected a number of at least 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--appearance-weight need a run directory"):
        run_cli(["evaluate", masks, images, masks, "--appearance-weight", "0"])


def test_load_predictor_uses_the_runs_classifier_as_class_gate(tmp_path):
    run = _trained_run(tmp_path / "run", {"multilayer_ce": 0.5}, class_gate=0.1)
    assert load_predictor(run.root, "cpu").gate is None  # no classifier in the run yet
    classifier = build_classifier(ClassifierConfig(weights="none"), 3, WSSS4LUAD)
    save_checkpoint(run.classifier_checkpoint, kind="classifier",
                    state_dict=classifier.state_dict(), spec=WSSS4LUAD,
                    config=RunConfig(dataset=WSSS4LUAD.to_dict(),
                                     classifier=ClassifierConfig(weights="none")).to_dict())
    gated = load_predictor(run.root, "cpu")
    assert gated.gate is not None and gated.config["class_gate"] == 0.1
    assert load_predictor(run.root, "cpu", use_class_gate=False).gate is None
    probabilities = gated.predict_batch(np.full((1, 64, 64, 3), 200, np.uint8))
    assert probabilities.shape == (1, 3, 64, 64)


def test_class_gate_is_kept_only_where_it_helps_on_val(tmp_path, val):
    run = _trained_run(tmp_path / "run", {"multilayer_ce": 0.5}, class_gate=0.5)
    classifier = build_classifier(ClassifierConfig(weights="none"), 3, WSSS4LUAD)
    save_checkpoint(run.classifier_checkpoint, kind="classifier",
                    state_dict=classifier.state_dict(), spec=WSSS4LUAD,
                    config=RunConfig(dataset=WSSS4LUAD.to_dict(),
                                     classifier=ClassifierConfig(weights="none")).to_dict())
    scores = select_class_gate(run, "multilayer_ce", val, "cpu")
    with_gate, without_gate = scores["miou_with_gate"], scores["miou_without_gate"]
    assert with_gate != without_gate  # a random classifier at 0.5 erases classes
    assert scores["miou"] == max(with_gate, without_gate)
    assert scores["class_gate"] == (with_gate >= without_gate)
    verdict = "kept" if scores["class_gate"] else "dropped"
    assert describe_gate_choice(scores).startswith(f"class gate {verdict} (val mIoU")
    assert describe_gate_choice({"miou": 0.5}) is None
    assert (load_predictor(run.root, "cpu").gate is not None) == scores["class_gate"]
    assert load_predictor(run.root, "cpu", use_class_gate=True).gate is not None
    choice = run.segmenter_dir("multilayer_ce") / "class_gate.json"
    choice.write_text(json.dumps({"use": False}))
    assert load_predictor(run.root, "cpu").gate is None
    choice.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable class-gate choice"):
        load_predictor(run.root, "cpu")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="histo-wsss")
    add_stage2_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_evaluate_json_for_a_run_and_for_a_mask_folder(tmp_path, val, capsys):
    run = _trained_run(tmp_path / "run", {"ce": None})
    images, masks = str(val.image_paths[0].parent), str(val.mask_paths[0].parent)
    assert run_cli(["evaluate", str(run.root), images, masks, "--json",
                    "--save-masks", str(tmp_path / "pred")]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert {"miou", "fwiou", "dice", "per_class", "pixel_accuracy"} <= set(from_run)
    # A folder of masks: classes detected from the ground truth's WSSS4LUAD palette.
    assert run_cli(["evaluate", str(tmp_path / "pred"), images, masks, "--json"]) == 0
    from_masks = json.loads(capsys.readouterr().out)
    assert from_masks["miou"] == pytest.approx(from_run["miou"])
    assert run_cli(["evaluate", str(tmp_path / "pred"), images, masks]) == 0
    assert "mIoU" in capsys.readouterr().out


def test_mask_folder_classes_can_be_given(tmp_path, val):
    spec_eval = load_eval_set(val.image_paths[0].parent, val.mask_paths[0].parent, WSSS4LUAD)
    assert evaluate_mask_folder(val.mask_paths[0].parent, spec_eval)["miou"] == 1.0
    assert run_cli(["evaluate", str(val.mask_paths[0].parent), str(val.image_paths[0].parent),
                    str(val.mask_paths[0].parent), "--classes", "a,b,c", "--background",
                    "3"]) == 0
