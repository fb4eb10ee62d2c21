"""BatchNorm folding for class maps: same maps, fewer modules, and a refusal where it would
change the output."""

from __future__ import annotations

import torch
from torch import nn

from napari_histo_wsss.core.config.run_config import ClassifierConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.models.classifier import build_classifier
from napari_histo_wsss.core.models.folding import fold_batchnorm
from napari_histo_wsss.core.stage1.cams import class_activation_maps


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(module, nn.BatchNorm2d) for module in model.modules())


def _trained_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, as a trained model has (fresh ones fold to identity)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
    return model.eval()


def test_folded_classifier_gives_the_same_gradcam_maps_without_batchnorm(sample_dataset_dir):
    sample_patch = find_dataset(sample_dataset_dir).patches().image(0)
    torch.manual_seed(0)
    model = _trained_statistics(build_classifier(ClassifierConfig(), WSSS4LUAD.num_classes,
                                                 WSSS4LUAD))
    folded = fold_batchnorm(model)
    assert folded is not model
    assert _batchnorms(model) > 40 and _batchnorms(folded) == 0
    images = model.normalise(torch.tensor(sample_patch).permute(2, 0, 1)[None].repeat(2, 1, 1, 1))
    layers = ("-1", "-2", "-3")
    expected = class_activation_maps(model, images, layers, "gradcam")
    got = class_activation_maps(folded, images, layers, "gradcam")
    assert torch.allclose(got.logits, expected.logits, atol=1e-4)
    for name, maps in expected.maps.items():
        span = float(maps.max() - maps.min())
        assert float((got.maps[name] - maps).abs().max()) < 1e-2 * span
        assert (got.maps[name].argmax(1) == maps.argmax(1)).float().mean() > 0.99
    assert _batchnorms(model) > 40  # the original is untouched


class _NormReadsTheInput(nn.Module):
    """A conv registered before a BatchNorm that normalises the block's input, not the conv's
    output: folding by registration order would be wrong here."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.norm(x))


def test_a_model_the_fold_would_change_is_returned_as_it_is():
    torch.manual_seed(0)
    model = _trained_statistics(_NormReadsTheInput())
    assert fold_batchnorm(model) is model


def test_a_model_without_pairs_is_returned_as_it_is():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    assert fold_batchnorm(model) is model
