"""Stage-1 feature modules: PDA, coordinate attention, ARS, ESF, and where they act."""

from __future__ import annotations

import math

import pytest
import torch

from napari_histo_wsss.core.config.run_config import ClassifierConfig
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.models.classifier import build_classifier, side_head_layers
from napari_histo_wsss.core.models.feature_modules import (
    FEATURE_MODULES,
    CrissCrossAttention,
    InverseActivationGate,
    build_module,
    pda_gamma,
)

CONFIG = ClassifierConfig()


@pytest.mark.parametrize("name", FEATURE_MODULES.names())
def test_every_module_keeps_the_feature_shape_once_active(name):
    torch.manual_seed(0)
    module = build_module(name, 16, 3, CONFIG)
    epoch = next(e for e in range(10) if module.active(e))  # each acts in training
    features = torch.rand(2, 16, 6, 5, requires_grad=True)
    output = module(features, torch.randn(3, 16, 1, 1), epoch)
    assert output.shape == features.shape and torch.isfinite(output).all()
    output.sum().backward()  # the backbone learns through it, and so do its own parameters
    assert features.grad is not None and torch.isfinite(features.grad).all()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_unknown_module_is_explained():
    with pytest.raises(ConfigError, match="unknown stage-1 module 'cbam': choose one of pda"):
        build_module("cbam", 8, 3, CONFIG)


def test_pda_gamma_decays_each_epoch_until_the_floor():
    assert pda_gamma(CONFIG, 0) == 1.0
    assert pda_gamma(CONFIG, 1) == pytest.approx(0.98)
    assert pda_gamma(CONFIG, 20) == pytest.approx(0.98**20)  # 0.667: floor not reached
    fast = ClassifierConfig(pda_gamma_decay=0.5, pda_gamma_floor=0.65)
    assert pda_gamma(fast, 1) == 0.5 and pda_gamma(fast, 5) == 0.5  # one step below the floor


def test_pda_hides_each_class_peak_and_reweights_features():
    pda = build_module("pda", 2, 2, ClassifierConfig(pda_start_epoch=3, pda_gamma_decay=0.5))
    assert not pda.active(None) and not pda.active(2) and pda.active(3)
    features = torch.tensor([[[[1.0, 2.0, 4.0]], [[1.0, 1.0, 1.0]]]])  # (1, 2, 1, 3)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:, :, None, None]
    out = pda(features, weight, epoch=3)  # gamma: 1 -> 0.5, then below the floor, stays
    # class 0 map [1, 2, 4]: > 0.5 * 4 zeroed -> [1, 2, 0]; class 1 [1, 1, 1]: all > 0.5 * 1
    attention = torch.tensor([(1 + 0) / 2, (2 + 0) / 2, (0 + 0) / 2])
    assert torch.allclose(out, features * attention / attention.max())
    # Scaled to a maximum of 1: larger class scores do not inflate the features.
    assert torch.allclose(pda(features, 10 * weight, epoch=3), out)
    # No positive class score anywhere: features pass unchanged (no dead, gradient-free state).
    assert torch.equal(pda(features, -weight, epoch=3), features)


def test_coordinate_attention_gates_rows_and_columns():
    ca = build_module("coord_attention", 16, 3, CONFIG)
    for conv in (ca.squeeze, ca.rows, ca.columns):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    features = torch.rand(2, 16, 5, 7)
    assert torch.allclose(ca(features, None, 0), features * 0.25)
    torch.nn.init.normal_(ca.rows.weight)
    torch.nn.init.normal_(ca.squeeze.weight)
    out = ca(features + 1, None, 0)
    assert out.shape == features.shape and not ca.active(None) and ca.active(0)


def _criss_cross_by_loops(module: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = module.query(x)[0], module.key(x)[0], module.value(x)[0]
    _, height, width = q.shape
    out = torch.zeros_like(x[0])
    for i in range(height):
        for j in range(width):
            candidates = [(h, j) for h in range(height) if h != i] + [(i, w) for w in range(width)]
            energies = torch.stack([q[:, i, j] @ k[:, a, b] for a, b in candidates])
            weights = torch.softmax(energies, dim=0)
            out[:, i, j] = sum(wt * v[:, a, b] for wt, (a, b) in zip(weights, candidates,
                                                                      strict=True))
    return module.gamma * out + x[0]


def test_criss_cross_attention_matches_its_definition():
    torch.manual_seed(0)
    module = CrissCrossAttention(16)
    x = torch.rand(1, 16, 3, 4)
    assert torch.equal(module(x), x)  # gamma starts at 0
    with torch.no_grad():
        module.gamma.fill_(0.7)
    assert torch.allclose(module(x)[0], _criss_cross_by_loops(module, x), atol=1e-5)


def test_inverse_gate_damps_strong_activations():
    gate = InverseActivationGate(16)
    last = gate.channel_mlp[-1]
    for tensor in (last.weight, last.bias, gate.spatial.weight):
        torch.nn.init.zeros_(tensor)
    x = torch.rand(2, 16, 4, 4)
    assert torch.allclose(gate(x), x * 0.8 * 0.8)  # phi(0) = 0.8 for both gates
    with torch.no_grad():
        last.bias[3] = 2.0  # channel 3 scores high -> damped by 0.8 exp(-1.6)
    assert torch.allclose(gate(x)[:, 3], x[:, 3] * 0.8 * math.exp(-1.6) * 0.8, atol=1e-6)


def test_ars_and_esf_train_end_to_end():
    ars = build_module("ars", 16, 3, ClassifierConfig(ars_start_epoch=2))
    assert not ars.active(1) and ars.active(2) and not ars.active(None)
    esf = build_module("esf", 16, 3, CONFIG)
    assert esf.active(None)
    x = torch.rand(2, 16, 6, 6)
    loss = esf(ars(x, None, 2), None, 2).square().mean()
    loss.backward()
    for module in (ars, esf):  # everything is trained (unlike the released code)
        assert [n for n, p in module.named_parameters() if p.grad is None] == []


def test_training_modules_are_absent_from_the_cam_network():
    torch.manual_seed(0)
    config = ClassifierConfig(train_modules=("pda", "coord_attention", "ars"), weights="none",
                              pda_start_epoch=0, ars_start_epoch=0)
    model = build_classifier(config, num_classes=3).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = model.backbone(x)[model.feature_layer]
        plain = model.classifier(features.mean(dim=(2, 3), keepdim=True)).flatten(1)
        assert torch.allclose(model(x).logits, plain, atol=1e-6)
        assert torch.allclose(model.cam_forward(x, ["-1"])[0], plain, atol=1e-6)
        assert not torch.allclose(model(x, epoch=0).logits, plain, atol=1e-3)


def test_esf_side_heads_and_their_losses():
    config = ClassifierConfig(train_modules=("esf",), side_loss_weights=(0.2, 0.3, 0.5),
                              weights="none")
    assert side_head_layers(config) == ("-3", "-2")
    model = build_classifier(config, num_classes=3)
    output = model(torch.rand(2, 3, 64, 64), epoch=0)
    assert output.logits.shape == (2, 3)
    assert [tuple(z.shape) for z in output.side_logits] == [(2, 3), (2, 3)]
    assert model.side_layers == ("blocks.2", "blocks.4")
