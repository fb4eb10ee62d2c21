"""HisynSeg's filter: a discriminator trained on real vs synthetic patches changes what is kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.events import Batch, Epoch, Message, StopToken
from napari_histo_wsss.core.hisynseg.discriminator import (
    filter_synthetic,
    record_filter_outcome,
    train_discriminator,
)
from napari_histo_wsss.core.hisynseg.synthesis import Synthesizer, synthesize_pool

SIZE = 64  # small inputs keep the real training fast; the recipe is the same at 224


def drain(job):
    """The events of a sub-job and the value it returns (sub-jobs return, they end in no Done)."""
    events = []
    while True:
        try:
            events.append(next(job))
        except StopIteration as finished:
            return events, finished.value


@pytest.fixture(scope="module")
def trained(sample_dataset_dir):
    """A ResNet-10-T trained for real on the bundled multi-label patches vs mosaic images."""
    patches = find_dataset(sample_dataset_dir).patches()
    synthesizer = Synthesizer(patches, size=SIZE)
    rng = np.random.default_rng(0)
    real = [patches.image(i) for i in np.flatnonzero(patches.labels.sum(axis=1) > 1)]
    unfiltered = synthesize_pool(synthesizer, "mosaic", 24, rng)
    events, (discriminator, figures) = drain(train_discriminator(
        real, unfiltered, arch="resnet10t", epochs=3, batch_size=16,
        device=torch.device("cpu"), rng=rng, stop=StopToken(), stage="test"))
    return synthesizer, discriminator, figures, events


def test_discriminator_trains_and_keeps_its_best_epoch(trained):
    _, discriminator, figures, events = trained
    epochs = [e for e in events if isinstance(e, Epoch)]
    assert [e.epoch for e in epochs] == [0, 1, 2]  # counted from 0, like every other trainer
    assert {e.epoch for e in events if isinstance(e, Batch)} == {0, 1, 2}
    best = max(e.metrics["val_accuracy"] for e in epochs)
    assert figures["val_accuracy"] == pytest.approx(best)
    assert 1 <= figures["best_epoch"] <= 3  # the run's metrics count best epochs from 1
    assert figures["train_real"] + figures["val_real"] == 14  # the 14 [1, 1, 0] patches
    scores = discriminator.p_real(np.zeros((2, SIZE, SIZE, 3), dtype=np.uint8))
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()


def test_filter_keeps_what_looks_real(trained):
    synthesizer, discriminator, _, _ = trained
    # The threshold sits at the median P(real) of fresh images, so this tiny discriminator
    # must split them: the kept ones have to score above the rejected ones.
    probe = synthesize_pool(synthesizer, "mosaic", 32, np.random.default_rng(1))
    threshold = float(np.median(discriminator.p_real(probe.images)))
    _, (pool, report) = drain(filter_synthetic(
        synthesizer, "mosaic", discriminator, 8, np.random.default_rng(2),
        threshold=threshold, stop=StopToken(), stage="test"))
    assert len(pool) == 8 and report.accepted == 8 and report.topped_up == 0
    assert report.acceptance_rate < 1.0
    assert (pool.p_real > threshold).all()
    assert report.mean_p_real_accepted > report.mean_p_real_rejected


def test_filter_tops_up_and_says_so_when_too_few_pass(trained, tmp_path):
    synthesizer, discriminator, figures, _ = trained
    job = filter_synthetic(synthesizer, "bezier", discriminator, 3, np.random.default_rng(3),
                           threshold=1.0, stop=StopToken(), stage="test")
    events, (pool, report) = drain(job)
    assert report.accepted == 0 and report.topped_up == 3 and len(pool) == 3
    assert report.attempts == 60  # the cap: 20 draws per wanted image
    assert any(isinstance(e, Message) and "only 0 of 3 bezier" in e.text for e in events)

    path = record_filter_outcome(tmp_path, report, pool, synthesizer.spec,
                                 discriminator=figures, examples=2)
    record = json.loads(path.read_text())
    assert record["bezier"]["target"] == 3 and record["bezier"]["acceptance_rate"] == 0.0
    assert record["bezier"]["discriminator"]["arch"] == "resnet10t"
    assert sorted(p.name for p in (tmp_path / "examples").iterdir()) == [
        "bezier_00.png", "bezier_00_mask.png", "bezier_01.png", "bezier_01_mask.png"]
