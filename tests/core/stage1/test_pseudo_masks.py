"""Pseudo-mask rules on hand-made tensors, and the generation job on real patches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_wsss.core.config.presets import preset
from napari_histo_wsss.core.config.run_config import PseudoMaskConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.events import Done, StopToken
from napari_histo_wsss.core.models.classifier import load_classifier
from napari_histo_wsss.core.stage1.pseudo_masks import (
    GATINGS,
    combine_layer_maps,
    generate_pseudo_masks,
    labels_from_maps,
    layer_folder,
    normalise_jointly,
    predicted_classes,
    pseudo_mask_report,
    pseudo_masks_for_images,
    vote,
    white_background,
)


def _maps(*planes) -> torch.Tensor:
    """(1, C, 1, W) from C lists of W scores."""
    return torch.tensor(planes, dtype=torch.float32)[None, :, None, :]


def test_normalisation_is_joint_over_all_classes_before_gating():
    # Class 2 is absent but holds the maximum: it still sets the scale (as released).
    maps = _maps([0.0, 2.0], [1.0, 1.0], [0.0, 4.0])
    normalised = normalise_jointly(maps)
    assert torch.allclose(normalised[0, :, 0], torch.tensor([[0, 0.5], [0.25, 0.25], [0, 1]]))
    kept = torch.tensor([[True, True, False]])
    labels = labels_from_maps(normalised, kept, white=None)
    assert labels.tolist() == [[[1, 0]]]


def test_flat_maps_normalise_to_zero_not_nan():
    assert torch.equal(normalise_jointly(torch.ones(2, 3, 4, 4)), torch.zeros(2, 3, 4, 4))


def test_gated_out_class_never_wins_a_tie_at_zero():
    # ReLU'd CAMs are often 0 for every kept class: the pixel keeps a kept class (the first).
    normalised = _maps([0.0, 0.0], [0.0, 1.0], [0.0, 0.5])
    labels = labels_from_maps(normalised, torch.tensor([[False, True, True]]), white=None)
    assert labels.tolist() == [[[1, 1]]]


def test_vote_majority_with_ties_to_the_first_scale():
    m1 = torch.tensor([0, 0, 1, 2, 3])
    m075 = torch.tensor([0, 1, 2, 2, 1])
    m125 = torch.tensor([0, 1, 1, 0, 2])
    # all agree | other two agree | m1 agrees with m125 | m1 with m075 | all differ -> m1
    assert vote([m1, m075, m125]).tolist() == [0, 1, 1, 2, 3]
    assert vote([m1]).tolist() == m1.tolist()


def test_white_plane_drops_small_components_and_uses_4_connectivity():
    image = np.zeros((12, 12, 3), dtype=np.uint8)
    image[:6, :6] = 255  # 36 px white block: kept
    image[10, 10] = image[11, 11] = 255  # two diagonal pixels: two 1-px components
    image[8, 0:3] = 230  # gray 230: white at threshold 200, but only 3 px
    white = white_background(image, threshold=200, min_size=4)
    assert white[:6, :6].all()
    assert white.sum() == 36
    assert white_background(image, threshold=200, min_size=1).sum() == 36 + 2 + 3


def test_white_plane_beats_every_normalised_score():
    normalised = _maps([1.0, 1.0], [0.0, 0.2])
    white = torch.tensor([[[True, False]]])
    labels = labels_from_maps(normalised, torch.tensor([[True, True]]), white)
    assert labels.tolist() == [[[2, 0]]]  # background index = number of classes


def test_fusion_weights_raw_maps_before_normalising():
    shallow = _maps([4.0, 0.0], [0.0, 1.0])
    deep = _maps([0.0, 0.0], [1.0, 0.0])
    kept = torch.tensor([[True, True]])
    names = ["layer-2", "layer-1", "fused"]
    masks, normalised = combine_layer_maps([[shallow, deep]], names, (0.25, 0.75), kept, None)
    # fused = 0.25 shallow + 0.75 deep = [[1, 0], [0.75, 0.25]]
    assert torch.allclose(normalised["fused"][0, :, 0], torch.tensor([[1.0, 0.0], [0.75, 0.25]]))
    assert masks["fused"].tolist() == [[[0, 1]]]
    assert masks["layer-2"].tolist() == [[[0, 1]]]
    assert masks["layer-1"].tolist() == [[[1, 0]]]


def test_scales_are_voted_per_map():
    kept = torch.tensor([[True, True]])
    scale_maps = [[_maps([1.0, 0.0], [0.0, 1.0])],  # scale 1: [0, 1]
                  [_maps([0.0, 0.0], [1.0, 1.0])],  # 0.75:    [1, 1]
                  [_maps([0.0, 1.0], [1.0, 0.0])]]  # 1.25:    [1, 0]
    masks, _ = combine_layer_maps(scale_maps, ["layer-1"], None, kept, None)
    assert masks["layer-1"].tolist() == [[[1, 1]]]


def test_mean_fusion_averages_the_scales_maps_before_the_argmax():
    kept = torch.tensor([[True, True]])
    # Pixel 0: the native scale leans to class 0 weakly, the enlarged one to class 1 strongly;
    # voting two scales keeps the first, the mean follows the stronger evidence.
    native = _maps([0.6, 0.0], [0.4, 1.0])
    enlarged = _maps([0.0, 0.0], [1.0, 1.0])
    voted, _ = combine_layer_maps([[native], [enlarged]], ["layer-1"], None, kept, None, "vote")
    averaged, maps = combine_layer_maps([[native], [enlarged]], ["layer-1"], None, kept, None,
                                        "mean")
    assert voted["layer-1"].tolist() == [[[0, 1]]]
    assert averaged["layer-1"].tolist() == [[[1, 1]]]
    assert torch.allclose(maps["layer-1"][0, :, 0, 0], torch.tensor([0.3, 0.7]))


def test_an_unknown_scale_fusion_is_refused():
    with pytest.raises(ConfigError, match="scale_fusion"):
        PseudoMaskConfig(scale_fusion="max").validate()


def test_predicted_gating_falls_back_to_the_most_probable_class():
    probabilities = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.3, 0.2]])
    kept = predicted_classes(probabilities, threshold=0.31)
    assert kept.tolist() == [[True, False, True], [False, True, False]]


@pytest.mark.parametrize("gating", GATINGS.names())
def test_every_gating_keeps_at_least_one_class_per_image(gating):
    labels = np.array([[1, 0, 0], [0, 1, 1]], dtype=np.uint8)
    probabilities = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.2, 0.3]])
    kept = GATINGS.get(gating)(labels, probabilities, PseudoMaskConfig(gate_threshold=0.5))
    assert kept.dtype == torch.bool and kept.shape == (2, 3)
    assert kept.any(dim=1).all()


def test_label_gating_needs_labels():
    with pytest.raises(ConfigError, match="patch labels"):
        GATINGS.get("label")(None, torch.rand(1, 3), PseudoMaskConfig())


def test_layer_folder_names():
    assert layer_folder("-1") == "layer-1"
    assert layer_folder("b4_5") == "layer-b4_5"


# --------------------------------------------------------------------------------------------
# The job on real patches, with an untrained classifier saved as a checkpoint


@pytest.fixture(scope="module")
def untrained_run(untrained_classifier_run, sample_dataset_dir):
    layout = find_dataset(sample_dataset_dir)
    patches = layout.patches().subset(range(6))
    config = preset("mlps", "fast", num_patches=len(patches))
    config.dataset = layout.spec.to_dict()
    config.pseudo_masks.batch_size = 4
    run = untrained_classifier_run(config, layout.spec, "pm-run")
    return run, config, layout, patches


def test_generation_writes_palette_masks_named_like_patches(untrained_run):
    import zarr

    run, config, layout, patches = untrained_run
    done = [e for e in generate_pseudo_masks(run, config, patches, device=torch.device("cpu"))
            if isinstance(e, Done)][0]
    assert done.result == run.pseudo_mask_dir("final") and not done.stopped
    assert run.is_complete("pseudo_masks")
    for folder in ("final", "layer-1", "layer-2", "layer-3"):
        names = sorted(p.name for p in run.pseudo_mask_dir(folder).iterdir())
        assert names == sorted(p.name for p in patches.paths)
    for index, path in enumerate(patches.paths):
        with Image.open(run.pseudo_mask_dir("final") / path.name) as image:
            assert image.mode == "P"
            assert image.getpalette()[: 3 * 4] == layout.spec.palette()[: 3 * 4]
            mask = np.asarray(image)
        assert mask.shape == patches.image(index).shape[:2]
        present = set(np.flatnonzero(patches.labels[index])) | {layout.spec.background_index}
        assert set(np.unique(mask)) <= present
    same = np.asarray(Image.open(run.pseudo_mask_dir("layer-1") / patches.paths[0].name))
    assert np.array_equal(same, np.asarray(Image.open(run.pseudo_mask_dir("final")
                                                      / patches.paths[0].name)))
    store = zarr.open_group(str(run.cams_path), mode="r")
    assert store.attrs["patches"] == [p.name for p in patches.paths]
    assert store.attrs["maps"] == ["layer-1", "layer-2", "layer-3"]
    assert store.attrs["class_names"] == list(WSSS4LUAD.class_names)
    height, width = patches.image(0).shape[:2]
    first = store["000000"]
    assert first.dtype == np.float16
    assert first.shape == (3, 3, -(-height // 4), -(-width // 4))


def test_generation_stops_without_marking_complete(untrained_run):
    run, config, _, patches = untrained_run
    stop = StopToken()
    stop.request()
    events = list(generate_pseudo_masks(run, config, patches, device=torch.device("cpu"),
                                        stop=stop))
    assert isinstance(events[-1], Done) and events[-1].stopped
    assert not run.is_complete("pseudo_masks")


def test_in_memory_recipe_and_report(untrained_run):
    run, config, layout, patches = untrained_run
    model, _ = load_classifier(run.classifier_checkpoint, spec=layout.spec)
    images = [patches.image(0), patches.image(1)]
    results = pseudo_masks_for_images(model, images, patches.labels[:2], config.pseudo_masks,
                                      layout.spec)
    assert set(results[0].masks) == {"final", "layer-1", "layer-2", "layer-3"}
    assert results[0].maps["layer-1"].shape == (3, *images[0].shape[:2])
    assert results[0].maps["layer-1"].min() >= 0.0 and results[0].maps["layer-1"].max() <= 1.0

    val = layout.eval_set("val")
    val.image_paths, val.mask_paths = val.image_paths[:2], val.mask_paths[:2]
    report = pseudo_mask_report(run, config, val, "cpu")
    assert set(report) >= {"miou", "fwiou", "dice", "per_class", "recipe"}
    assert "label_gated" not in report
    assert (run.pseudo_mask_root / "report.json").is_file()
    predicted = dataclasses.replace(config, pseudo_masks=dataclasses.replace(
        config.pseudo_masks, gating="predicted", layers=("-1",)))
    report = pseudo_mask_report(run, predicted, val, "cpu")
    assert report["recipe"]["gating"] == "predicted"
    assert set(report["label_gated"]) >= {"miou", "per_class"}
