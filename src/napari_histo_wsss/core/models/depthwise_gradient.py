"""Depthwise convolutions whose input gradient is computed as a forward convolution.

Grad-CAM at intermediate layers needs the gradient of the logits with respect to their
activations, through every depthwise convolution above them. On a CPU, torch's backward kernel
for a depthwise convolution is far slower than its forward: for EfficientNet-Lite0's dilated
5 x 5 depthwise convolutions on 16 x 1152 x 10 x 10 activations, 34 ms against 1 ms
(docs/benchmarks.md), and those few layers took 40 % of the class maps' time. For stride 1 the
input gradient of a convolution *is* a convolution: the output gradient correlated with the
kernel flipped in both spatial axes, padded by ``dilation * (kernel - 1) - padding``. Computed
that way it runs on the fast forward kernel and gives the same gradient up to rounding.

Only for frozen models (the class-map copy of a classifier): the weight gradient is not
computed, so a convolution whose weight needs a gradient keeps the ordinary path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _DepthwiseConvFastInputGradient(torch.autograd.Function):
    """conv2d forward; the input's gradient from a flipped-kernel forward convolution."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation, channels):
        ctx.save_for_backward(weight)
        ctx.padding, ctx.dilation, ctx.channels = padding, dilation, channels
        return F.conv2d(x, weight, bias, 1, padding, dilation, channels)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        kernel = weight.shape[-2:]
        padding = tuple(d * (k - 1) - p
                        for d, k, p in zip(ctx.dilation, kernel, ctx.padding, strict=True))
        grad_input = F.conv2d(grad_output, weight.flip(-2, -1), None, 1, padding,
                              ctx.dilation, ctx.channels)
        return grad_input, None, None, None, None, None


class DepthwiseConvFastGradient(nn.Module):
    """A stride-1 depthwise ``nn.Conv2d`` (kept as ``.conv``) with the fast input gradient."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_replaceable(conv):
            raise ValueError(f"not a stride-1 depthwise convolution with zero padding: {conv}")
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if conv.weight.requires_grad and torch.is_grad_enabled():
            return conv(x)  # a weight gradient is wanted: the ordinary path computes it
        return _DepthwiseConvFastInputGradient.apply(
            x, conv.weight, conv.bias, conv.padding, conv.dilation, conv.groups)


def is_replaceable(module: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (not a subclass with its own padding, as timm's ``Conv2dSame``),
    depthwise with one filter per channel, stride 1, numeric zero padding no wider than the
    dilated kernel."""
    if type(module) is not nn.Conv2d:
        return False
    channels = module.in_channels
    return (module.groups == channels == module.out_channels and module.stride == (1, 1)
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and all(p <= d * (k - 1) for p, d, k in
                    zip(module.padding, module.dilation, module.kernel_size, strict=True)))


def use_fast_depthwise_gradients(model: nn.Module) -> int:
    """Wrap every replaceable depthwise convolution of ``model`` in place; returns how many.

    The wrapped model's state-dict keys change (``conv_dw`` -> ``conv_dw.conv``): meant for a
    working copy that is not saved."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_replaceable(child):
                setattr(parent, name, DepthwiseConvFastGradient(child))
                count += 1
    return count
