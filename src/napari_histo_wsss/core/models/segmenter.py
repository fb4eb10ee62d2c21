"""Stage-2 segmenters: DeepLabV3+, PSPNet and U-Net over timm encoders, with optional extra heads.

The architectures come from segmentation-models-pytorch with a ``tu-`` (timm) encoder. Two heads
can be added for the methods that need them: MSV's auxiliary FCN head on the second-deepest
encoder feature, and HisynSeg's classification head (a class map K on the deepest feature whose
global average gives image logits). ``Segmenter.forward`` returns all of them in one
``SegmenterOutput`` so a loss takes what it needs.

Encoder weights follow ``SegmenterConfig.weights`` like the classifier's: None means ImageNet
weights (offline for ``tf_efficientnet_lite0``), "none" a random start, any other value a local
weights file; ``core.backbones`` does the loading for both stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config.run_config import RunConfig, SegmenterConfig, section_from_dict
from ..data.classes import DatasetSpec
from ..errors import CheckpointError, ConfigError
from ..registry import Registry
from ..runs.checkpoints import check_same_classes, checkpoint_spec, load_checkpoint
from .backbones import RES38D, build_backbone

#: Segmentation networks by ``SegmenterConfig.arch``: ``build(decoder_channels,
#: **smp_arguments) -> nn.Module``, given the decoder's width (None: smp's default), the smp
#: encoder name, the number of classes and (where set) the encoder depth.
ARCHITECTURES: Registry[Callable[..., nn.Module]] = Registry("segmenter architecture")


@ARCHITECTURES.register("deeplabv3plus")
def deeplabv3plus(decoder_channels: int | None, **smp_arguments: Any) -> nn.Module:
    """MLPS's network, with the DeepLab v3+ paper's atrous rates for output stride 16: smp's
    default 12/24/36 reach far past the 14x14 feature map of a 224-pixel patch."""
    import segmentation_models_pytorch as smp

    if decoder_channels is not None:
        smp_arguments["decoder_channels"] = decoder_channels
    return smp.DeepLabV3Plus(decoder_atrous_rates=(6, 12, 18), **smp_arguments)


@ARCHITECTURES.register("pspnet")
def pspnet(decoder_channels: int | None, **smp_arguments: Any) -> nn.Module:
    """MSV, ARML and ESFAN's network (ARML and ESFAN on a three-stage encoder)."""
    import segmentation_models_pytorch as smp

    if decoder_channels is not None:
        smp_arguments["psp_out_channels"] = decoder_channels
    return smp.PSPNet(**smp_arguments)


@ARCHITECTURES.register("unet")
def unet(decoder_channels: int | None, **smp_arguments: Any) -> nn.Module:
    """A U-Net, for comparison: no method preset uses it."""
    import segmentation_models_pytorch as smp

    if decoder_channels is not None:
        depth = smp_arguments.get("encoder_depth", 5)
        smp_arguments["decoder_channels"] = [max(decoder_channels >> stage, 1)
                                             for stage in range(depth)]
    return smp.Unet(**smp_arguments)


AUX_LOSS_WEIGHT = 0.4  # MSV's auxiliary FCN head
SEGMENTER_KIND = "segmenter"


@dataclass
class SegmenterOutput:
    """One forward pass: main logits at input size, plus whatever extra heads exist."""

    logits: torch.Tensor  # (N, C, H, W)
    aux_logits: torch.Tensor | None = None  # (N, C, H, W), MSV's FCN head
    cam: torch.Tensor | None = None  # (N, C, h, w) class map K at the deepest feature's stride

    @property
    def image_logits(self) -> torch.Tensor | None:
        """HisynSeg's image-level logits, GAP(K)."""
        return None if self.cam is None else self.cam.mean(dim=(2, 3))


