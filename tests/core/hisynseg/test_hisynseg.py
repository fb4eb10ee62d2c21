"""HisynSeg end to end on the bundled real patches: synthesis, filter, two rounds, stop/resume."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.presets import preset
from napari_histo_wsss.core.data.datasets import EvalSet, find_dataset, read_mask
from napari_histo_wsss.core.events import Batch, Done, Message, Started, StopToken
from napari_histo_wsss.core.hisynseg.synthesis import SyntheticPool
from napari_histo_wsss.core.hisynseg.train import hisynseg_augment, train_hisynseg
from napari_histo_wsss.core.inference.predict import load_predictor, predict_image
from napari_histo_wsss.core.runs.run_dir import RunDirectory


@pytest.fixture(scope="module")
def dataset(sample_dataset_dir):
    """16 of the bundled patches (4 of each label combination) and one val image."""
    layout = find_dataset(sample_dataset_dir)
    patches = layout.patches()
    combinations = [tuple(label) for label in patches.labels]
    chosen = [i for i, label in enumerate(combinations) if combinations[:i].count(label) < 4]
    patches = patches.subset(chosen)
    patches.decode_all()
    val = layout.eval_set("val")
    return layout, patches, EvalSet(val.image_paths[:1], val.mask_paths[:1], val.spec)


def tiny_config(layout, patches):
    """The hisynseg preset, shrunk to seconds: 64-px crops, one epoch per round, a filter that
    keeps anything (test_discriminator checks that filtering selects)."""
    config = preset("hisynseg", num_patches=len(patches))
    config.dataset = layout.spec.to_dict()
    config.segmenter = replace(config.segmenter, epochs=1, batch_size=4, input_size=64)
    config.hisynseg = replace(config.hisynseg, images_per_type=8, discriminator_images=8,
                              discriminator_epochs=1, discriminator_batch_size=16,
                              accept_threshold=0.0)
    return config


def test_hisynseg_augment_moves_mask_with_image():
    rng = np.random.default_rng(0)
    image = np.zeros((80, 80, 3), dtype=np.uint8)
    image[:, 40:] = 200
    mask = (image[..., 0] > 0).astype(np.uint8)
    for _ in range(5):
        out_image, out_mask = hisynseg_augment(image, mask, 48, rng)
        assert out_image.shape == (48, 48, 3) and out_mask.shape == (48, 48)
        agree = (out_image[..., 0] > 100) == (out_mask == 1)
        assert agree.mean() > 0.97  # only bilinear border pixels may differ


def test_stop_resume_and_a_loadable_model(dataset, tmp_path):
    layout, patches, val = dataset
    config = tiny_config(layout, patches)
    run = RunDirectory(tmp_path / "run")
    run.create(config)

    # Stop early in round 1: the job saves its place and leaves a usable model.
    stop = StopToken()
    events = []
    for event in train_hisynseg(run, config, patches, device="cpu", stop=stop, val=val):
        events.append(event)
        if isinstance(event, Batch) and event.stage == "hisynseg:round-1" and event.index == 1:
            stop.request()
    assert isinstance(events[-1], Done) and events[-1].stopped
    folder = run.segmenter_dir("hisynseg")
    assert (folder / "last.pt").is_file() and (folder / "model.pt").is_file()
    assert not run.is_complete("segmenter:hisynseg")
    record = json.loads((run.root / "hisynseg" / "synthesis.json").read_text())
    assert {"mosaic", "bezier", "single_label_sources"} <= set(record)
    assert record["mosaic"]["target"] == 8 and record["mosaic"]["attempts"] >= 8
    assert (run.root / "hisynseg" / "examples" / "bezier_00_mask.png").is_file()
    pool = SyntheticPool.load(run.root / "hisynseg" / "mosaic.npz")
    assert pool.images.shape == (8, 64, 64, 3)

    # Resume: synthetic images are reused, round 1 continues, round 2 self-trains.
    resumed = list(train_hisynseg(run, config, patches, device="cpu", val=val))
    started = [e.stage for e in resumed if isinstance(e, Started)]
    assert started == ["hisynseg:round-1", "hisynseg:pseudo-masks", "hisynseg:round-2"]
    first_resumed_batch = next(e for e in resumed if isinstance(e, Batch))
    assert first_resumed_batch.index == 2  # continues where the stop left it
    assert isinstance(resumed[-1], Done) and not resumed[-1].stopped
    assert run.is_complete("segmenter:hisynseg")
    assert not any(isinstance(e, Message) and "filter" in e.stage for e in resumed)

    # Pseudo-masks: label-gated, single-label patches constant (up to white glass).
    for index in range(len(patches)):
        mask = read_mask(run.pseudo_mask_dir("hisynseg") / patches.paths[index].name, layout.spec)
        tissue = np.unique(mask[mask != layout.spec.background_index])
        assert set(tissue) <= set(np.flatnonzero(patches.labels[index]))
        if patches.labels[index].sum() == 1:
            assert len(tissue) <= 1

    metrics = json.loads((folder / "metrics.json").read_text())
    assert [h["round"] for h in metrics["history"]] == [1, 2]
    assert metrics["best_val"]["miou"] is not None

    predictor = load_predictor(run.root, torch.device("cpu"), strategy="hisynseg")
    assert predictor.tta == "d4" and predictor.config["strategy"] == "hisynseg"
    labels, probabilities = predict_image(predictor, patches.image(0))
    assert labels.shape == patches.image(0).shape[:2]
    assert probabilities.shape[0] == layout.spec.num_classes
