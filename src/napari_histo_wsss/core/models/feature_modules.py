"""Stage-1 feature modules that change what the classifier's CAMs cover (docs/algorithms.md 1-4).

Each module acts on the deepest feature map F between the backbone and the 1x1 classifier.
PDA, coordinate attention and ARS are training-time regularisers: the CAM network never runs
them (docs/algorithms.md 9.1), they only shape the features the classifier learns on. The ESF block
is part of ESFAN's network itself, CAM network included, so it declares ``at_inference = True``.

Adding a module is one class with ``forward(features, classifier_weight, epoch)``, registered
in ``FEATURE_MODULES`` under the name ``ClassifierConfig.train_modules`` gives it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config.run_config import ClassifierConfig
from ..registry import Registry


class FeatureModule(nn.Module):
    """A step ``F -> F'`` on the deepest features; ``active(epoch)`` says when it runs.

    ``epoch`` is the 0-based training epoch, or None for the CAM network (inference).
    """

    at_inference: ClassVar[bool] = False

    def active(self, epoch: int | None) -> bool:
        return self.at_inference or epoch is not None

    def forward(self, features: torch.Tensor, classifier_weight: torch.Tensor,
                epoch: int | None) -> torch.Tensor:
        raise NotImplementedError


#: Stage-1 feature modules by the names ``ClassifierConfig.train_modules`` lists.
FEATURE_MODULES: Registry[type[FeatureModule]] = Registry("stage-1 module")


def _inverse_exponential(x: torch.Tensor) -> torch.Tensor:
    """ARML's gate phi(a) = 0.8 exp(-0.8 a): strong activations are damped most."""
    return 0.8 * torch.exp(-0.8 * x)


# --------------------------------------------------------------------------------------------
# MLPS: progressive dropout attention


def pda_gamma(config: ClassifierConfig, epoch: int) -> float:
    """PDA's gamma at a 0-based epoch: decayed once per finished epoch while above the floor."""
    gamma = config.pda_gamma
    for _ in range(epoch):
        if gamma > config.pda_gamma_floor:
            gamma *= config.pda_gamma_decay
    return gamma


@FEATURE_MODULES.register("pda")
class ProgressiveDropoutAttention(FeatureModule):
    """PDA (docs/algorithms.md 1.1): hide each class's peak activations, re-weight F by the rest.

    A_c = ReLU(w_c . F); positions above gamma * max A_c are zeroed; M = mean_c(A_c) over all
    classes, present or not; F' = F * M, with gradients through M.

    Unlike the release, M is scaled to a maximum of 1 per image, and an image without any
    positive class score keeps F unchanged. Unscaled, F * M multiplies the logits by the size
    of the class scores; with Lite0 features one overshooting step then pushed every score
    below zero, where M = 0 blocks all gradients and training sits at loss ln 2 for good.
    """


    def __init__(self, channels: int, num_classes: int, config: ClassifierConfig):
        super().__init__()
        self.config = config

    def active(self, epoch: int | None) -> bool:
        return epoch is not None and epoch >= self.config.pda_start_epoch

    def forward(self, features, classifier_weight, epoch):
        gamma = pda_gamma(self.config, epoch)
        cams = F.relu(F.conv2d(features, classifier_weight))
        peak = cams.amax(dim=(2, 3), keepdim=True)
        kept = torch.where(cams <= gamma * peak, cams, torch.zeros_like(cams))
        attention = kept.mean(dim=1, keepdim=True)
        top = attention.amax(dim=(2, 3), keepdim=True)
        scaled = attention / top.clamp_min(1e-12)
        return features * torch.where(top > 0, scaled, torch.ones_like(scaled))


# --------------------------------------------------------------------------------------------
# MSV: coordinate attention


@FEATURE_MODULES.register("coord_attention")
class CoordinateAttention(FeatureModule):
    """MSV's CA block (docs/algorithms.md 2.1): F * s_h (per row) * s_w (per column).

    The released block's BatchNorm is frozen at its initial state (an identity), so it is
    left out; the convolutions are trained.
    """


    def __init__(self, channels: int, num_classes: int, config: ClassifierConfig,
                 reduction: int = 16):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.squeeze = nn.Conv2d(channels, hidden, 1)
        self.rows = nn.Conv2d(hidden, channels, 1)
        self.columns = nn.Conv2d(hidden, channels, 1)

    def forward(self, features, classifier_weight, epoch):
        height, width = features.shape[-2:]
        by_row = features.mean(dim=3, keepdim=True)  # (N, C, H, 1)
        by_column = features.mean(dim=2, keepdim=True).transpose(2, 3)  # (N, C, W, 1)
        joint = F.relu(self.squeeze(torch.cat([by_row, by_column], dim=2)))
        row_part, column_part = joint.split([height, width], dim=2)
        row_gate = torch.sigmoid(self.rows(row_part))
        column_gate = torch.sigmoid(self.columns(column_part.transpose(2, 3)))
        return features * row_gate * column_gate


# --------------------------------------------------------------------------------------------
# ARML: activation relocalisation (criss-cross attention + inverse exponential gating)


