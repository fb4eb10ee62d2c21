"""Class offsets refitted on a user's corrections: the targets, the fit, the fine-tune's step."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
from skimage.draw import disk

from napari_histo_wsss.core.corrections import calibrate
from napari_histo_wsss.core.corrections.calibrate import (
    StrokeTargets,
    calibrate_with_corrections,
    window_sample,
)
from napari_histo_wsss.core.corrections.finetune import finetune_with_corrections
from napari_histo_wsss.core.corrections.store import Correction
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import read_rgb
from napari_histo_wsss.core.events import Done, Message
from napari_histo_wsss.core.inference import calibration
from napari_histo_wsss.core.inference.predict import (
    CLASS_OFFSETS_FILE,
    GATE_CHOICE_FILE,
    SegmentationPredictor,
)
from napari_histo_wsss.core.models.segmenter import (
    SegmenterOutput,
)


class TumourEverywhere(torch.nn.Module):
    """A 'segmenter' whose logits favour tumour (class 0) at every pixel."""

    input_multiple = 1

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3, *x.shape[-2:]) + self.anchor
        logits[:, 0] += 4.0
        return SegmenterOutput(logits)


def test_the_target_is_the_stroke_refined_prediction_without_glass_or_painted_background():
    predictor = SegmentationPredictor(TumourEverywhere(), WSSS4LUAD, input_size=64,
                                      mean=(0.0,) * 3, std=(255.0,) * 3)
    image = np.full((120, 160, 3), 120, np.uint8)
    image[5:35, 5:45] = (180, 90, 140)  # the painted stroma has its own colour
    image[:, 120:] = 250  # glass on the right (above WSSS4LUAD's white threshold)
    image[85:105, 125:155] = (245, 230, 240)  # pale, still above the threshold
    painted = np.zeros((120, 160), np.uint8)
    painted[10:30, 10:40] = 2  # stroma on tissue
    painted[60:70, 10:20] = 4  # painted background (class index 3 + 1)
    painted[90:100, 130:150] = 3  # normal painted on glass: a tissue class, so it counts
    log_p, target = window_sample(predictor, image, painted, per_image=10**6)

    glass = np.zeros((120, 160), bool)
    glass[:, 120:] = True
    kept = (~glass | (painted == 3)) & (painted != 4)
    assert len(target) == kept.sum() and log_p.shape == (kept.sum(), 3)
    assert np.allclose(np.exp(log_p).sum(axis=1), 1, atol=1e-4)  # probabilities, no strokes
    assert (np.exp(log_p).argmax(axis=1) == 0).all()  # the network's tumour, not the strokes
    assert set(np.unique(target)) <= {0, 1, 2}
    assert (target == 1).sum() >= 20 * 30 and (target == 2).sum() == 10 * 20
    # Far from every stroke, in the other colour, the target is the prediction: tumour.
    by_pixel = np.full((120, 160), -1)
    by_pixel[kept] = target
    assert (by_pixel[100:120, 60:110] == 0).all()
    few_log_p, few = window_sample(predictor, image, painted, per_image=50)
    assert len(few) == 50 and few_log_p.shape == (50, 3)


def stroma_strokes(paths) -> list[Correction]:
    """Wide stroma strokes on each image (a user telling the model 'this is stroma')."""
    corrections = []
    for path in paths:
        labels = np.zeros(read_rgb(path).shape[:2], np.uint8)
        labels[disk((80, 80), 40, shape=labels.shape)] = 2
        corrections.append(Correction(path, labels))
    return corrections


def test_offsets_are_refitted_on_corrections_and_need_enough_images(trained_run, layout,
                                                                     monkeypatch):
    run = trained_run[0]
    val = layout.eval_set("val")
    corrections = stroma_strokes(val.image_paths[:3])
    saved = run.segmenter_dir("ce") / CLASS_OFFSETS_FILE
    saved.unlink(missing_ok=True)
    assert calibrate_with_corrections(run, "ce", corrections, None, "cpu") is None
    assert not saved.exists()  # 3 images < MIN_CLASS_IMAGES: nothing fitted, nothing saved

    monkeypatch.setattr(calibration, "MIN_CLASS_IMAGES", 2)
    monkeypatch.setattr(calibrate, "MIN_CLASS_IMAGES", 2)
    record = calibrate_with_corrections(run, "ce", corrections, None, "cpu")
    assert record == json.loads(saved.read_text())
    assert (record["images"], record["corrected_images"]) == (0, 3)
    assert "stroma" in record["fitted_classes"]
    assert record["miou_with"] >= record["miou_without"]
    assert record["use"] == (record["miou_with"] >= record["miou_without"] +
                             calibration.MIN_GAIN)
    line = calibration.describe_offsets(record)
    assert "3 corrected images" in line and "val images" not in line

    pooled = calibrate_with_corrections(run, "ce", corrections, val, "cpu")
    assert (pooled["images"], pooled["corrected_images"]) == (len(val), 3)
    assert f"{len(val)} val images and 3 corrected images" in calibration.describe_offsets(pooled)
    # Enough images, but no class seen in enough of them: the saved offsets stay as they were.
    monkeypatch.setattr(calibration, "MIN_CLASS_IMAGES", 100)
    before = saved.read_bytes()
    assert calibrate_with_corrections(run, "ce", corrections, val, "cpu") is None
    assert saved.read_bytes() == before
    assert len(StrokeTargets([*corrections, Correction(val.image_paths[4],
                                                       np.zeros((8, 8), np.uint8))])) == 3


def test_the_finetune_refits_its_offsets_on_the_corrections(trained_run, layout):
    run, config, patches = trained_run
    config = replace(config, segmenter=replace(config.segmenter, fit_class_offsets=True))
    (run.segmenter_dir("ce") / CLASS_OFFSETS_FILE).unlink(missing_ok=True)
    gate_choice = '{"use": false}'  # val dropped the base's class gate
    (run.segmenter_dir("ce") / GATE_CHOICE_FILE).write_text(gate_choice)
    val = layout.eval_set("val")
    corrections = stroma_strokes(val.image_paths[:3])
    events = list(finetune_with_corrections(run, config, patches, corrections=corrections,
                                            epochs=1, device="cpu", resume=False))
    lines = [e.text for e in events if isinstance(e, Message)]
    assert isinstance(events[-1], Done) and not events[-1].stopped
    assert any("class offsets as before the corrections" in line for line in lines)
    saved = run.segmenter_dir("ce-corrections") / CLASS_OFFSETS_FILE
    assert not saved.exists()  # the base had none to inherit, and 3 images fit none
    # The base's val choices reach the fine-tuned model (the trainer clears its folder's).
    assert (run.segmenter_dir("ce-corrections") / GATE_CHOICE_FILE).read_text() == gate_choice

    events = list(finetune_with_corrections(run, config, patches, corrections=corrections,
                                            epochs=1, device="cpu", resume=False,
                                            calibration_set=val))
    record = json.loads(saved.read_text())
    assert (record["images"], record["corrected_images"]) == (len(val), 3)
    assert calibration.describe_offsets(record) in [e.text for e in events
                                                    if isinstance(e, Message)]
    no_offsets = replace(config, segmenter=replace(config.segmenter, fit_class_offsets=False))
    saved.unlink()
    events = list(finetune_with_corrections(run, no_offsets, patches, corrections=corrections,
                                            epochs=1, device="cpu", resume=False,
                                            calibration_set=val))
    assert not saved.exists() and not any(isinstance(e, Message) and "class offsets" in e.text
                                          for e in events)
