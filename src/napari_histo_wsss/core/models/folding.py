"""BatchNorm folded into the convolution before it, for a frozen model in eval mode.

Class maps need a backward pass through a model whose parameters never change, and in eval mode
a BatchNorm is a per-channel affine map: folding it into the preceding convolution removes a
quarter of the Grad-CAM time (BatchNorm forward and backward) and changes the maps only by
rounding (docs/benchmarks.md). Pairs are found by registration order (a Conv2d registered
directly before a BatchNorm2d in the same parent, as timm's blocks and stems are built), and
the folded copy is checked against the original on a probe input: a backbone built another
way (a norm that reads something other than that convolution) keeps its BatchNorms.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: Largest difference from the unfolded logits, relative to their range, that a fold may make.
FOLD_TOLERANCE = 1e-3


def fold_batchnorm(model: nn.Module, probe: torch.Tensor | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` with each conv->BatchNorm pair fused, or ``model``
    itself where nothing folds or the copy's output on ``probe`` (a network input; default
    a seeded random 96-px image) differs."""
    folded = copy.deepcopy(model).eval()
    if not _fold_pairs(folded):
        return model
    if probe is None:
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(1, 3, 96, 96, generator=generator).to(device)
    with torch.no_grad():
        expected = _logits(model.eval(), probe)
        got = _logits(folded, probe)
    span = float(expected.max() - expected.min()) or 1.0
    if float((expected - got).abs().max()) > FOLD_TOLERANCE * span:
        return model
    return folded


def _fold_pairs(module: nn.Module) -> int:
    """Fuse conv->BatchNorm pairs in place; a timm BatchNormAct2d keeps its activation."""
    count = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:], strict=False):
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
                    and norm.track_running_stats and norm.running_mean is not None):
                continue
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
            setattr(parent, norm_name, _after_norm(norm))
            count += 1
    return count


def _after_norm(norm: nn.BatchNorm2d) -> nn.Module:
    """What a folded norm still does: timm's BatchNormAct2d applies dropout and an
    activation after normalising; a plain BatchNorm2d nothing."""
    rest = [part for part in (getattr(norm, "drop", None), getattr(norm, "act", None))
            if part is not None and not isinstance(part, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _logits(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    output = model(probe)
    return output.logits if hasattr(output, "logits") else output
