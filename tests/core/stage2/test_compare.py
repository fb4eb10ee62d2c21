"""Comparing a run's strategies on one image: predictions, scores, trust maps, model reuse."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import EvalSet, read_mask, read_rgb, write_palette_mask
from napari_histo_wsss.core.errors import ConfigError, DatasetError
from napari_histo_wsss.core.events import StopToken
from napari_histo_wsss.core.inference.predict import evaluate, load_predictor, predict_image
from napari_histo_wsss.core.models.segmenter import build_segmenter, checkpoint_config
from napari_histo_wsss.core.runs.checkpoints import save_checkpoint
from napari_histo_wsss.core.runs.model_cache import ModelCache
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage2.compare import (
    compare_strategies,
    disagreement,
    iter_comparisons,
)

MEAN, STD = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)


def save_segmenter(run: RunDirectory, config: RunConfig, loss: str, seed: int) -> None:
    torch.manual_seed(seed)
    settings = SegmenterConfig(arch="pspnet", encoder_depth=3, weights="none", loss=loss)
    model = build_segmenter(settings, WSSS4LUAD.num_classes)
    save_checkpoint(run.segmenter_checkpoint(loss), kind="segmenter",
                    state_dict=model.state_dict(), spec=WSSS4LUAD,
                    config=checkpoint_config(replace(config, segmenter=settings), loss, 64,
                                             "divide255", MEAN, STD))


@pytest.fixture
def two_strategy_run(tmp_path) -> RunDirectory:
    """A run with two small (untrained) segmenters, ce and onss, saved as real checkpoints."""
    config = RunConfig(dataset=WSSS4LUAD.to_dict(), segmenter=SegmenterConfig(loss="ce"))
    run = RunDirectory(tmp_path / "run")
    run.create(config)
    for seed, loss in enumerate(("ce", "onss")):
        save_segmenter(run, config, loss, seed)
    return run


@pytest.fixture
def val_pair(sample_dataset_dir):
    image_path = sample_dataset_dir / "val" / "img" / "00.png"
    mask_path = sample_dataset_dir / "val" / "mask" / "00.png"
    return image_path, mask_path


def test_each_strategy_predicts_and_is_scored_like_evaluate(two_strategy_run, val_pair):
    run = two_strategy_run
    image_path, mask_path = val_pair
    image, truth = read_rgb(image_path), read_mask(mask_path, WSSS4LUAD)

    results = compare_strategies(run, image, truth=truth, device="cpu")

    assert list(results) == ["ce", "onss"]
    for strategy, result in results.items():
        predictor = load_predictor(run.root, "cpu", strategy=strategy)
        expected, _ = predict_image(predictor, image)
        np.testing.assert_array_equal(result.labels, expected)
        scores = evaluate(predictor, EvalSet([image_path], [mask_path], WSSS4LUAD))
        assert result.miou == pytest.approx(scores["miou"], nan_ok=True)
        assert set(result.per_class_iou) == set(WSSS4LUAD.class_names)
        assert result.trust is None  # no training patch given
    differs = disagreement(list(results.values()))
    assert differs.shape == image.shape[:2]
    assert differs.mean() == pytest.approx(np.mean(results["ce"].labels
                                                   != results["onss"].labels))
    assert not disagreement([results["ce"], results["ce"]]).any()


def test_a_training_patch_gets_trust_maps_and_no_mask_means_no_scores(two_strategy_run):
    run = two_strategy_run
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pseudo = np.zeros((64, 64), np.uint8)
    pseudo[:, 32:] = 1
    write_palette_mask(run.pseudo_mask_dir("final") / "patch.png", pseudo, WSSS4LUAD)

    results = compare_strategies(run, image, ["onss", "ce"], device="cpu",
                                 patch=("patch.png", np.array([1, 1, 0], np.uint8)))

    assert list(results) == ["onss", "ce"]
    assert results["onss"].trust.shape == (64, 64) and results["onss"].trust.std() > 0
    assert results["ce"].trust is None  # plain CE weighs every pixel alike
    assert all(result.scores is None and result.miou is None for result in results.values())


def test_unknown_strategies_a_wrong_mask_and_a_stop_request(two_strategy_run, val_pair, tmp_path):
    run = two_strategy_run
    image = read_rgb(val_pair[0])
    with pytest.raises(ConfigError, match="'anm'.*trained: ce, onss"):
        compare_strategies(run, image, ["ce", "anm"], device="cpu")
    with pytest.raises(DatasetError, match="the mask is"):
        compare_strategies(run, image, truth=np.zeros((3, 3), np.uint8), device="cpu")
    empty = RunDirectory(tmp_path / "empty")
    empty.create(RunConfig(dataset=WSSS4LUAD.to_dict()))
    with pytest.raises(ConfigError, match="no trained segmenter"):
        compare_strategies(empty, image, device="cpu")

    stop = StopToken()
    results = iter_comparisons(run, image, device="cpu", stop=stop)
    assert next(results).strategy == "ce"
    stop.request()
    assert list(results) == []


def test_the_model_cache_reloads_only_a_rewritten_checkpoint(two_strategy_run):
    run = two_strategy_run
    cache, loads = ModelCache(), []
    checkpoint = run.segmenter_checkpoint("ce")

    def load():
        loads.append(checkpoint)
        return load_predictor(run.root, "cpu", strategy="ce")

    first = cache.get(checkpoint, "cpu", load)
    assert cache.get(checkpoint, "cpu", load) is first and len(loads) == 1
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.get(checkpoint, "cpu", load) is not first and len(loads) == 2
    cache.get(checkpoint, "meta", load)  # another device: loaded again
    assert len(loads) == 3 and len(cache) == 1

    small = ModelCache(capacity=1)  # only the most recently used model stays
    small.get(checkpoint, "cpu", load)
    onss = run.segmenter_checkpoint("onss")
    small.get(onss, "cpu", lambda: load_predictor(run.root, "cpu", strategy="onss"))
    assert len(small) == 1
    small.get(checkpoint, "cpu", load)
    assert len(loads) == 5  # ce was dropped for onss, so it loads again