class CrissCrossAttention(nn.Module):
    """Each position attends to its row and column; out = gamma * attended + F, gamma from 0."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(1, channels // 8)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        query, key, value = self.query(x), self.key(x), self.value(x)
        column_energy = torch.einsum("ncij,nchj->nijh", query, key)
        # A position's own pixel is a candidate once, through its row.
        own = torch.eye(height, dtype=torch.bool, device=x.device).view(1, height, 1, height)
        column_energy = column_energy.masked_fill(own, float("-inf"))
        row_energy = torch.einsum("ncij,nciw->nijw", query, key)
        attention = torch.softmax(torch.cat([column_energy, row_energy], dim=-1), dim=-1)
        column_attention, row_attention = attention.split([height, x.shape[3]], dim=-1)
        attended = (torch.einsum("nijh,nchj->ncij", column_attention, value)
                    + torch.einsum("nijw,nciw->ncij", row_attention, value))
        return self.gamma * attended + x


class InverseActivationGate(nn.Module):
    """ARML's AMM: channel then spatial gates phi(a) = 0.8 exp(-0.8 a) damp strong evidence.

    The released spatial-gate BatchNorm is frozen at its initial state (an identity) and left
    out; unlike the released code, the channel MLP is trained.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.channel_mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, channels),
        )
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_scores = self.channel_mlp(x.mean(dim=(2, 3)))[:, :, None, None]
        x = x * _inverse_exponential(channel_scores)
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * _inverse_exponential(self.spatial(pooled))


@FEATURE_MODULES.register("ars")
class ActivationRelocalisation(FeatureModule):
    """ARS (docs/algorithms.md 3.1): criss-cross attention then AMM, from ``ars_start_epoch``."""


    def __init__(self, channels: int, num_classes: int, config: ClassifierConfig):
        super().__init__()
        self.start_epoch = config.ars_start_epoch
        self.attention = CrissCrossAttention(channels)
        self.gate = InverseActivationGate(channels)

    def active(self, epoch: int | None) -> bool:
        return epoch is not None and epoch >= self.start_epoch

    def forward(self, features, classifier_weight, epoch):
        return self.gate(self.attention(features))


# --------------------------------------------------------------------------------------------
# ESFAN: edge-semantic synergy fusion


@FEATURE_MODULES.register("esf")
class EdgeSemanticFusion(FeatureModule):
    """ESF block (docs/algorithms.md 4.1) on the deepest features, in training and CAM networks.

    Edge gate e (fixed Laplacian of the channel sum + a 3x3 conv), channel gate a (squeeze-
    excitation), pyramid context P (pooled 1/2/3/6 grids), image gate g; output
    Conv3x3(X e (1 + g) + X a (2 - g) + P). The released pyramid BatchNorm is frozen at its
    initial state (an identity) and left out.
    """

    at_inference = True
    pyramid_grids = (1, 2, 3, 6)

    def __init__(self, channels: int, num_classes: int, config: ClassifierConfig,
                 reduction: int = 16):
        super().__init__()
        laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("laplacian", laplacian.view(1, 1, 3, 3), persistent=False)
        self.edge = nn.Conv2d(channels + 1, 1, 3, padding=1)
        hidden = max(8, channels // reduction)
        self.channel_gate = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), nn.ReLU(),
            nn.Linear(hidden, channels, bias=False), nn.Sigmoid(),
        )
        self.pyramid = nn.Conv2d(channels * (1 + len(self.pyramid_grids)), channels, 1)
        self.image_gate = nn.Conv2d(channels, 1, 1)
        self.fuse = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, features, classifier_weight, epoch):
        size = features.shape[-2:]
        edges = F.conv2d(features.sum(dim=1, keepdim=True), self.laplacian, padding=1)
        edge_gate = torch.sigmoid(self.edge(torch.cat([features, edges], dim=1)))
        channel_gate = self.channel_gate(features.mean(dim=(2, 3)))[:, :, None, None]
        pooled = [
            F.interpolate(F.adaptive_avg_pool2d(features, grid), size=size, mode="bilinear",
                          align_corners=True)
            for grid in self.pyramid_grids
        ]
        context = F.relu(self.pyramid(torch.cat([features, *pooled], dim=1)))
        image_gate = torch.sigmoid(self.image_gate(features.mean(dim=(2, 3), keepdim=True)))
        mixed = (features * edge_gate * (1 + image_gate)
                 + features * channel_gate * (2 - image_gate) + context)
        return self.fuse(mixed)


# --------------------------------------------------------------------------------------------
# Deep supervision


class SideHead(nn.Module):
    """ESFAN's side classifier on an intermediate layer: 1x1 conv (with bias) on ReLU(S).

    Its weight (without the bias) also turns that layer into CAMs.
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(features).mean(dim=(2, 3), keepdim=True)).flatten(1)


def build_module(name: str, channels: int, num_classes: int,
                 config: ClassifierConfig) -> FeatureModule:
    """The registered module ``name`` for deepest features of ``channels`` channels."""
    return FEATURE_MODULES.get(name)(channels, num_classes, config)
