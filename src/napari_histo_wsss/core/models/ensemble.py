"""A strategy's segmenter with its companion: two networks, one predictor.

A recipe may train a second, different network on the same pseudo-masks
(``SegmenterConfig.companion``, written to ``segmenter/<strategy>/companion/``). Networks of
different depth and input regime make different mistakes on new images, so their averaged
class probabilities score above either (docs/results.md). The pair is one ``nn.Module`` whose
logits are the log of the mean softmax, so everything downstream (the class gate, offsets,
TTA, tiling) treats it as a single segmenter; exported CPU engines run the strategy's network
and average the companion in torch (``inference.engines.averaged_with``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .segmenter import Segmenter, SegmenterOutput, load_segmenter

#: The companion network's folder inside ``segmenter/<strategy>/``.
COMPANION_FOLDER = "companion"


class SegmenterEnsemble(nn.Module):
    """Segmenters whose class probabilities are averaged; logits = log of the mean."""

    def __init__(self, members: list[Segmenter]):
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def input_multiple(self) -> int:
        """Inputs must suit every member's encoder stride."""
        return math.lcm(*(member.input_multiple for member in self.members))

    def forward(self, x: torch.Tensor) -> SegmenterOutput:
        return SegmenterOutput(log_mean_softmax([member(x).logits for member in self.members]))


def log_mean_softmax(logits: list[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the networks' class probabilities, (N, C, H, W) each: logits whose
    softmax is the average (the gate's -inf and the offsets then apply as to one network)."""
    log_probabilities = torch.stack([torch.log_softmax(value.float(), dim=1) for value in logits])
    return torch.logsumexp(log_probabilities, dim=0) - math.log(len(logits))


def companion_checkpoint(checkpoint: Path) -> Path | None:
    """The companion's ``model.pt`` beside a strategy's checkpoint, or None."""
    path = checkpoint.parent / COMPANION_FOLDER / "model.pt"
    return path if path.is_file() else None


def load_with_companion(checkpoint: Path, device: torch.device | str = "cpu"
                        ) -> tuple[Segmenter | SegmenterEnsemble, dict[str, Any]]:
    """The strategy's segmenter, averaged with its companion where one was trained, and the
    strategy checkpoint's payload."""
    model, payload = load_segmenter(checkpoint, device)
    companion = companion_checkpoint(checkpoint)
    if companion is None:
        return model, payload
    partner, partner_payload = load_segmenter(companion, device)
    if partner.num_classes != model.num_classes or (
            partner_payload["config"]["normalisation"] != payload["config"]["normalisation"]):
        raise CheckpointError("the companion network does not fit its strategy's (other "
                              "classes or input normalisation): delete its folder", companion)
    return SegmenterEnsemble([model, partner]).eval(), payload
