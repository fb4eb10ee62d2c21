"""Pseudo-masks fused where training patches overlap: the rule on hand-made maps, the job on
the bundled real crops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.presets import preset
from napari_histo_wsss.core.data.datasets import find_dataset, read_mask
from napari_histo_wsss.core.data.stitching import Placement, StitchedImage, stitch_patches
from napari_histo_wsss.core.stage1.overlap_fusion import OverlapFusion, fused_maps
from napari_histo_wsss.core.stage1.pseudo_masks import generate_pseudo_masks


@dataclass
class _Output:
    maps: dict
    kept: np.ndarray


def _strip(width: int, offset: int) -> StitchedImage:
    """Two 1 x ``width`` patches, the second ``offset`` pixels right of the first."""
    covered = np.ones((1, width + offset), bool)
    return StitchedImage("s", np.zeros((1, width + offset, 3), np.uint8), covered,
                         [Placement(0, 0, 0, 1, width), Placement(1, 0, offset, 1, width)])


def test_overlaps_average_the_maps_and_keep_what_every_gate_kept():
    image = _strip(4, 2)
    first = _Output({"m": np.stack([np.full((1, 4), 1.0), np.zeros((1, 4))])},
                    np.array([True, True]))
    second = _Output({"m": np.stack([np.full((1, 4), 0.0), np.full((1, 4), 0.5)])},
                     np.array([False, True]))
    maps, allowed = fused_maps(image, [first, second], "m")
    assert maps.shape == (2, 1, 6)
    assert np.allclose(maps[0, 0], [1, 1, 0.5, 0.5, 0, 0])
    assert np.allclose(maps[1, 0], [0, 0, 0.25, 0.25, 0.5, 0.5])
    assert allowed[0, 0].tolist() == [True, True, False, False, False, False]
    assert allowed[1, 0].all()


def test_gates_that_share_no_class_allow_each_others_classes():
    image = _strip(2, 1)
    first = _Output({"m": np.zeros((2, 1, 2))}, np.array([True, False]))
    second = _Output({"m": np.zeros((2, 1, 2))}, np.array([False, True]))
    _, allowed = fused_maps(image, [first, second], "m")
    assert allowed[:, 0, 1].tolist() == [True, True]
    assert allowed[:, 0, 0].tolist() == [True, False]
    assert allowed[:, 0, 2].tolist() == [False, True]


def test_fusion_hands_back_a_stitched_image_once_its_last_patch_arrives():
    fusion = OverlapFusion([_strip(2, 1)])
    assert fusion.order(4) == [0, 1, 2, 3]
    assert fusion.holds(1) and not fusion.holds(2)
    assert list(fusion.add(1, "b")) == []
    (image, outputs), = fusion.add(0, "a")
    assert outputs == ["a", "b"] and not fusion.pending


@pytest.fixture(scope="module")
def fused_run(untrained_classifier_run, sample_dataset_dir):
    layout = find_dataset(sample_dataset_dir)
    patches = layout.patches()
    chosen = [i for i, p in enumerate(patches.paths) if p.name.startswith(("test01-", "test24-"))]
    patches = patches.subset(chosen + [0])
    config = preset("recommended", "fast", num_patches=len(patches))
    config.dataset = layout.spec.to_dict()
    assert config.pseudo_masks.fuse_overlaps
    run = untrained_classifier_run(config, layout.spec, "fused-run")
    list(generate_pseudo_masks(run, config, patches, device=torch.device("cpu")))
    return run, patches


def test_fused_final_masks_agree_wherever_patches_overlap(fused_run):
    run, patches = fused_run
    stitched = stitch_patches(patches)
    assert len(stitched) == 2
    status = run.status()["pseudo-masks"]
    assert (status["stitched_images"], status["stitched_patches"]) == (2, 8)
    masks = [read_mask(run.pseudo_mask_dir("final") / p.with_suffix(".png").name, patches.spec)
             for p in patches.paths]
    for image in stitched:
        canvas = image.paste([masks[p.index] for p in image.placements], 255)
        for placement in image.placements:
            assert np.array_equal(canvas[placement.box], masks[placement.index])
        assert set(np.unique(canvas[image.covered])) <= set(range(patches.spec.num_classes + 1))
    assert masks[-1].shape == patches.image(len(patches) - 1).shape[:2]


def test_the_in_memory_fusion_gives_the_masks_the_job_wrote(fused_run):
    from napari_histo_wsss.core.models.classifier import load_classifier
    from napari_histo_wsss.core.stage1.pseudo_masks import fused_pseudo_masks

    run, patches = fused_run
    model, _ = load_classifier(run.classifier_checkpoint, spec=patches.spec)
    image = stitch_patches(patches)[0]
    result = fused_pseudo_masks(model, image, patches, run.config().pseudo_masks)
    assert result.masks["final"].shape == image.covered.shape
    (maps,) = result.maps.values()
    assert maps.shape == (patches.spec.num_classes, *image.covered.shape)
    for placement in image.placements:
        written = read_mask(run.pseudo_mask_dir("final")
                            / patches.paths[placement.index].with_suffix(".png").name,
                            patches.spec)
        assert np.array_equal(result.masks["final"][placement.box], written)
