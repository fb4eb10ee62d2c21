"""Class activation maps of a batch: CAM, Grad-CAM and Grad-CAM++ at any named layers.

The released codes run one forward and one backward per image, class and layer (12 backward
passes per LUAD patch for MLPS). Here one forward serves a whole batch and every layer, and one
backward per class gives that class's gradient at every requested layer for every image
(images are independent in eval mode, so the gradient of the summed logit is each image's
own). At the classifier input no backward is needed at all: after global average pooling and
a linear classifier, dz_c/dA = w_c / (h w) everywhere, so Grad-CAM there is the CAM divided
by h w. Jobs that make many maps use ``frozen_for_class_maps``: BatchNorms folded and depthwise
convolutions' input gradients on the forward kernel (docs/benchmarks.md).

Grad-CAM has no ReLU (docs/algorithms.md 1.2); Grad-CAM++ follows docs/algorithms.md 2.2.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..models.classifier import CamClassifier
from ..models.depthwise_gradient import use_fast_depthwise_gradients
from ..models.folding import fold_batchnorm
from ..registry import Registry


class ClassMaps(NamedTuple):
    logits: torch.Tensor  # (N, C)
    maps: dict[str, torch.Tensor]  # layer name -> (N, C, h, w) at the layer's resolution


#: Ways to make class maps, by ``PseudoMaskConfig.cam_method``:
#: ``maps(model, images, layers) -> ClassMaps`` for a model in eval mode.
CAM_METHODS: Registry[Callable[[CamClassifier, torch.Tensor, tuple[str, ...] | list[str]],
                               ClassMaps]] = Registry("CAM method")


def gradcam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """sum_k mean_ij(g_k) A_k for one class: (N, K, h, w) twice -> (N, h, w)."""
    weights = gradient.mean(dim=(2, 3))
    return torch.einsum("nk,nkij->nij", weights, activation)


def gradcampp(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ for one class: a = g^2 / (2 g^2 + sum_ij(A) g^3), w_k = sum_ij a ReLU(g)."""
    squared = gradient.pow(2)
    denominator = 2 * squared + activation.sum(dim=(2, 3), keepdim=True) * gradient.pow(3) + 1e-6
    alpha = torch.where(gradient != 0, squared / denominator, torch.zeros_like(gradient))
    weights = (alpha * F.relu(gradient)).sum(dim=(2, 3))
    return torch.einsum("nk,nkij->nij", weights, activation)


def class_activation_maps(model: CamClassifier, images: torch.Tensor,
                          layers: tuple[str, ...] | list[str], method: str = "gradcam"
                          ) -> ClassMaps:
    """Maps of every class at every layer for a batch of network inputs (already normalised).

    ``method``: a ``CAM_METHODS`` name: "cam" = ReLU(w_c . A) (layers with a classifier: the
    deepest and side heads), "gradcam" or "gradcampp" (any layer). The model must be in eval
    mode.
    """
    return CAM_METHODS.get(method)(model, images, layers)


@CAM_METHODS.register("cam")
def plain_cams(model: CamClassifier, images: torch.Tensor,
               layers: tuple[str, ...] | list[str]) -> ClassMaps:
    """ReLU(w_c . A) at layers that have a classifier; no gradients needed."""
    with torch.no_grad():
        logits, activations = model.cam_forward(images, layers)
        maps = {name: F.relu(model.class_scores(name, activation))
                for name, activation in activations.items()}
    return ClassMaps(logits, maps)


@CAM_METHODS.register("gradcam")
def gradcam_maps(model: CamClassifier, images: torch.Tensor,
                 layers: tuple[str, ...] | list[str]) -> ClassMaps:
    return gradient_weighted_maps(model, images, layers, gradcam)


@CAM_METHODS.register("gradcampp")
def gradcampp_maps(model: CamClassifier, images: torch.Tensor,
                   layers: tuple[str, ...] | list[str]) -> ClassMaps:
    return gradient_weighted_maps(model, images, layers, gradcampp)


