"""Self-training (stage2/self_training.py): a teacher trained on the bundled real patches'
pseudo-masks relabels them within their labels, and the strategy trains on what it wrote."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_histo_wsss.core.config.presets import preset
from napari_histo_wsss.core.config.run_config import (
    REFINED_TARGET,
    PseudoMaskConfig,
    RunConfig,
    SegmenterConfig,
)
from napari_histo_wsss.core.data.datasets import (
    EvalSet,
    read_mask,
    write_palette_mask,
)
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.events import Batch, Done, Message, Started, StopToken
from napari_histo_wsss.core.pipeline import _stage_jobs
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.runs.stages import REFINED_MASKS
from napari_histo_wsss.core.runs.status import StageState, run_status
from napari_histo_wsss.core.stage2.self_training import TEACHER_REPORT, refine_pseudo_masks
from napari_histo_wsss.core.stage2.train_segmenter import train_segmenter

TEACHER = {"arch": "pspnet", "encoder_depth": 3, "epochs": 1}


@pytest.fixture(scope="module")
def layout(sample_layout):
    return sample_layout


@pytest.fixture(scope="module")
def patches(layout):
    """Every third patch of the sample (14, every label combination)."""
    patches = layout.patches()
    return patches.subset(range(0, len(patches), 3))


def taught_run(root, patches, layout) -> tuple[RunDirectory, RunConfig]:
    """A run whose ``final`` pseudo-masks put each patch's classes in horizontal bands
    (white: background), with a one-epoch teacher and a strategy that reads the refined
    masks."""
    config = RunConfig(
        dataset=layout.spec.to_dict(), data_dir=str(layout.root),
        pseudo_masks=PseudoMaskConfig(teacher=TEACHER),
        segmenter=SegmenterConfig(arch="pspnet", encoder_depth=3, loss="ce", epochs=1,
                                  batch_size=6, input_size=None, targets=(REFINED_TARGET,)))
    config.validate()
    run = RunDirectory(root)
    run.create(config)
    for index, path in enumerate(patches.paths):
        image = patches.image(index)
        classes = np.flatnonzero(patches.labels[index])
        bands = classes[np.arange(image.shape[0]) * len(classes) // image.shape[0]]
        mask = np.repeat(bands[:, None], image.shape[1], axis=1).astype(np.uint8)
        mask[image.mean(axis=-1) > 220] = layout.spec.background_index
        write_palette_mask(run.pseudo_mask_dir("final") / path.name, mask, layout.spec)
    return run, config


def test_the_teacher_relabels_each_patch_within_its_labels(tmp_path, patches, layout):
    run, config = taught_run(tmp_path / "run", patches, layout)
    full = layout.eval_set("val")
    val = EvalSet(full.image_paths[:2], full.mask_paths[:2], full.spec)
    events = list(refine_pseudo_masks(run, config, patches, device="cpu", val=val))
    assert [e.stage for e in events if isinstance(e, Started)] == [REFINED_MASKS]
    assert isinstance(events[-1], Done) and not events[-1].stopped
    assert events[-1].result == run.pseudo_mask_dir(REFINED_TARGET)
    assert run.is_complete(REFINED_MASKS)
    assert (run.teacher_dir / "model.pt").is_file()
    assert not run.segmenter_strategies()  # the teacher is no strategy

    background = layout.spec.background_index
    relabelled = 0
    for index, path in enumerate(patches.paths):
        old = read_mask(run.pseudo_mask_dir("final") / path.name, layout.spec)
        new = read_mask(run.pseudo_mask_dir(REFINED_TARGET) / path.name, layout.spec)
        assert new.shape == old.shape
        allowed = {*np.flatnonzero(patches.labels[index]), background}
        assert set(np.unique(new)) <= allowed
        assert np.array_equal(new == background, old == background)
        relabelled += int((new != old).sum())
    assert relabelled > 0  # a network trained one epoch does not redraw straight bands
    report = (run.teacher_dir / TEACHER_REPORT).read_text()
    assert '"val_label_gated"' in report and '"relabelled_tissue_fraction"' in report
    said = " ".join(e.text for e in events if isinstance(e, Message))
    assert "relabelled" in said and "restricted to each image's classes" in said

    # The strategy trains on the refined masks, not on the final ones.
    list(train_segmenter(run, config, patches, device="cpu"))
    assert run.is_complete("segmenter:ce")


def test_a_stop_in_the_teacher_stops_the_stage_and_resume_finishes_it(tmp_path, patches,
                                                                       layout):
    run, config = taught_run(tmp_path / "run", patches, layout)
    stop = StopToken()
    first = []
    for event in refine_pseudo_masks(run, config, patches, device="cpu", stop=stop):
        first.append(event)
        if isinstance(event, Batch):
            stop.request()
    assert isinstance(first[-1], Done) and first[-1].stopped
    assert first[-1].stage == REFINED_MASKS and not run.is_complete(REFINED_MASKS)
    assert run_status(run.root).pseudo_masks is StageState.MISSING
    second = list(refine_pseudo_masks(run, config, patches, device="cpu"))
    resumed = [(e.stage, e.epoch, e.index) for e in second if isinstance(e, Batch)]
    assert resumed[0] == (REFINED_MASKS, 0, 1)
    assert run.is_complete(REFINED_MASKS)
    assert len(list(run.pseudo_mask_dir(REFINED_TARGET).glob("*.png"))) == len(patches)


def test_teacher_settings_are_the_segmenters_with_the_teachers_changes():
    segmenter = SegmenterConfig(arch="deeplabv3plus", appearance_weight=0.5, context=80,
                                targets=(REFINED_TARGET,),
                                companion={"arch": "pspnet", "encoder_depth": 3})
    config = RunConfig(pseudo_masks=PseudoMaskConfig(teacher=TEACHER), segmenter=segmenter)
    config.validate()
    teacher = config.teacher_settings()
    assert (teacher.arch, teacher.encoder_depth, teacher.epochs) == ("pspnet", 3, 1)
    assert teacher.targets == ("final",) and teacher.companion == {}
    assert (teacher.appearance_weight, teacher.context) == (0.5, 80)
    assert RunConfig().teacher_settings() is None
    with pytest.raises(ConfigError, match="only a teacher makes"):
        RunConfig(segmenter=segmenter).validate()
    with pytest.raises(ConfigError, match="unknown settings \\['depth'\\]"):
        dataclasses.replace(config, pseudo_masks=PseudoMaskConfig(teacher={"depth": 3})
                            ).validate()
    with pytest.raises(ConfigError, match="epochs"):
        dataclasses.replace(config, pseudo_masks=PseudoMaskConfig(teacher={"epochs": 0})
                            ).validate()


def test_a_teacher_is_a_stage_between_the_pseudo_masks_and_the_segmenter(tmp_path, layout):
    config = preset("recommended", "fast", num_patches=40)
    assert not config.pseudo_masks.teacher  # opt-in: +0.5 on one seed, over the fast budget
    config.pseudo_masks.teacher = dict(TEACHER)
    config.segmenter.targets = (REFINED_TARGET,)
    config.validate()
    run = RunDirectory(tmp_path / "run")
    stages = [stage for stage, _ in _stage_jobs(run, config, layout.patches(), None, "cpu",
                                                StopToken(), ["ce"])]
    assert stages == ["classifier", "pseudo-masks", REFINED_MASKS, "segmenter:ce"]


@pytest.mark.parametrize("method", ["recommended", "esfan", "arml", "msv-onss", "cam-ce"])
def test_self_training_gives_any_cam_method_the_same_teacher(method):
    for schedule, epochs in (("fast", 9), ("long", 18), ("paper", 20)):
        config = preset(method, schedule, num_patches=557, self_train=True)
        config.validate()
        teacher = config.teacher_settings()
        assert REFINED_TARGET in config.segmenter.targets
        assert "final" not in config.segmenter.targets
        assert (teacher.arch, teacher.loss, teacher.tta, teacher.epochs) == (
            "pspnet", "ce", "none", epochs)
        assert teacher.targets == ("final",) and teacher.appearance_weight == 0.5
    assert not preset(method, "fast", num_patches=557).pseudo_masks.teacher


@pytest.mark.parametrize(("method", "reason"), [("mlps", "learns from layer-1, layer-2"),
                                                 ("hisynseg", "synthetic images")])
def test_self_training_is_refused_where_no_final_masks_are_learnt(method, reason):
    with pytest.raises(ConfigError, match=reason):
        preset(method, "fast", num_patches=557, self_train=True)
