"""Superpixel smoothing of class maps: hand-made segments, and real patches through the recipe."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.presets import preset
from napari_histo_wsss.core.config.run_config import PseudoMaskConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.models.classifier import build_classifier
from napari_histo_wsss.core.stage1.pseudo_masks import pseudo_masks_for_images
from napari_histo_wsss.core.stage1.superpixels import average_within, superpixels


def test_each_segment_takes_its_channels_mean():
    maps = torch.tensor([[[1.0, 3.0, 10.0], [5.0, 7.0, 20.0]],
                         [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]])
    segments = torch.tensor([[0, 0, 1], [0, 0, 2]])
    smoothed = average_within(maps, segments)
    assert torch.allclose(smoothed[0], torch.tensor([[4.0, 4.0, 10.0], [4.0, 4.0, 20.0]]))
    assert torch.allclose(smoothed[1], torch.tensor([[4.0, 4.0, 4.0], [4.0, 4.0, 10.0]]))


def test_superpixels_cover_a_real_patch_with_dense_labels(sample_dataset_dir):
    image = find_dataset(sample_dataset_dir).patches().image(0)
    segments = superpixels(image, size=24)
    assert segments.shape == image.shape[:2]
    labels = np.unique(segments)
    assert labels[0] == 0 and np.array_equal(labels, np.arange(len(labels)))
    expected = image.shape[0] * image.shape[1] / 24**2
    assert 0.3 * expected < len(labels) < 3 * expected


def test_smoothed_masks_are_constant_inside_each_superpixel(sample_dataset_dir):
    layout = find_dataset(sample_dataset_dir)
    patches = layout.patches()
    config = preset("recommended", "fast", num_patches=len(patches))
    torch.manual_seed(0)
    model = build_classifier(config.classifier, WSSS4LUAD.num_classes, layout.spec)
    recipe = dataclasses.replace(config.pseudo_masks, superpixel_size=24, white_plane=False)
    images = [patches.image(0), patches.image(1)]
    results = pseudo_masks_for_images(model, images, patches.labels[:2], recipe, layout.spec)
    for image, result in zip(images, results, strict=True):
        mask = result.masks["final"]
        segments = superpixels(image, 24)
        for segment in np.unique(segments):
            assert len(np.unique(mask[segments == segment])) == 1
        kept = set(np.flatnonzero(result.kept))
        assert set(np.unique(mask)) <= kept


def test_a_negative_superpixel_size_is_refused():
    with pytest.raises(ConfigError, match="superpixel_size"):
        PseudoMaskConfig(superpixel_size=-4).validate()
