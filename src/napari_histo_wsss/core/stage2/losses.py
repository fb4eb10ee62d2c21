"""Noise-suppression losses for training a segmenter on pseudo-masks.

See docs/algorithms.md 1.3-5.3 and 7.4.

Pseudo-masks are wrong in places; each method down-weights the pixels it distrusts in its own
way. Every strategy registers itself in ``LOSSES`` under its config name: a ``SegmentationLoss``
subclass, or for a one-pass loss one plain function (``FunctionLoss``, docs/extending.md). A
loss takes the forward passes of a batch, the targets and the training context, and returns a
``LossResult``: the loss, the per-pixel weight or trust map it applied (shown by the napari
comparison view) and its named parts (logged per epoch).

Targets hold tissue classes 0..C-1, white background C and 255 for "no label" (padding).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..config.run_config import SegmenterConfig
from ..errors import ConfigError
from ..models.segmenter import AUX_LOSS_WEIGHT, SegmenterOutput
from ..registry import Registry

IGNORE_INDEX = 255
#: The constant logit MLPS/ARML/ESFAN append at background pixels (docs/algorithms.md 1.3, 7.4).
BACKGROUND_LOGIT = 100.0


@dataclass
class LossTargets:
    """What one batch is trained against."""

    masks: list[torch.Tensor]  # (N, H, W) int64 pseudo-masks, the main one first
    labels: torch.Tensor | None = None  # (N, C) float patch-level labels


@dataclass
class LossContext:
    num_classes: int
    epoch: int = 0  # 0-based
    total_epochs: int = 1


@dataclass
class LossResult:
    loss: torch.Tensor
    pixel_weight: torch.Tensor | None  # (N, H, W), detached; None where every pixel counts alike
    parts: dict[str, float]


#: Noise-suppression strategies by ``SegmenterConfig.loss``: ``SegmentationLoss`` subclasses or
#: plain head-loss functions (see ``FunctionLoss``).
LOSSES: Registry[type[SegmentationLoss] | Callable[..., Any]] = Registry("segmenter loss")


# --------------------------------------------------------------------------------------------
# Building blocks (public: tested against hand-computed values, reused by HisynSeg)


def with_background_channel(logits: torch.Tensor, mask: torch.Tensor,
                            background_index: int) -> torch.Tensor:
    """Append the constant channel ``100 * [mask == background]``: a (C+1)-way CE on it costs
    ~0 at background pixels while the network itself only ever predicts tissue classes."""
    channel = (mask == background_index).to(logits.dtype).unsqueeze(1) * BACKGROUND_LOGIT
    return torch.cat([logits, channel], dim=1)


def cross_entropy_with_background(logits: torch.Tensor, mask: torch.Tensor,
                                  background_index: int) -> torch.Tensor:
    """Pixel-mean CE over the classes plus the background channel, ignoring 255."""
    extended = with_background_channel(logits, mask, background_index)
    return F.cross_entropy(extended, mask, ignore_index=IGNORE_INDEX)


def onss_pixel_weights(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ONSS weights: easy-pixel weight x probability margin, 1 on single-label images.

    ``w1 = softmax(-loss) / mean(softmax(-loss))`` over each image's pixels (OEEM; ignored
    pixels take part with loss 0, as released), times ``max_c q - min_c q``. An image whose
    pseudo-mask holds at most one label has no boundary to be wrong about: all weights are 1.
    """
    with torch.no_grad():
        pixel_loss = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="none")
        easy = torch.softmax(-pixel_loss.flatten(1), dim=1)
        easy = (easy / easy.mean(dim=1, keepdim=True)).view_as(pixel_loss)
        probs = torch.softmax(logits, dim=1)
        weight = easy * (probs.amax(dim=1) - probs.amin(dim=1))
        for index in range(mask.shape[0]):
            labels = mask[index][mask[index] != IGNORE_INDEX]
            if labels.unique().numel() <= 1:
                weight[index] = 1.0
    return weight


