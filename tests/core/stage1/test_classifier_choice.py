"""Several classifiers, the best kept: the presence score and the gated pseudo-mask score on
hand-made masks, and real training of two candidates on the bundled patches, stopped and
resumed."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_wsss.core.config.presets import preset
from napari_histo_wsss.core.data.datasets import EvalSet
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.events import Batch, Done, Message, StopToken
from napari_histo_wsss.core.inference.metrics import ConfusionMatrix
from napari_histo_wsss.core.models.classifier import build_classifier
from napari_histo_wsss.core.runs.checkpoints import load_checkpoint
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage1 import classifier_choice
from napari_histo_wsss.core.stage1.cams import frozen_for_class_maps
from napari_histo_wsss.core.stage1.pseudo_masks import eval_image_mask
from napari_histo_wsss.core.stage1.train_classifier import train_classifier

CPU = torch.device("cpu")


def _write_pair(folder, name, mask):
    rng = np.random.default_rng(len(name))
    image = rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / f"{name}-img.png")
    Image.fromarray(mask.astype(np.uint8), mode="L").save(folder / f"{name}-mask.png")
    return folder / f"{name}-img.png", folder / f"{name}-mask.png"


@pytest.fixture
def hand_made_val(tmp_path, sample_layout):
    """Two 100-px images of noise: one half tumour, half stroma; one mostly normal, with a
    quarter of glass and a 4 % sliver of tumour in another quarter."""
    halves = np.zeros((100, 100), np.uint8)
    halves[:, 50:] = 1  # windows of 50 px: two hold tumour only, two stroma only
    normal = np.full((100, 100), 2, np.uint8)
    normal[:50, :50] = 3  # one window of glass only: skipped
    normal[50:, 50:52] = 0  # 4 % of a window: tumour absent there
    pairs = [_write_pair(tmp_path, "a", halves), _write_pair(tmp_path, "b", normal)]
    return EvalSet([image for image, _ in pairs], [mask for _, mask in pairs],
                   sample_layout.spec)


@pytest.fixture
def untrained_classifier(sample_layout):
    torch.manual_seed(0)
    config = preset("recommended", "fast", num_patches=40).classifier
    spec = sample_layout.spec
    return build_classifier(dataclasses.replace(config, weights="none"), spec.num_classes,
                            spec)


def test_presence_scores_count_windows_as_the_masks_hold_them(hand_made_val,
                                                              untrained_classifier):
    """Threshold 0 keeps every class in every window, so each class's F1 is 2n / (W + n) for
    the n windows (of W with tissue) that hold it; all-background windows are skipped and a
    class under 5 % of a window is absent."""
    scores = classifier_choice.window_presence_scores(untrained_classifier, hand_made_val,
                                                      window=50, threshold=0.0)

    assert scores["windows"] == 7
    assert scores["f1"] == {"tumor": round(4 / 9, 4), "stroma": round(4 / 9, 4),
                            "normal": round(6 / 10, 4)}
    assert scores["exact"] == 0.0  # no window holds all three classes
    assert scores["macro_f1"] == pytest.approx((4 / 9 + 4 / 9 + 0.6) / 3, abs=1e-4)


def test_gated_pseudo_masks_limit_each_pixel_to_its_windows_kept_classes(
        hand_made_val, untrained_classifier):
    """Above threshold 1 each 50-px window keeps only its most probable class, so every pixel
    takes its window's top class whatever the class maps say; at threshold 0 every class is
    kept everywhere, which is the image gated by all its classes."""
    recipe = preset("recommended", "fast", num_patches=40).pseudo_masks
    classifier = untrained_classifier.eval()
    spec = hand_made_val.spec
    top_class, all_classes = ConfusionMatrix(spec.num_classes), ConfusionMatrix(spec.num_classes)
    maps_model = frozen_for_class_maps(classifier)
    for index in range(len(hand_made_val)):
        image, truth = hand_made_val.pair(index)
        expected = np.zeros(truth.shape, np.uint8)
        for y in (0, 50):
            for x in (0, 50):
                crop = torch.from_numpy(np.array(image[y:y + 50, x:x + 50])).permute(2, 0, 1)
                with torch.no_grad():
                    logits = classifier(classifier.normalise(crop[None])).logits
                expected[y:y + 50, x:x + 50] = int(logits.argmax())
        top_class.update(expected, truth)
        all_classes.update(eval_image_mask(maps_model, image, np.ones(spec.num_classes, bool),
                                           recipe, spec), truth)

    only_top = classifier_choice.gated_pseudo_mask_scores(classifier, hand_made_val, recipe,
                                                          window=50, threshold=1.1)
    every_class = classifier_choice.gated_pseudo_mask_scores(classifier, hand_made_val, recipe,
                                                             window=50, threshold=0.0)

    assert only_top["gated_pm_miou"] == round(top_class.scores(spec.class_names)["miou"], 4)
    assert every_class["gated_pm_miou"] == round(
        all_classes.scores(spec.class_names)["miou"], 4)
    assert only_top["gated_pm_miou"] != every_class["gated_pm_miou"]
    assert set(only_top["gated_pm_iou"]) == set(spec.class_names)


def test_candidate_seeds_start_with_the_runs_own_and_the_best_score_wins():
    assert classifier_choice.candidate_seed(7, 0) == 7
    assert len({classifier_choice.candidate_seed(7, k) for k in range(4)}) == 4
    scores = [{"gated_pm_miou": 0.6, "macro_f1": 0.9}, {"gated_pm_miou": 0.7, "macro_f1": 0.8},
              {"gated_pm_miou": 0.7, "macro_f1": 0.9}]
    assert classifier_choice.best_candidate(scores) == 1  # the pseudo-masks, not the F1


def _config(patches, candidates):
    config = preset("recommended", "fast", num_patches=len(patches))
    config.dataset = patches.spec.to_dict()
    config.classifier = dataclasses.replace(
        config.classifier, epochs=1, batch_size=8, input_size=64, candidates=candidates)
    return config


def _train(root, config, patches, val, stop_at_candidate=None):
    run = RunDirectory(root)
    if not run.exists():
        run.create(config)
    stop, events, candidate = StopToken(), [], 0
    for event in train_classifier(run, config, patches, device=CPU, stop=stop, val=val):
        events.append(event)
        if isinstance(event, Message) and event.text.startswith("classifier 2 of"):
            candidate = 2
        if isinstance(event, Batch) and candidate == stop_at_candidate and event.index == 1:
            stop.request()
    return run, events


def _weights(path):
    return load_checkpoint(path, kind="classifier")["state_dict"]


def test_two_candidates_keep_the_better_gate_and_resume_after_a_stop(tmp_path, sample_layout,
                                                                       sample_patches):
    val = sample_layout.eval_set("val")
    config = _config(sample_patches, candidates=2)
    run, events = _train(tmp_path / "run", config, sample_patches, val, stop_at_candidate=2)
    assert isinstance(events[-1], Done) and events[-1].stopped
    assert not run.is_complete("classifier")
    assert classifier_choice.candidate_run(run, 0).is_complete("classifier")

    run, events = _train(tmp_path / "run", config, sample_patches, val)
    assert isinstance(events[-1], Done) and not events[-1].stopped
    assert sum(isinstance(event, Done) for event in events) == 1
    choice = json.loads((run.classifier_dir / classifier_choice.CHOICE_FILE).read_text())
    seeds = [candidate["seed"] for candidate in choice["candidates"]]
    assert seeds == [config.seed, classifier_choice.candidate_seed(config.seed, 1)]
    best = max(candidate["gated_pm_miou"] for candidate in choice["candidates"])
    assert choice["candidates"][choice["chosen"]]["gated_pm_miou"] == best
    assert all("macro_f1" in candidate for candidate in choice["candidates"])
    chosen = classifier_choice.candidate_run(run, choice["chosen"]).classifier_checkpoint
    kept, source = _weights(run.classifier_checkpoint), _weights(chosen)
    assert all(torch.equal(kept[name], source[name]) for name in source)
    assert run.status()["classifier"]["chosen"] == choice["chosen"]

    # Candidate 2, stopped after two batches and resumed, ends as an uninterrupted run of its
    # seed; candidate 1 is the plain classifier of the run's seed.
    plain_config = _config(sample_patches, candidates=1)
    for index in (0, 1):
        plain_config.seed = classifier_choice.candidate_seed(config.seed, index)
        plain, _ = _train(tmp_path / f"plain-{index}", plain_config, sample_patches, val)
        expected = _weights(plain.classifier_checkpoint)
        got = _weights(classifier_choice.candidate_run(run, index).classifier_checkpoint)
        assert all(torch.equal(expected[name], got[name]) for name in expected), index


def test_candidates_without_val_train_one_and_cannot_be_trained_longer(tmp_path,
                                                                       sample_patches):
    config = _config(sample_patches, candidates=2)
    run, events = _train(tmp_path / "run", config, sample_patches, val=None)
    assert any(isinstance(event, Message) and "training one" in event.text for event in events)
    assert run.classifier_checkpoint.is_file()
    assert not (run.classifier_dir / classifier_choice.CANDIDATES_FOLDER).exists()
    with pytest.raises(ConfigError, match="best of several classifiers"):
        list(train_classifier(run, config, sample_patches, device=CPU, more_epochs=1))
