"""Batched CAM / Grad-CAM / Grad-CAM++ against the released per-image, per-class loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_histo_wsss.core.config.run_config import ClassifierConfig
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.models.classifier import build_classifier
from napari_histo_wsss.core.stage1.cams import CAM_METHODS, class_activation_maps

LAYERS = ("-1", "-2", "-3")


def reference_maps(model, images, method):
    """The released codes' way: a forward and a backward per image and class (the released
    loop also repeats them per layer, which gives the same gradients)."""
    layers = [model.backbone.resolve_layer(layer) for layer in LAYERS]
    per_layer = {layer: [] for layer in layers}
    for image in images:
        rows = {layer: [] for layer in layers}
        for c in range(model.num_classes):
            logits, activations = model.cam_forward(image[None], layers)
            gradients = torch.autograd.grad(logits[0, c], list(activations.values()))
            for (layer, activation), gradient in zip(activations.items(), gradients,
                                                     strict=True):
                a, g = activation[0].detach(), gradient[0]
                if method == "gradcam":
                    weights = g.mean(dim=(1, 2))
                else:  # Grad-CAM++ as docs/algorithms.md 2.2 writes it
                    alpha = g**2 / (2 * g**2 + a.sum(dim=(1, 2), keepdim=True) * g**3 + 1e-6)
                    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
                    weights = (alpha * F.relu(g)).sum(dim=(1, 2))
                rows[layer].append((weights[:, None, None] * a).sum(dim=0))
        for layer in layers:
            per_layer[layer].append(torch.stack(rows[layer]))
    return {layer: torch.stack(per_image) for layer, per_image in per_layer.items()}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ClassifierConfig(train_modules=("esf",), side_loss_weights=(0.2, 0.3, 0.5))
    return build_classifier(config, num_classes=3).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_batched_maps_equal_the_per_image_per_class_loop(model, images, method):
    batched = class_activation_maps(model, images, LAYERS, method).maps
    expected = reference_maps(model, images, method)
    # Grad-CAM++ divides by g^2-sized terms next to a 1e-6 constant, so float32 rounding of
    # batched vs single-image gradients shows up more there.
    tolerance = 1e-4 if method == "gradcam" else 5e-3
    for layer, maps in expected.items():
        assert batched[layer].shape == maps.shape
        assert torch.allclose(batched[layer], maps, atol=tolerance * maps.abs().max(),
                              rtol=tolerance), (layer, method)


def test_the_graph_starts_at_the_shallowest_layer_and_its_hook_is_removed(model, images,
                                                                         monkeypatch):
    shallowest = model.backbone.layer_module("-3")
    assert shallowest is not None and not shallowest._forward_hooks
    recorded = class_activation_maps(model, images, LAYERS, "gradcam").maps
    assert not shallowest._forward_hooks
    # A backbone that cannot name the layer's module: the input carries the graph instead.
    monkeypatch.setattr(type(model.backbone), "layer_module", lambda self, name: None)
    from_the_input = class_activation_maps(model, images, LAYERS, "gradcam").maps
    for layer, maps in from_the_input.items():
        assert torch.allclose(recorded[layer], maps, atol=1e-5 * maps.abs().max()), layer


@pytest.mark.parametrize("method", CAM_METHODS.names())
def test_every_method_maps_every_class_at_the_layer_resolution(model, images, method):
    # "-3" has a side head, so even plain CAMs have a classifier there.
    logits, maps = class_activation_maps(model, images, ["-1", "-3"], method)
    assert logits.shape == (2, 3) and not logits.requires_grad
    for layer in ("-1", "-3"):
        name = model.backbone.resolve_layer(layer)
        with torch.no_grad():
            height, width = model.backbone(images)[name].shape[-2:]
        assert maps[name].shape == (2, 3, height, width)
        assert torch.isfinite(maps[name]).all() and not maps[name].requires_grad


def test_gradcam_at_the_classifier_input_is_the_cam_up_to_a_constant(model, images):
    gradcam = class_activation_maps(model, images, ["-1"], "gradcam").maps
    cam = class_activation_maps(model, images, ["-1"], "cam").maps
    layer = model.feature_layer
    height, width = cam[layer].shape[-2:]
    assert torch.allclose(F.relu(gradcam[layer]) * height * width, cam[layer], atol=1e-4)


def test_cam_at_side_head_layers_uses_the_side_classifier(model, images):
    maps = class_activation_maps(model, images, ["-3"], "cam").maps
    layer = model.backbone.resolve_layer("-3")
    with torch.no_grad():
        activation = model.backbone(images)[layer]
        head = model.side_heads[model.side_layers.index(layer)]
        expected = F.relu(F.conv2d(F.relu(activation), head.conv.weight))
    assert torch.allclose(maps[layer], expected, atol=1e-5)


def test_plain_cam_needs_a_classifier_at_the_layer(images):
    plain = build_classifier(ClassifierConfig(), num_classes=3).eval()
    with pytest.raises(ConfigError, match="Grad-CAM"):
        class_activation_maps(plain, images, ["-2"], "cam")
    with pytest.raises(ConfigError, match="unknown CAM method"):
        class_activation_maps(plain, images, ["-1"], "scorecam")
