"""Painted pixels in the segmenter's loss, and a real fine-tune that stops and resumes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.draw import disk

from napari_histo_wsss.core.config.run_config import SegmenterConfig
from napari_histo_wsss.core.corrections.finetune import finetune_with_corrections
from napari_histo_wsss.core.corrections.store import Correction, CorrectionStore
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import (
    PatchSet,
    read_rgb,
)
from napari_histo_wsss.core.errors import CheckpointError, DatasetError
from napari_histo_wsss.core.events import Batch, Done, Preview, StopToken
from napari_histo_wsss.core.models.segmenter import SegmenterOutput, load_segmenter
from napari_histo_wsss.core.runs.checkpoints import load_checkpoint
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage2.losses import IGNORE_INDEX, LossContext, LossTargets, build_loss
from napari_histo_wsss.core.stage2.sparse_labels import (
    SparseLabels,
    override_targets,
    painted_on_patches,
    with_partial_cross_entropy,
)


def test_painted_pixels_override_the_pseudo_mask_and_add_full_weight():
    """Two pixels, 3 classes (background 3): pseudo-mask says tumor (0) at both; the user
    painted stroma (1) at the second. CE with the background channel (a constant 0 logit
    there) is hand-computed."""
    pixels = np.zeros((1, 2, 3), np.uint8)
    patches = PatchSet([Path(__file__)], np.array([[1, 0, 0]], np.uint8), WSSS4LUAD, {0: pixels})
    pseudo = np.zeros((1, 2), np.uint8)
    painted = np.array([[IGNORE_INDEX, 1]], np.uint8)
    painted_per_patch, others = painted_on_patches(
        patches, [SparseLabels(patches.paths[0], pixels, painted)])
    assert others == []  # the patch itself, not a new sample
    targets = override_targets([[pseudo]], painted_per_patch)
    assert targets[0][0].tolist() == [[0, 1]]
    assert painted_per_patch[0].tolist() == painted.tolist()

    logits = torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 3, 1, 2)
    loss_fn = build_loss(SegmenterConfig(loss="ce"))
    masks = torch.from_numpy(targets[0][0][None].astype(np.int64))
    result = loss_fn([SegmenterOutput(logits)], LossTargets([masks]), LossContext(3))
    result = with_partial_cross_entropy(result, logits, torch.from_numpy(
        painted_per_patch[0][None].astype(np.int64)), background_index=3)

    first = math.log(1 + 3 * math.exp(-2))  # tumor at logits (2, 0, 0, 0)
    second = math.log(math.e + 3)  # stroma at logits (1, 0, 0, 0)
    assert result.parts["ce"] == pytest.approx((first + second) / 2, rel=1e-5)
    assert result.parts["corrections"] == pytest.approx(second, rel=1e-5)
    assert float(result.loss) == pytest.approx((first + second) / 2 + second, rel=1e-5)


def test_no_painted_pixel_in_a_batch_adds_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    result = with_partial_cross_entropy(
        build_loss(SegmenterConfig(loss="ce"))([SegmenterOutput(logits)],
                                              LossTargets([torch.zeros(1, 2, 2, dtype=int)]),
                                              LossContext(3)),
        logits, torch.full((1, 2, 2), IGNORE_INDEX), background_index=3)
    assert result.parts["corrections"] == 0.0 and torch.isfinite(result.loss)
    result.loss.backward()
    assert torch.isfinite(logits.grad).all()


def paint(run, layout, patches):
    """Brush strokes on two val images and one training patch, saved in the run."""
    store = CorrectionStore.of_run(run)
    val = layout.eval_set("val")
    for path in val.image_paths[:2]:
        labels = np.zeros(read_rgb(path).shape[:2], np.uint8)
        labels[disk((60, 60), 10, shape=labels.shape)] = 2  # stroma
        labels[disk((120, 100), 8, shape=labels.shape)] = 1  # tumor
        store.save(Correction(path, labels))
    labels = np.zeros(patches.image(0).shape[:2], np.uint8)
    labels[disk((80, 80), 12, shape=labels.shape)] = 3  # normal
    store.save(Correction(patches.paths[0], labels))
    return read_rgb(val.image_paths[0])


def test_finetune_on_real_patches_stops_resumes_and_keeps_the_original(trained_run, layout):
    run, config, patches = trained_run
    base_weights = load_checkpoint(run.segmenter_checkpoint("ce"), kind="segmenter")
    preview_image = paint(run, layout, patches)

    stop, first = StopToken(), []
    for event in finetune_with_corrections(run, config, patches, epochs=2, device="cpu",
                                           stop=stop, preview=preview_image):
        first.append(event)
        if isinstance(event, Batch) and event.index == 0 and event.epoch == 0:
            stop.request()
    assert isinstance(first[-1], Done) and first[-1].stopped
    folder = run.segmenter_dir("ce-corrections")
    last = load_checkpoint(folder / "last.pt", kind="segmenter")
    assert (last["training"]["epoch"], last["training"]["batch"]) == (0, 1)

    second = list(finetune_with_corrections(run, config, patches, epochs=2, device="cpu",
                                            preview=preview_image))
    batches = [(e.epoch, e.index) for e in second if isinstance(e, Batch)]
    assert batches[0] == (0, 1)
    # 3 corrected images (one a patch) + 6 replay patches = 9 samples: 2 batches of 4.
    assert batches == [(0, 1), (1, 0), (1, 1)]
    done = second[-1]
    assert isinstance(done, Done) and not done.stopped
    assert done.result == run.segmenter_checkpoint("ce-corrections")
    assert run.is_complete("segmenter:ce-corrections")

    previews = [e for e in second if isinstance(e, Preview) and e.name == "prediction"]
    assert len(previews) == 2
    assert previews[0].data["labels"].shape == preview_image.shape[:2]
    rows = (folder / "losses.csv").read_text().splitlines()
    assert "corrections" in rows[0].split(",")
    values = [float(r.split(",")[rows[0].split(",").index("corrections")]) for r in rows[1:]]
    assert all(v > 0 for v in values)

    tuned, payload = load_segmenter(done.result)
    base_now = load_checkpoint(run.segmenter_checkpoint("ce"), kind="segmenter")
    name = next(k for k, v in base_weights["state_dict"].items() if v.dtype.is_floating_point
                and v.ndim == 4)
    assert torch.equal(base_now["state_dict"][name], base_weights["state_dict"][name])
    assert not torch.equal(payload["state_dict"][name], base_weights["state_dict"][name])
    assert payload["config"]["input_size"] == base_weights["config"]["input_size"]


def test_finetune_without_corrections_or_base_model_says_what_to_do(tmp_path, layout,
                                                                   trained_run):
    run, config, patches = trained_run
    empty = RunDirectory(tmp_path / "empty")
    empty.create(config)
    with pytest.raises(CheckpointError, match="train it first"):
        next(finetune_with_corrections(empty, config, patches))
    (run.root / "corrections").rename(tmp_path / "moved")
    try:
        with pytest.raises(DatasetError, match="no corrections"):
            next(finetune_with_corrections(run, config, patches))
    finally:
        (tmp_path / "moved").rename(run.root / "corrections")


def test_a_slide_region_is_read_at_its_painted_resolution(sample_slide_path):
    """A slide correction trains on the slide's own pixels of its region, at its resolution."""
    from napari_histo_wsss.core.corrections.store import correction_pixels
    from napari_histo_wsss.core.wsi.slides import open_slide, read_region

    labels = np.zeros((64, 96), np.uint8)
    labels[10:30, 10:50] = 2
    correction = Correction(sample_slide_path, labels, kind="slide", region=(256, 512, 128, 192),
                            downsample=2.0)
    pixels = correction_pixels(correction)
    assert pixels.shape == (64, 96, 3) and pixels.dtype == np.uint8
    # The sample's level 1 is 2.0003x, finer than 2x is level 0: read there and scaled down.
    with open_slide(sample_slide_path) as slide:
        assert slide.downsamples[1] > 2.0
        region = read_region(slide, 0, 256, 512, 128, 192)
    expected = np.asarray(Image.fromarray(region).resize((96, 64), Image.BILINEAR))
    assert np.array_equal(pixels, expected)