class Segmenter(nn.Module):
    """An smp segmentation network whose forward also returns the auxiliary and CAM heads."""

    def __init__(self, config: SegmenterConfig, num_classes: int):
        super().__init__()
        build = ARCHITECTURES.get(config.arch)
        if config.encoder == RES38D:
            raise ConfigError("res38d is a classifier backbone only; smp segmenters need a timm "
                              "encoder such as tf_efficientnet_lite0")
        kwargs = {}
        if config.encoder_depth is not None:
            kwargs["encoder_depth"] = config.encoder_depth
        try:
            self.net = build(config.decoder_channels, encoder_name=f"tu-{config.encoder}",
                             encoder_weights=None, classes=num_classes, **kwargs)
        except (RuntimeError, ValueError) as error:
            raise ConfigError(
                f"cannot build {config.arch} on encoder '{config.encoder}': {error}"
            ) from None
        _drop_unused_encoder_blocks(self.net.encoder.model)
        channels = self.net.encoder.out_channels
        self.num_classes = num_classes
        self.aux_head = _fcn_head(channels[-2], num_classes) if config.aux_head else None
        self.cam_head = (
            nn.Sequential(nn.Dropout(0.5), nn.Conv2d(channels[-1], num_classes, 1, bias=False))
            if config.cam_head else None
        )
        if config.weights != "none":
            self._load_encoder_weights(config)

    def _load_encoder_weights(self, config: SegmenterConfig) -> None:
        """ImageNet or file weights through ``core.backbones`` (offline for Lite0): the smp
        encoder is the same timm feature extractor, so its tensors are a subset by name."""
        source = build_backbone(config.encoder, config.weights, output_stride=32).body
        self._load_encoder(source.state_dict(), config.weights,
                           "the encoder weights lack tensors such as '{name}'")

    def load_classifier_backbone(self, classifier_state: dict[str, torch.Tensor],
                                 source: Path) -> None:
        """Start the encoder from a trained stage-1 classifier (``encoder_init="classifier"``):
        its backbone is the same timm feature extractor, under ``backbone.body.``."""
        prefix = "backbone.body."
        self._load_encoder(
            {name[len(prefix):]: tensor for name, tensor in classifier_state.items()
             if name.startswith(prefix)}, source,
            "the classifier's backbone does not fit this segmenter's encoder (e.g. '{name}'): "
            "encoder_init 'classifier' needs the same encoder in both stages")

    def _load_encoder(self, weights: dict[str, torch.Tensor], source, problem: str) -> None:
        """The encoder's tensors, by name, from a larger set; ``problem`` (with ``{name}``,
        the first tensor missing or of another shape) is the error otherwise."""
        own = self.net.encoder.model.state_dict()
        unfit = [name for name, tensor in own.items()
                 if name not in weights or weights[name].shape != tensor.shape]
        if unfit:
            raise CheckpointError(problem.format(name=unfit[0]), source)
        self.net.encoder.model.load_state_dict({name: weights[name] for name in own})

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this (the encoder's total stride)."""
        return self.net.encoder.output_stride

    def forward(self, x: torch.Tensor) -> SegmenterOutput:
        features = self.net.encoder(x)
        logits = self.net.segmentation_head(self.net.decoder(features))
        aux = None
        if self.aux_head is not None:
            aux = F.interpolate(self.aux_head(features[-2]), size=x.shape[-2:], mode="bilinear",
                                align_corners=False)
        cam = self.cam_head(features[-1]) if self.cam_head is not None else None
        return SegmenterOutput(logits, aux, cam)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(pretrained encoder parameters, new decoder/head parameters) for per-group lrs."""
        encoder = list(self.net.encoder.parameters())
        encoder_ids = {id(p) for p in encoder}
        return encoder, [p for p in self.parameters() if id(p) not in encoder_ids]


def _fcn_head(in_channels: int, num_classes: int, channels: int = 256) -> nn.Sequential:
    """mmseg's FCNHead with one conv: 3x3 conv-BN-ReLU, dropout 0.1, 1x1 classifier."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(0.1),
        nn.Conv2d(channels, num_classes, 1),
    )


def _drop_unused_encoder_blocks(model: nn.Module) -> None:
    """Remove timm blocks below the deepest returned feature (smp's shallow PSPNet).

    timm's EfficientNet feature extractor runs every block even when only the first stages are
    returned; with ``encoder_depth=3`` that wastes most of the encoder's compute.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return
    block_names = [n for n in model.feature_info.module_name() if n.startswith("blocks.")]
    if block_names:
        needed = int(block_names[-1].split(".")[1]) + 1
        model.blocks = blocks[:needed]


def build_segmenter(config: SegmenterConfig, num_classes: int) -> Segmenter:
    """A segmenter for ``num_classes`` tissue classes as ``config`` describes it."""
    return Segmenter(config, num_classes)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) with (x - mean) / std in the 0-255 scale."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() - mean_t) / std_t


def checkpoint_config(run_config: RunConfig, strategy: str, input_size: int,
                      normalisation: str, mean, std) -> dict[str, Any]:
    """The ``config`` entry of a segmenter checkpoint: what prediction needs besides weights."""
    return {
        "run": run_config.to_dict(), "strategy": strategy, "input_size": input_size,
        "normalisation": {"name": normalisation, "mean": list(mean), "std": list(std)},
    }


def load_segmenter(
    path: str | Path, device: torch.device | str = "cpu", spec: DatasetSpec | None = None
) -> tuple[Segmenter, dict[str, Any]]:
    """A trained segmenter in eval mode and its checkpoint payload.

    ``spec`` (optional) refuses a checkpoint trained on other classes.
    """
    payload = load_checkpoint(path, kind=SEGMENTER_KIND)
    if spec is not None:
        check_same_classes(payload, spec, path)
    try:
        config = section_from_dict(SegmenterConfig, payload["config"]["run"]["segmenter"])
        config.weights = "none"  # the checkpoint holds every weight
        model = build_segmenter(config, checkpoint_spec(payload).num_classes)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(f"does not fit a segmenter ({error})", path) from None
    return model.to(device).eval(), payload
