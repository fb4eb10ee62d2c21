"""Depthwise convolutions with the input gradient on the forward kernel: the same gradient,
the same class maps, and the ordinary path wherever it would not be exact."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from napari_histo_wsss.core.config.run_config import ClassifierConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.models.classifier import build_classifier
from napari_histo_wsss.core.models.depthwise_gradient import (
    DepthwiseConvFastGradient,
    is_replaceable,
    use_fast_depthwise_gradients,
)
from napari_histo_wsss.core.stage1.cams import class_activation_maps, frozen_for_class_maps


@pytest.mark.parametrize(("kernel", "padding", "dilation"), [
    (3, 1, 1), (5, 2, 1), (5, 4, 2), ((3, 5), (1, 2), 1), (3, 0, 1), (3, 2, 3),
])
def test_the_input_gradient_is_the_ordinary_one(kernel, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel, padding=padding, dilation=dilation, groups=8)
    conv.requires_grad_(False)
    x = torch.randn(2, 8, 13, 11, requires_grad=True)
    expected = conv(x)
    (expected_gradient,) = torch.autograd.grad(expected, x, torch.ones_like(expected) * 0.5
                                               + torch.linspace(-1, 1, expected.numel())
                                               .view_as(expected))
    fast = DepthwiseConvFastGradient(conv)
    got = fast(x)
    (got_gradient,) = torch.autograd.grad(got, x, torch.ones_like(got) * 0.5
                                          + torch.linspace(-1, 1, got.numel()).view_as(got))
    assert torch.equal(got, expected)
    assert got_gradient.shape == x.shape
    assert torch.allclose(got_gradient, expected_gradient, atol=1e-5)


def test_a_weight_that_wants_a_gradient_gets_one():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    fast = DepthwiseConvFastGradient(conv)
    fast(torch.randn(1, 4, 8, 8)).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_only_stride_one_depthwise_zero_padded_convolutions_are_replaced():
    assert is_replaceable(nn.Conv2d(4, 4, 3, padding=1, groups=4))
    assert not is_replaceable(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4))
    assert not is_replaceable(nn.Conv2d(4, 8, 3, padding=1, groups=4))  # two filters per channel
    assert not is_replaceable(nn.Conv2d(4, 4, 3, padding=1))
    assert not is_replaceable(nn.Conv2d(4, 4, 3, padding="same", groups=4))
    assert not is_replaceable(nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"))
    assert not is_replaceable(Conv2dSame(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="stride-1 depthwise"):
        DepthwiseConvFastGradient(nn.Conv2d(4, 4, 3, stride=2, groups=4))


def test_the_prepared_classifier_gives_the_same_gradcam_maps(sample_dataset_dir):
    patch = find_dataset(sample_dataset_dir).patches().image(0)
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(), WSSS4LUAD.num_classes, WSSS4LUAD).eval()
    depthwise = sum(is_replaceable(m) for m in model.modules())
    prepared = frozen_for_class_maps(model)
    assert sum(isinstance(m, DepthwiseConvFastGradient) for m in prepared.modules()) == depthwise
    assert depthwise >= 10  # EfficientNet-Lite0's stride-1 depthwise convolutions
    assert not any(isinstance(m, DepthwiseConvFastGradient) for m in model.modules())
    images = model.normalise(torch.tensor(patch).permute(2, 0, 1)[None].repeat(2, 1, 1, 1))
    layers = ("-1", "-2", "-3")
    for method in ("gradcam", "gradcampp"):
        expected = class_activation_maps(model, images, layers, method)
        got = class_activation_maps(prepared, images, layers, method)
        for name, maps in expected.maps.items():
            span = float(maps.max() - maps.min())
            assert float((got.maps[name] - maps).abs().max()) < 1e-3 * span, (method, name)


def test_wrapping_counts_and_is_done_in_place():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, groups=4))
    assert use_fast_depthwise_gradients(model) == 1
    assert isinstance(model[0], DepthwiseConvFastGradient)
    assert type(model[2]) is nn.Conv2d
