"""docs/extending.md's claim: a new noise-suppression loss is one decorated function.

The example loss of the guide is registered for the length of a test, trained for two steps
through the real trainer on the bundled patches, and removed again.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
from napari_histo_wsss.core.data.datasets import find_dataset, write_palette_mask
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.events import Batch, Done
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage2.losses import (
    IGNORE_INDEX,
    LOSSES,
    LossContext,
    LossTargets,
    build_loss,
    with_background_channel,
)
from napari_histo_wsss.core.stage2.train_segmenter import train_segmenter


# The function exactly as docs/extending.md shows it, without the decorator line
# ``@LOSSES.register("gce")``: the fixture below registers it for one test at a time.
def generalised_cross_entropy(logits: torch.Tensor, targets: LossTargets,
                              context: LossContext, *, q: float = 0.7):
    """Generalised cross-entropy (1 - p^q) / q: bounded per pixel, so a confidently wrong
    pseudo-label costs at most 1/q instead of an unbounded -log p."""
    mask = targets.masks[0]
    extended = with_background_channel(logits, mask, context.num_classes)
    valid = mask != IGNORE_INDEX
    target = torch.where(valid, mask, 0).unsqueeze(1)
    agreement = torch.softmax(extended, dim=1).gather(1, target).squeeze(1)
    pixel_loss = (1 - agreement.clamp_min(1e-6) ** q) / q
    return pixel_loss[valid].mean(), agreement * valid


@pytest.fixture
def gce():
    LOSSES.register("gce")(generalised_cross_entropy)
    yield "gce"
    LOSSES.remove("gce")


@pytest.fixture(scope="module")
def patches(sample_dataset_dir):
    """Six real patches: two batches of three."""
    return find_dataset(sample_dataset_dir).patches().subset(range(0, 36, 6))


def run_with_label_masks(root, patches, settings: SegmenterConfig) -> tuple[RunDirectory,
                                                                            RunConfig]:
    """A run whose pseudo-masks are each patch's label classes in bands (white: background)."""
    spec = patches.spec
    config = RunConfig(dataset=spec.to_dict(), segmenter=settings)
    run = RunDirectory(root)
    run.create(config)
    for index, path in enumerate(patches.paths):
        image = patches.image(index)
        classes = np.flatnonzero(patches.labels[index])
        band = classes[np.arange(image.shape[0]) * len(classes) // image.shape[0]]
        mask = np.repeat(band[:, None], image.shape[1], axis=1).astype(np.uint8)
        mask[image.mean(axis=-1) > 220] = spec.background_index
        write_palette_mask(run.pseudo_mask_dir("final") / path.name, mask, spec)
    return run, config


def test_the_guide_loss_trains_through_the_real_trainer(tmp_path, patches, gce):
    settings = SegmenterConfig(arch="pspnet", encoder_depth=3, loss=gce, loss_params={"q": 0.5},
                               epochs=1, batch_size=3, input_size=None)
    assert build_loss(settings).params == {"q": 0.5}
    run, config = run_with_label_masks(tmp_path / "run", patches, settings)
    events = list(train_segmenter(run, config, patches, device="cpu"))
    losses = [event.loss for event in events if isinstance(event, Batch)]
    assert len(losses) == 2 and all(0 < loss <= 1 / 0.5 for loss in losses)
    assert isinstance(events[-1], Done) and events[-1].result.is_file()
    with (run.segmenter_dir(gce) / "losses.csv").open() as handle:
        row = next(csv.DictReader(handle))
    assert math.isfinite(float(row[gce]))  # the function's loss is logged under its name


def test_unknown_settings_of_the_guide_loss_are_refused(gce):
    with pytest.raises(ConfigError, match="unknown loss settings"):
        build_loss(SegmenterConfig(loss=gce, loss_params={"p": 1.0}))


def test_a_removed_loss_is_unknown_again():
    LOSSES.register("gce")(generalised_cross_entropy)
    LOSSES.remove("gce")
    with pytest.raises(ConfigError, match="unknown segmenter loss 'gce'"):
        build_loss(SegmenterConfig(loss="gce"))
