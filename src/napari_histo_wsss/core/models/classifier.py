"""The stage-1 CAM classifier: backbone -> feature modules -> dropout -> GAP -> 1x1 classifier.

The classifier is a 1x1 convolution without bias on globally pooled features, so the class
activation map of class c at any position is w_c . F there (docs/algorithms.md notation).
Training-time modules (PDA, coordinate attention, ARS) run only when ``forward`` is given an epoch;
the CAM network (``epoch=None``, ``cam_forward``) is the plain backbone + classifier, plus ESF
where the recipe has it. ESFAN's side heads give CAMs of intermediate layers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config.run_config import ClassifierConfig, RunConfig
from ..data.classes import DatasetSpec
from ..errors import CheckpointError, ConfigError
from ..runs.checkpoints import check_same_classes, checkpoint_spec, load_checkpoint
from .backbones import Backbone, build_backbone
from .feature_modules import SideHead, build_module

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def input_statistics(mode: str, spec: DatasetSpec | None = None) -> tuple[tuple, tuple]:
    """(mean, std) on the 0-255 scale for a normalisation mode ("divide255", "imagenet",
    "dataset")."""
    if mode == "divide255":
        return (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
    if mode == "imagenet":
        return (tuple(255 * m for m in _IMAGENET_MEAN), tuple(255 * s for s in _IMAGENET_STD))
    if mode == "dataset":
        if spec is None or spec.mean is None or spec.std is None:
            name = spec.name if spec is not None else "this dataset"
            raise ConfigError(f"normalise 'dataset' needs colour statistics, which {name} lacks")
        return tuple(spec.mean), tuple(spec.std)
    raise ConfigError(f"unknown normalise '{mode}': use divide255, imagenet or dataset")


def side_head_layers(config: ClassifierConfig) -> tuple[str, ...]:
    """Relative layers of the side heads: one per extra loss weight, ending at "-2".

    ESFAN's weights 0.2/0.3/0.5 give side heads on "-3" and "-2" (b4_5 and b5_2 on ResNet-38).
    """
    count = max(len(config.side_loss_weights) - 1, 0)
    return tuple(str(-position) for position in range(count + 1, 1, -1))


class ClassifierOutput(NamedTuple):
    logits: torch.Tensor  # (N, C) main head
    side_logits: tuple[torch.Tensor, ...]  # (N, C) per side head, shallow first


class CamClassifier(nn.Module):
    """Multi-label classifier whose feature maps give class activation maps.

    Takes images as float tensors on the 0-255 scale; ``normalise`` applies the training
    normalisation, kept with the model so CAMs always see what training saw.
    """

    def __init__(self, backbone: Backbone, num_classes: int, config: ClassifierConfig,
                 spec: DatasetSpec | None = None):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.backbone = backbone
        self.feature_layer = backbone.layer_names[-1]
        channels = backbone.channels[-1]
        self.feature_modules = nn.ModuleList(
            build_module(name, channels, num_classes, config) for name in config.train_modules
        )
        self.dropout = nn.Dropout2d(0.5)
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        self.side_layers = tuple(backbone.resolve_layer(n) for n in side_head_layers(config))
        self.side_heads = nn.ModuleList(
            SideHead(backbone.channels_of(layer), num_classes) for layer in self.side_layers
        )
        mean, std = input_statistics(config.normalise, spec)
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if backbone.pretrained:
            # Pretrained statistics and affine parameters stay as they are (docs/algorithms.md 0):
            # batches of 16-20 patches would only make them worse.
            for module in backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)

    def train(self, mode: bool = True) -> CamClassifier:
        super().train(mode)
        if mode and self.backbone.pretrained:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 or 0-255 floats -> the network's input."""
        return (images.float() - self.input_mean) / self.input_std

    def _features(self, x: torch.Tensor, epoch: int | None):
        layers = self.backbone(x)
        features = layers[self.feature_layer]
        for module in self.feature_modules:
            if module.active(epoch):
                features = module(features, self.classifier.weight, epoch)
        return layers, features

    def forward(self, x: torch.Tensor, epoch: int | None = None) -> ClassifierOutput:
        """Logits; ``epoch`` (0-based) switches on the training-time modules due by then."""
        layers, features = self._features(x, epoch)
        pooled = self.dropout(features).mean(dim=(2, 3), keepdim=True)
        logits = self.classifier(pooled).flatten(1)
        sides = tuple(head(layers[name]) for head, name in
                      zip(self.side_heads, self.side_layers, strict=True))
        return ClassifierOutput(logits, sides)

    def cam_forward(self, x: torch.Tensor, layers: tuple[str, ...] | list[str]
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits of the CAM network and the activations of ``layers`` (graph kept for
        Grad-CAM). The deepest layer's activation is the classifier input (after ESF)."""
        names = [self.backbone.resolve_layer(name) for name in layers]
        all_layers, features = self._features(x, None)
        logits = self.classifier(features.mean(dim=(2, 3), keepdim=True)).flatten(1)
        activations = {name: features if name == self.feature_layer else all_layers[name]
                       for name in names}
        return logits, activations

    def class_scores(self, layer: str, activation: torch.Tensor) -> torch.Tensor:
        """Per-class scores w_c . A of a layer that has a classifier: (N, C, h, w), before
        ReLU. The deepest layer uses the main classifier, side layers their side heads."""
        name = self.backbone.resolve_layer(layer)
        if name == self.feature_layer:
            return F.conv2d(activation, self.classifier.weight)
        if name in self.side_layers:
            head = self.side_heads[self.side_layers.index(name)]
            return F.conv2d(F.relu(activation), head.conv.weight)
        raise ConfigError(
            f"plain CAMs need a classifier at layer '{name}'; only {self.feature_layer} and "
            f"side-head layers {list(self.side_layers)} have one: use Grad-CAM for others"
        )

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that came with ImageNet (or user) weights."""
        if not self.backbone.pretrained:
            return []
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def new_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters initialised here (classifier, modules, side heads)."""
        pretrained = {id(p) for p in self.pretrained_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in pretrained]


def build_classifier(config: ClassifierConfig, num_classes: int,
                     spec: DatasetSpec | None = None) -> CamClassifier:
    """A fresh classifier with the configured backbone and ImageNet (or user) weights."""
    backbone = build_backbone(config.backbone, config.weights, config.output_stride)
    return CamClassifier(backbone, num_classes, config, spec)


def load_classifier(path: str | Path, device: torch.device | str = "cpu",
                    spec: DatasetSpec | None = None) -> tuple[CamClassifier, dict]:
    """A trained classifier in eval mode, and its checkpoint payload.

    With ``spec``, refuses a checkpoint trained on other classes. The backbone is built
    without pretrained weights (the checkpoint replaces them), so loading needs no network.
    """
    payload = load_checkpoint(path, kind="classifier")
    trained_spec = checkpoint_spec(payload)
    if spec is not None:
        check_same_classes(payload, spec, path)
    config = RunConfig.from_dict(payload["config"]).classifier
    unweighted = dataclasses.replace(config, weights="none")
    model = build_classifier(unweighted, trained_spec.num_classes, trained_spec)
    model.config = config
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"weights do not fit the classifier it describes ({first})",
                              path) from None
    return model.to(device).eval(), payload