def swv_weights(second: torch.Tensor, third: torch.Tensor, agree: float = 2.0,
                disagree: float = 0.5) -> torch.Tensor:
    """ARML's sample-weighted voting: ``agree`` where two peer passes predict the same class."""
    same = second.argmax(dim=1) == third.argmax(dim=1)
    return torch.where(same, agree, disagree).to(second.dtype)


def _relation_geometry(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise distances (N, N) and anchor angles (N, N, N) of flattened samples.

    Computed from the Gram matrix of the batch-centred vectors (distances and angles do not
    change under a shift), so the N x N x D difference tensor is never built; float64 keeps
    the Gram subtraction exact enough for 250k-long vectors (MPS has no float64).
    """
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    flat = x.flatten(1).to(dtype)
    flat = flat - flat.mean(dim=0, keepdim=True)
    gram = flat @ flat.T
    squared = gram.diagonal()
    off_diagonal = 1.0 - torch.eye(len(flat), dtype=dtype, device=x.device)
    distance = (squared[:, None] + squared[None, :] - 2 * gram).clamp_min(1e-12).sqrt()
    distance = distance * off_diagonal
    # <x_j - x_i, x_k - x_i> = G_jk - G_ij - G_ik + G_ii for anchor i.
    dot = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + squared[:, None, None]
    norms = distance[:, :, None] * distance[:, None, :]
    angle = torch.where(norms > 0, dot / norms.clamp_min(1e-12), torch.zeros_like(dot))
    return distance, angle


def relation_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance term: smooth-L1 between pairwise-distance matrices, each divided by the
    mean of its positive entries (mean over all N x N entries, zero diagonal included)."""
    d_student, _ = _relation_geometry(student)
    d_teacher, _ = _relation_geometry(teacher.detach())
    d_student = d_student / d_student[d_student > 0].mean()
    d_teacher = d_teacher / d_teacher[d_teacher > 0].mean()
    return F.smooth_l1_loss(d_student, d_teacher).float()


def relation_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle term: smooth-L1 between cos(x_j - x_i, x_k - x_i) over all (i, j, k);
    degenerate triplets (j or k equal to the anchor) are 0 on both sides."""
    _, a_student = _relation_geometry(student)
    _, a_teacher = _relation_geometry(teacher.detach())
    return F.smooth_l1_loss(a_student, a_teacher).float()


def anm_schedule(epoch: int, total_epochs: int) -> dict[str, float]:
    """ESFAN's linear per-epoch ramp of the ANM weights and confidence threshold."""
    progress = epoch / max(total_epochs, 1)
    return {
        "alpha": 0.4 + 0.4 * progress,
        "beta": 0.4 - 0.3 * progress,
        "gamma": 0.2 - 0.1 * progress,
        "tau": 0.2 + 0.3 * progress,
    }


#: How ANM's gated CE is averaged (``anm_terms``).
ANM_CE_REDUCTIONS = ("released", "pixel")


def _check_anm_ce_reduction(ce_reduction: str) -> None:
    if ce_reduction not in ANM_CE_REDUCTIONS:
        raise ConfigError(f"ANM's ce_reduction is one of {', '.join(ANM_CE_REDUCTIONS)}, "
                          f"not {ce_reduction!r}")


def anm_terms(extended_logits: torch.Tensor, mask: torch.Tensor, tau: float,
              ce_reduction: str = "released"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gated CE, uncertainty, smoothness, gate) of ESFAN's ANM on (C+1)-channel logits.

    ``ce_reduction="released"`` averages the CE over N x (C+1) x H x W as released (so it is
    1/(C+1) of a pixel mean, a smaller step than plain CE's at the same lr); "pixel" averages
    it over N x H x W, as plain CE does. The gate ``conf > tau`` passes no gradient, ``conf``
    itself does in the uncertainty term.
    """
    _check_anm_ce_reduction(ce_reduction)
    probs = torch.softmax(extended_logits, dim=1)
    confidence = probs.amax(dim=1)
    gate = (confidence > tau).to(probs.dtype)
    channels = extended_logits.shape[1]
    valid = mask != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(valid, mask, 0), channels).permute(0, 3, 1, 2)
    one_hot = one_hot.to(probs.dtype) * valid.unsqueeze(1)
    gated_ce = -(gate.unsqueeze(1) * one_hot * torch.log(probs + 1e-6)).mean()
    if ce_reduction == "pixel":
        gated_ce = gated_ce * channels
    uncertainty = -((1 - confidence) * torch.log(1 - confidence + 1e-6)).mean()
    smoothness = (probs[:, :, 1:, :] - probs[:, :, :-1, :]).abs().mean() \
        + (probs[:, :, :, 1:] - probs[:, :, :, :-1]).abs().mean()
    return gated_ce, uncertainty, smoothness, gate


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """HisynSeg's multiclass soft Dice from logits (smp DiceLoss, smooth 0).

    Per class, over the batch and pixels: ``1 - 2|P*Y| / (|P| + |Y|)``; classes absent from the
    batch's targets contribute 0 but still count in the mean over classes. Pixels that are not a
    tissue class (background C, i.e. smp's ignore_index=C, and 255) are left out.
    """
    num_classes = logits.shape[1]
    valid = ((target >= 0) & (target < num_classes)).unsqueeze(1).to(logits.dtype)
    probs = torch.softmax(logits, dim=1) * valid
    one_hot = F.one_hot(target.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2)
    one_hot = one_hot.to(logits.dtype) * valid
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    cardinality = (probs + one_hot).sum(dims)
    dice = 2 * intersection / cardinality.clamp_min(eps)
    present = (one_hot.sum(dims) > 0).to(logits.dtype)
    return ((1 - dice) * present).mean()


def consistency_loss(seg_logits: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """HisynSeg's L1 between softmax(S resized to K's size) and softmax(K); both heads learn."""
    resized = F.interpolate(seg_logits, size=cam.shape[-2:], mode="bilinear",
                            align_corners=False)
    return (torch.softmax(resized, dim=1) - torch.softmax(cam, dim=1)).abs().mean()


def image_classification_loss(image_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE of the CAM head's image logits GAP(K) against patch labels."""
    return F.binary_cross_entropy_with_logits(image_logits, labels.to(image_logits.dtype))


# --------------------------------------------------------------------------------------------
# Strategies


class SegmentationLoss:
    """A noise-suppression strategy. Subclasses implement ``head_loss`` for one head.

    ``num_passes`` forward passes of the same batch are given (ARML compares dropout-perturbed
    passes); the loss of an auxiliary head, where the model has one, is added with weight 0.4.
    ``name`` is the registry name it was built under (for messages).
    """

    num_passes: ClassVar[int] = 1
    #: Tunable settings (``SegmenterConfig.loss_params``) and their defaults.
    defaults: ClassVar[dict[str, Any]] = {}
    part_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: SegmenterConfig):
        self.name = config.loss
        self.config = config
        self.params = {**self.defaults,
                       **{k: v for k, v in config.loss_params.items() if k in self.defaults}}

    def __call__(self, passes: Sequence[SegmenterOutput], targets: LossTargets,
                 context: LossContext) -> LossResult:
        main = self.head_loss([p.logits for p in passes], targets, context)
        if passes[0].aux_logits is None:
            return main
        aux = self.head_loss([p.aux_logits for p in passes], targets, context)
        return LossResult(main.loss + AUX_LOSS_WEIGHT * aux.loss, main.pixel_weight,
                          {**main.parts, "aux": float(aux.loss.detach())})

    def head_loss(self, logits: list[torch.Tensor], targets: LossTargets,
                  context: LossContext) -> LossResult:
        raise NotImplementedError


@LOSSES.register("ce")
class CrossEntropy(SegmentationLoss):
    """Plain CE on the main pseudo-mask (the baseline every method improves on)."""

    part_names = ("ce",)

    def head_loss(self, logits, targets, context):
        loss = cross_entropy_with_background(logits[0], targets.masks[0], context.num_classes)
        return LossResult(loss, None, {"ce": float(loss.detach())})


@LOSSES.register("multilayer_ce")
class MultiLayerCrossEntropy(SegmentationLoss):
    """MLPS: CE against the pseudo-masks of several layers, weighted 0.6/0.2/0.2.

    The background channel comes from the main (deepest-layer) mask. ``batch_average`` divides
    once more by the batch size as the released code does (a 1/N smaller effective lr); off by
    default. The trust map is the summed weight of the layers that agree with the main mask.
    """

    defaults = {"batch_average": False}
    part_names = ("ce",)

    def head_loss(self, logits, targets, context):
        weights = self.config.target_weights
        if len(weights) != len(targets.masks):
            raise ConfigError(
                f"multilayer_ce has {len(weights)} target weights for {len(targets.masks)} "
                "pseudo-mask folders: set segmenter.target_weights to one weight per target"
            )
        extended = with_background_channel(logits[0], targets.masks[0], context.num_classes)
        loss = logits[0].new_zeros(())
        agreement = torch.zeros_like(targets.masks[0], dtype=logits[0].dtype)
        for weight, mask in zip(weights, targets.masks, strict=True):
            loss = loss + weight * F.cross_entropy(extended, mask, ignore_index=IGNORE_INDEX)
            agreement += weight * (mask == targets.masks[0])
        if self.params["batch_average"]:
            loss = loss / logits[0].shape[0]
        return LossResult(loss, agreement, {"ce": float(loss.detach())})


@LOSSES.register("onss")
class OnlineNoiseSuppression(SegmentationLoss):
    """MSV's ONSS: per-pixel CE weighted by ``onss_pixel_weights``; background is ignored."""

    part_names = ("onss",)

    def head_loss(self, logits, targets, context):
        mask = targets.masks[0].masked_fill(targets.masks[0] == context.num_classes,
                                            IGNORE_INDEX)
        pixel_loss = F.cross_entropy(logits[0], mask, ignore_index=IGNORE_INDEX,
                                     reduction="none")
        weight = onss_pixel_weights(logits[0].detach(), mask)
        loss = (weight * pixel_loss).mean()
        shown = weight * (mask != IGNORE_INDEX)
        return LossResult(loss, shown, {"onss": float(loss.detach())})


@LOSSES.register("arml")
class MutualLearning(SegmentationLoss):
    """ARML: three dropout-perturbed passes; SWV-weighted CE on the first, relation
    distillation (RKD distance + angle) from the other two. 0.8 SWV + 0.2 SRM."""

    num_passes = 3
    defaults = {"swv_weight": 0.8, "srm_weight": 0.2, "agree_weight": 2.0,
                "disagree_weight": 0.5, "distance_weight": 30.0, "angle_weight": 60.0}
    part_names = ("swv", "srm")

    def relation_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape[0] < 2:  # relations need at least two samples
            return student.new_zeros(())
        return self.params["distance_weight"] * relation_distance_loss(student, teacher) \
            + self.params["angle_weight"] * relation_angle_loss(student, teacher)

    def head_loss(self, logits, targets, context):
        mask = targets.masks[0]
        first, second, third = (with_background_channel(o, mask, context.num_classes)
                                for o in logits)
        votes = swv_weights(second.detach(), third.detach(), self.params["agree_weight"],
                            self.params["disagree_weight"])
        pixel_loss = F.cross_entropy(first, mask, ignore_index=IGNORE_INDEX, reduction="none")
        swv = (votes * pixel_loss).mean()
        srm = 0.5 * (self.relation_loss(first, second.detach())
                     + self.relation_loss(first, third.detach()))
        loss = self.params["swv_weight"] * swv + self.params["srm_weight"] * srm
        return LossResult(loss, votes, {"swv": float(swv.detach()), "srm": float(srm.detach())})


@LOSSES.register("anm")
class AdaptiveNoiseAware(SegmentationLoss):
    """ESFAN's ANM: alpha * confidence-gated CE + beta * uncertainty + gamma * smoothness.

    alpha, beta, gamma and tau ramp linearly over ``schedule_epochs`` (the released 20 for a
    20-epoch run); None ramps over the run's own epochs, so a shorter schedule keeps the shape.
    ``ce_reduction`` ("released" or "pixel", ``anm_terms``) separates the loss from its step
    size. The trust map is the confidence gate.
    """

    defaults = {"schedule_epochs": None, "ce_reduction": "released"}
    part_names = ("gated_ce", "uncertainty", "smoothness")

    def __init__(self, config: SegmenterConfig):
        super().__init__(config)
        _check_anm_ce_reduction(self.params["ce_reduction"])  # at build, not at the first step

    def head_loss(self, logits, targets, context):
        span = self.params["schedule_epochs"] or context.total_epochs
        schedule = anm_schedule(context.epoch, span)
        extended = with_background_channel(logits[0], targets.masks[0], context.num_classes)
        gated_ce, uncertainty, smoothness, gate = anm_terms(
            extended, targets.masks[0], schedule["tau"], self.params["ce_reduction"])
        loss = schedule["alpha"] * gated_ce + schedule["beta"] * uncertainty \
            + schedule["gamma"] * smoothness
        parts = {"gated_ce": float(gated_ce.detach()), "uncertainty": float(uncertainty.detach()),
                 "smoothness": float(smoothness.detach())}
        return LossResult(loss, gate.detach(), parts)


@LOSSES.register("hisynseg")
class HisynSegSupervised(SegmentationLoss):
    """HisynSeg's supervised loss: soft Dice on the segmentation + BCE on GAP(K) (a model with
    the CAM head, trained on masks it can trust: synthetic images or self-training masks)."""

    part_names = ("dice", "bce")

    def __init__(self, config: SegmenterConfig):
        super().__init__(config)
        if not config.cam_head:
            raise ConfigError("the hisynseg loss needs the CAM head: set segmenter.cam_head")

    def __call__(self, passes, targets, context):
        output = passes[0]
        if targets.labels is None:
            raise ConfigError("the hisynseg loss needs patch-level labels")
        dice = dice_loss(output.logits, targets.masks[0])
        bce = image_classification_loss(output.image_logits, targets.labels)
        return LossResult(dice + bce, None, {"dice": float(dice.detach()),
                                             "bce": float(bce.detach())})


class FunctionLoss(SegmentationLoss):
    """A strategy written as one function: ``loss(logits, targets, context, **params)``.

    ``logits`` is one head's (N, C, H, W) output of a single forward pass. The function returns
    the loss tensor, or ``(loss, pixel_weight)`` to show a trust map; the loss is logged under
    the strategy's name. Its keyword-only arguments with defaults are its ``loss_params``.
    Built by ``strategy_class``.
    """

    function: ClassVar[Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]]]

    def __init__(self, config: SegmenterConfig):
        super().__init__(config)
        self.part_names = (self.name,)

    def head_loss(self, logits, targets, context):
        result = self.function(logits[0], targets, context, **self.params)
        loss, pixel_weight = result if isinstance(result, tuple) else (result, None)
        if pixel_weight is not None:
            pixel_weight = pixel_weight.detach()
        return LossResult(loss, pixel_weight, {self.name: float(loss.detach())})


@cache
def strategy_class(entry: type[SegmentationLoss] | Callable[..., Any]
                   ) -> type[SegmentationLoss]:
    """The ``SegmentationLoss`` class of a ``LOSSES`` entry (a function gets a ``FunctionLoss``)."""
    if isinstance(entry, type):
        return entry
    keyword_defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(entry).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        and parameter.default is not inspect.Parameter.empty
    }
    return type(f"FunctionLoss[{entry.__name__}]", (FunctionLoss,),
                {"function": staticmethod(entry), "defaults": keyword_defaults})


def build_loss(config: SegmenterConfig) -> SegmentationLoss:
    """The strategy named by ``config.loss``; settings no strategy knows are refused."""
    strategy = strategy_class(LOSSES.get(config.loss))
    known = {key for _, entry in LOSSES.items() for key in strategy_class(entry).defaults}
    unknown = sorted(set(config.loss_params) - known)
    if unknown:
        raise ConfigError(f"unknown loss settings {unknown}: known are {sorted(known)}")
    return strategy(config)