def gradient_weighted_maps(
    model: CamClassifier, images: torch.Tensor, layers: tuple[str, ...] | list[str],
    weighting: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> ClassMaps:
    """Maps from activations and class gradients (``gradcam``, ``gradcampp``): one backward
    per class gives its gradient at every layer; analytic at the classifier input."""
    with torch.enable_grad(), _frozen(model), _graph_from_shallowest(model, layers) as inputs:
        logits, activations = model.cam_forward(inputs(images), layers)
        analytic = {name: a for name, a in activations.items() if name == model.feature_layer}
        traced = {name: a for name, a in activations.items() if name not in analytic}
        classes = logits.shape[1]
        maps = {}
        if traced:
            # One ordinary backward per class, not one vectorised backward over the classes
            # (``is_grads_batched``): as fast, and it keeps the depthwise convolutions of
            # ``frozen_for_class_maps`` on their fast kernel, which vmap would leave.
            per_class = [torch.autograd.grad(logits[:, c].sum(), list(traced.values()),
                                             retain_graph=c < classes - 1)
                         for c in range(classes)]
            for index, (name, activation) in enumerate(traced.items()):
                gradient = torch.stack([gradients[index] for gradients in per_class])
                maps[name] = _per_class(weighting, activation.detach(), gradient)
        for name, activation in analytic.items():
            gradient = torch.stack([_classifier_input_gradient(model, activation, c)
                                    for c in range(classes)])
            maps[name] = _per_class(weighting, activation.detach(), gradient)
    return ClassMaps(logits.detach(), {name: maps[name] for name in activations})


def _per_class(weighting, activation: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) maps from one activation and (C, N, K, h, w) class gradients."""
    return torch.stack([weighting(activation, gradient) for gradient in gradients], dim=1)


def frozen_for_class_maps(model: CamClassifier) -> CamClassifier:
    """An eval-mode working copy of ``model`` for making many class maps: BatchNorms folded
    into their convolutions (``models.folding``) and depthwise convolutions' input gradients
    on the forward kernel (``models.depthwise_gradient``); the same maps up to rounding, about
    twice as fast on a CPU. ``model`` itself is not changed."""
    prepared = fold_batchnorm(model.eval())
    if prepared is model:
        prepared = copy.deepcopy(model)
    use_fast_depthwise_gradients(prepared)
    return prepared


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters without gradients while maps are made: the backward then computes only the
    activations' gradients, and no weight gradient is kept."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextmanager
def _graph_from_shallowest(model: CamClassifier, layers: tuple[str, ...] | list[str]
                           ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Record the graph only from the shallowest requested layer on: a forward hook makes its
    activation a leaf that needs a gradient, so the layers below it run as in inference
    (recording them cost a sixth of Grad-CAM's time and no gradient is wanted there). Yields
    how to prepare the network input; where the backbone cannot name the layer's module, the
    input itself carries the graph (parameters are frozen)."""
    backbone = model.backbone
    shallowest = min((backbone.resolve_layer(name) for name in layers),
                     key=backbone.layer_names.index)
    module = backbone.layer_module(shallowest)
    if module is None:
        yield lambda images: _channels_last(images).detach().requires_grad_(True)
        return
    handle = module.register_forward_hook(
        lambda _module, _inputs, output: output.detach().requires_grad_(True))
    try:
        yield lambda images: _channels_last(images).detach()
    finally:
        handle.remove()


def _channels_last(images: torch.Tensor) -> torch.Tensor:
    """Inputs that need a graph: channels-last is oneDNN's (and cuDNN's) faster layout."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


def _classifier_input_gradient(model: CamClassifier, activation: torch.Tensor,
                               class_index: int) -> torch.Tensor:
    """dz_c/dA at the classifier input: w_c / (h w) at every position (GAP + linear head)."""
    height, width = activation.shape[-2:]
    weight = model.classifier.weight[class_index].detach().view(1, -1, 1, 1)
    return (weight / (height * width)).expand_as(activation)
