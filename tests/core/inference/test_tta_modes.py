"""The contract of every registered test-time augmentation, on a real patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.run_config import SegmenterConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.inference.predict import (
    TTA_MODES,
    SegmentationPredictor,
    predict_image,
)
from napari_histo_wsss.core.models.segmenter import build_segmenter


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    settings = SegmenterConfig(arch="pspnet", encoder_depth=3, weights="none")
    return build_segmenter(settings, WSSS4LUAD.num_classes).eval()


@pytest.fixture(scope="module")
def patch(sample_dataset_dir) -> np.ndarray:
    """A real patch cut to an odd size, so padding and cropping back are exercised."""
    return find_dataset(sample_dataset_dir).patches().image(0)[:61, :75]


def predictor(model, tta: str) -> SegmentationPredictor:
    return SegmentationPredictor(model, WSSS4LUAD, mean=(0.0,) * 3, std=(255.0,) * 3,
                                 input_size=64, tta=tta)


@pytest.mark.parametrize("tta", TTA_MODES.names())
def test_every_tta_mode_keeps_the_label_shape_and_gives_probabilities(model, patch, tta):
    labels, probabilities = predict_image(predictor(model, tta), patch)
    assert labels.shape == patch.shape[:2] and labels.dtype == np.uint8
    assert probabilities.shape == (WSSS4LUAD.num_classes, *patch.shape[:2])
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert labels.max() < WSSS4LUAD.num_classes


@pytest.mark.parametrize("tta", TTA_MODES.names())
def test_every_tta_mode_leaves_gated_out_classes_at_zero(model, tta):
    x = torch.rand(1, 3, 32, 32)
    present = torch.ones(1, WSSS4LUAD.num_classes, 32, 32, dtype=torch.bool)
    present[:, 1] = False
    with torch.no_grad():
        probabilities = TTA_MODES.get(tta)(predictor(model, tta), x, present)
    assert probabilities.shape == present.shape
    assert probabilities[:, 1].abs().max() == 0
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(1, 32, 32), atol=1e-4)


def test_unknown_tta_mode_is_explained(model):
    with pytest.raises(ConfigError, match="unknown TTA mode 'rot8': choose one of none"):
        predictor(model, "rot8")
