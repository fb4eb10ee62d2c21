"""Every noise-suppression loss against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.run_config import SegmenterConfig
from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.models.segmenter import SegmenterOutput, build_segmenter
from napari_histo_wsss.core.stage2.losses import (
    IGNORE_INDEX,
    LOSSES,
    LossContext,
    LossTargets,
    anm_schedule,
    anm_terms,
    build_loss,
    consistency_loss,
    cross_entropy_with_background,
    dice_loss,
    image_classification_loss,
    onss_pixel_weights,
    relation_angle_loss,
    relation_distance_loss,
    swv_weights,
    with_background_channel,
)

C = 2  # tissue classes in these examples; 2 is background, 255 "no label"


def logits_of(*pixels) -> torch.Tensor:
    """(1, C, 1, W) logits from per-pixel lists of class scores."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, -1)


def mask_of(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).reshape(1, 1, -1)


def lse(*values) -> float:
    return math.log(sum(math.exp(v) for v in values))


def smooth_l1(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


# --------------------------------------------------------------------------------------------
# Cross-entropy with the +100 background channel (METHODS 1.3, 7.4)


def test_background_channel_is_100_at_background_only():
    logits = logits_of([1.0, 2.0], [0.5, -1.0], [3.0, 0.0])
    extended = with_background_channel(logits, mask_of(0, 2, 255), C)
    assert extended.shape == (1, 3, 1, 3)
    assert extended[0, 2, 0].tolist() == [0.0, 100.0, 0.0]


def test_cross_entropy_with_background_by_hand():
    logits = logits_of([1.0, 2.0], [0.5, -1.0], [3.0, 0.0])
    loss = cross_entropy_with_background(logits, mask_of(0, 2, 255), C)
    # tissue pixel: -O_y + log(1 + sum exp O_c) (the extra logit is 0); background pixel: ~0
    # (still in the mean's denominator); the 255 pixel is ignored.
    tissue = -1.0 + lse(1.0, 2.0, 0.0)
    background = -100.0 + lse(0.5, -1.0, 100.0)
    assert loss.item() == pytest.approx((tissue + background) / 2, rel=1e-5)
    assert background < 1e-40


def test_plain_ce_loss_and_aux_head_weight():
    loss = build_loss(SegmenterConfig(loss="ce"))
    main = logits_of([1.0, 2.0], [0.0, 0.0])
    aux = logits_of([0.0, 1.0], [2.0, 0.0])
    targets = LossTargets([mask_of(1, 0)])
    expected_main = ((-2.0 + lse(1, 2, 0)) + (0 + lse(0, 0, 0))) / 2
    expected_aux = ((-1.0 + lse(0, 1, 0)) + (-2.0 + lse(2, 0, 0))) / 2
    result = loss([SegmenterOutput(main, aux)], targets, LossContext(C))
    assert result.loss.item() == pytest.approx(expected_main + 0.4 * expected_aux, rel=1e-5)
    assert result.parts["aux"] == pytest.approx(expected_aux, rel=1e-5)
    assert result.pixel_weight is None


# --------------------------------------------------------------------------------------------
# MLPS multi-layer CE


def test_multilayer_ce_weights_and_batch_average():
    config = SegmenterConfig(loss="multilayer_ce", targets=("a", "b", "c"),
                             target_weights=(0.6, 0.2, 0.2))
    logits = logits_of([2.0, 0.0], [0.0, 1.0])
    masks = [mask_of(0, 1), mask_of(1, 1), mask_of(0, 2)]
    ce = {  # per pixel, per target class: -O_y + log(1 + sum exp O) (background: ~0)
        (0, 0): -2.0 + lse(2, 0, 0), (0, 1): lse(2, 0, 0),
        (1, 1): -1.0 + lse(0, 1, 0),
    }
    bn7 = (ce[0, 0] + ce[1, 1]) / 2
    b5 = (ce[0, 1] + ce[1, 1]) / 2
    # The background channel follows the main mask: pixel 1 is tissue there, so a background
    # target on it is an ordinary (large) CE term against the zero extra logit.
    b4 = (ce[0, 0] + (0.0 + lse(0, 1, 0))) / 2
    expected = 0.6 * bn7 + 0.2 * b5 + 0.2 * b4
    result = build_loss(config)([SegmenterOutput(logits)], LossTargets(masks), LossContext(C))
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    # Trust map: weight of the layers that agree with the main mask.
    assert result.pixel_weight.flatten().tolist() == pytest.approx([0.8, 0.8])

    doubled = torch.cat([logits, logits])
    batch_masks = [torch.cat([m, m]) for m in masks]
    averaged = build_loss(SegmenterConfig(
        loss="multilayer_ce", targets=("a", "b", "c"), target_weights=(0.6, 0.2, 0.2),
        loss_params={"batch_average": True},
    ))([SegmenterOutput(doubled)], LossTargets(batch_masks), LossContext(C))
    assert averaged.loss.item() == pytest.approx(expected / 2, rel=1e-5)


def test_multilayer_ce_needs_one_weight_per_target():
    loss = build_loss(SegmenterConfig(loss="multilayer_ce", target_weights=(0.6, 0.4)))
    with pytest.raises(ConfigError, match="target weights"):
        loss([SegmenterOutput(logits_of([1.0, 0.0]))], LossTargets([mask_of(0)]),
             LossContext(C))


# --------------------------------------------------------------------------------------------
# ONSS


def test_onss_weights_by_hand():
    logits = logits_of([2.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    mask = mask_of(0, 0, 1)
    loss_values = [-2 + lse(2, 0), -0 + lse(0, 1), -1 + lse(1, 1)]
    exps = [math.exp(-value) for value in loss_values]
    easy = [3 * e / sum(exps) for e in exps]  # softmax(-l) / mean(softmax(-l))
    sig = [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1)), 0.5]
    margins = [2 * s - 1 for s in sig]  # max q - min q with two classes
    expected = [e * m for e, m in zip(easy, margins, strict=True)]
    weight = onss_pixel_weights(logits, mask)
    assert weight.flatten().tolist() == pytest.approx(expected, rel=1e-5)

    result = build_loss(SegmenterConfig(loss="onss"))(
        [SegmenterOutput(logits)], LossTargets([mask]), LossContext(C))
    manual = sum(w * v for w, v in zip(expected, loss_values, strict=True)) / 3
    assert result.loss.item() == pytest.approx(manual, rel=1e-5)


def test_onss_single_label_image_gets_weight_one_and_background_is_ignored():
    logits = logits_of([2.0, 0.0], [0.0, 1.0], [0.3, 0.1])
    mask = mask_of(0, 0, C)  # one tissue label plus background
    result = build_loss(SegmenterConfig(loss="onss"))(
        [SegmenterOutput(logits)], LossTargets([mask]), LossContext(C))
    # Background -> ignore, so one distinct label: every weight resets to 1.
    expected = ((-2 + lse(2, 0)) + (0 + lse(0, 1)) + 0.0) / 3
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert result.pixel_weight.flatten().tolist() == [1.0, 1.0, 0.0]


# --------------------------------------------------------------------------------------------
# ARML: SWV and SRM


def test_swv_weights_two_where_peers_agree_half_elsewhere():
    second = logits_of([2.0, 0.0], [0.0, 1.0])
    third = logits_of([1.0, 0.5], [3.0, 0.0])
    assert swv_weights(second, third).flatten().tolist() == [2.0, 0.5]


def test_arml_loss_with_a_single_sample_is_the_weighted_ce():
    first = logits_of([1.0, 0.0], [0.0, 2.0])
    second = logits_of([2.0, 0.0], [0.0, 1.0])
    third = logits_of([1.0, 0.5], [3.0, 0.0])
    mask = mask_of(0, 1)
    result = build_loss(SegmenterConfig(loss="arml"))(
        [SegmenterOutput(o) for o in (first, second, third)], LossTargets([mask]),
        LossContext(C))
    ce = [-1 + lse(1, 0, 0), -2 + lse(0, 2, 0)]
    swv = (2.0 * ce[0] + 0.5 * ce[1]) / 2
    assert result.parts["srm"] == 0.0  # relations need two samples
    assert result.loss.item() == pytest.approx(0.8 * swv, rel=1e-5)
    assert result.pixel_weight.flatten().tolist() == [2.0, 0.5]


def _points(*xy) -> torch.Tensor:
    """(N, 1, 1, 2) samples whose flattened vectors are the given 2-D points."""
    return torch.tensor(xy, dtype=torch.float32).reshape(len(xy), 1, 1, 2)


STUDENT = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
TEACHER = [(0.0, 0.0), (2.0, 0.0), (0.0, 3.0)]


def test_relation_distance_term_by_hand():
    # Student distances 1, 1, sqrt 2; teacher 2, 3, sqrt 13; each divided by its mean.
    s_mean = (1 + 1 + math.sqrt(2)) / 3
    t_mean = (2 + 3 + math.sqrt(13)) / 3
    pairs = [(1 / s_mean, 2 / t_mean), (1 / s_mean, 3 / t_mean),
             (math.sqrt(2) / s_mean, math.sqrt(13) / t_mean)]
    expected = 2 * sum(smooth_l1(a, b) for a, b in pairs) / 9  # 9 entries, zero diagonal
    loss = relation_distance_loss(_points(*STUDENT), _points(*TEACHER))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_relation_angle_term_by_hand():
    def cosines(points):
        values = []
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    if i in (j, k):
                        values.append(0.0)
                        continue
                    u = [points[j][d] - points[i][d] for d in range(2)]
                    v = [points[k][d] - points[i][d] for d in range(2)]
                    values.append((u[0] * v[0] + u[1] * v[1]) / math.hypot(*u) / math.hypot(*v))
        return values

    # e.g. anchor 1: student cos((-1,0),(-1,1)) = 1/sqrt2, teacher cos((-2,0),(-2,3)) = 2/sqrt13
    assert cosines(STUDENT)[1 * 9 + 0 * 3 + 2] == pytest.approx(1 / math.sqrt(2))
    assert cosines(TEACHER)[1 * 9 + 0 * 3 + 2] == pytest.approx(2 / math.sqrt(13))
    expected = sum(smooth_l1(a, b) for a, b in
                   zip(cosines(STUDENT), cosines(TEACHER), strict=True)) / 27
    loss = relation_angle_loss(_points(*STUDENT), _points(*TEACHER))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_relation_terms_are_shift_invariant_and_zero_for_equal_geometry():
    student = _points(*STUDENT)
    assert relation_distance_loss(student, student * 2 + 5).item() == pytest.approx(0, abs=1e-6)
    assert relation_angle_loss(student, student * 2 + 5).item() == pytest.approx(0, abs=1e-6)


def test_arml_relation_part_uses_30_distance_and_60_angle():
    mask = torch.zeros(3, 1, 2, dtype=torch.int64)
    student = _points(*STUDENT).expand(3, 2, 1, 2).contiguous()
    teacher = _points(*TEACHER).expand(3, 2, 1, 2).contiguous()
    loss = build_loss(SegmenterConfig(loss="arml"))
    # Background channel is 0 everywhere here, so it adds nothing to the relations.
    relation = 30 * relation_distance_loss(student, teacher) \
        + 60 * relation_angle_loss(student, teacher)
    result = loss([SegmenterOutput(student), SegmenterOutput(teacher), SegmenterOutput(teacher)],
                  LossTargets([mask]), LossContext(C))
    assert result.parts["srm"] == pytest.approx(relation.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------
# ESFAN ANM


def test_anm_schedule_is_linear_per_epoch():
    assert anm_schedule(0, 20) == pytest.approx(
        {"alpha": 0.4, "beta": 0.4, "gamma": 0.2, "tau": 0.2})
    assert anm_schedule(10, 20) == pytest.approx(
        {"alpha": 0.6, "beta": 0.25, "gamma": 0.15, "tau": 0.35})
    assert anm_schedule(19, 20)["alpha"] == pytest.approx(0.78)


def test_anm_terms_by_hand():
    # 1 image, 2 tissue classes + background channel, 2 x 2 pixels.
    extended = torch.zeros(1, 3, 2, 2)
    extended[0, 0, 0, 0] = math.log(8.0)  # q = (0.8, 0.1, 0.1): confident
    extended[0, 1, 0, 1] = math.log(2.0)  # q = (0.25, 0.5, 0.25)
    # pixels (1, 0) and (1, 1): uniform 1/3
    mask = torch.tensor([[[0, 1], [1, 255]]])
    gated_ce, uncertainty, smoothness, gate = anm_terms(extended, mask, tau=0.45)
    assert gate[0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    # Only gated pixels with a label count; the mean runs over N x 3 x H x W = 12 entries.
    expected_ce = (-math.log(0.8 + 1e-6) - math.log(0.5 + 1e-6)) / 12
    assert gated_ce.item() == pytest.approx(expected_ce, rel=1e-5)
    confidences = [0.8, 0.5, 1 / 3, 1 / 3]
    expected_unc = -sum((1 - c) * math.log(1 - c + 1e-6) for c in confidences) / 4
    assert uncertainty.item() == pytest.approx(expected_unc, rel=1e-5)
    q = {(0, 0): (0.8, 0.1, 0.1), (0, 1): (0.25, 0.5, 0.25),
         (1, 0): (1 / 3,) * 3, (1, 1): (1 / 3,) * 3}
    vertical = sum(abs(q[1, x][c] - q[0, x][c]) for x in range(2) for c in range(3)) / 6
    horizontal = sum(abs(q[y, 1][c] - q[y, 0][c]) for y in range(2) for c in range(3)) / 6
    assert smoothness.item() == pytest.approx(vertical + horizontal, rel=1e-5)
    # Averaged per pixel instead (N x H x W = 4 entries), the other terms unchanged.
    per_pixel = anm_terms(extended, mask, tau=0.45, ce_reduction="pixel")
    assert per_pixel[0].item() == pytest.approx(expected_ce * 12 / 4, rel=1e-5)
    assert per_pixel[1].item() == pytest.approx(expected_unc, rel=1e-5)
    with pytest.raises(ConfigError, match="ce_reduction"):
        anm_terms(extended, mask, tau=0.45, ce_reduction="mean")


def test_anm_loss_combines_terms_with_the_epoch_schedule():
    logits = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.randint(0, C + 1, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    loss = build_loss(SegmenterConfig(loss="anm"))
    context = LossContext(C, epoch=2, total_epochs=4)
    weights = anm_schedule(2, 4)
    terms = anm_terms(with_background_channel(logits, mask, C), mask, weights["tau"])
    expected = weights["alpha"] * terms[0] + weights["beta"] * terms[1] \
        + weights["gamma"] * terms[2]
    result = loss([SegmenterOutput(logits)], LossTargets([mask]), context)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # As released: a fixed 20-epoch ramp, whatever the run's length.
    fixed = build_loss(SegmenterConfig(loss="anm", loss_params={"schedule_epochs": 20}))
    tau_fixed = anm_schedule(2, 20)["tau"]
    assert fixed([SegmenterOutput(logits)], LossTargets([mask]), context).pixel_weight.equal(
        anm_terms(with_background_channel(logits, mask, C), mask, tau_fixed)[3])


# --------------------------------------------------------------------------------------------
# HisynSeg: Dice, BCE on GAP(K), consistency


def test_dice_loss_ignores_background_by_hand():
    logits = logits_of([1.0, 0.0], [0.0, 1.0], [5.0, -5.0])
    target = mask_of(0, 1, C)  # the background pixel is left out
    p0 = [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]  # class-0 probability, pixels 0 and 1
    dice0 = 2 * p0[0] / (p0[0] + p0[1] + 1)
    dice1 = 2 * (1 - p0[1]) / ((1 - p0[0]) + (1 - p0[1]) + 1)
    assert dice_loss(logits, target).item() == pytest.approx(
        ((1 - dice0) + (1 - dice1)) / 2, rel=1e-5)


def test_dice_loss_absent_class_counts_as_zero_in_the_mean():
    logits = logits_of([1.0, 0.0], [0.0, 1.0])
    target = mask_of(0, 0)
    p0 = [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]
    dice0 = 2 * (p0[0] + p0[1]) / (p0[0] + p0[1] + 2)
    assert dice_loss(logits, target).item() == pytest.approx((1 - dice0) / 2, rel=1e-5)


def test_consistency_loss_by_hand():
    seg = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4)  # resizes to itself
    cam = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    s = 1 / (1 + math.exp(-1))
    # |softmax(S) - softmax(K)| = |s - (1 - s)| on both channels
    assert consistency_loss(seg, cam).item() == pytest.approx(abs(2 * s - 1), rel=1e-6)


def test_hisynseg_loss_is_dice_plus_bce_on_gap_of_k():
    config = SegmenterConfig(loss="hisynseg", cam_head=True)
    logits = logits_of([1.0, 0.0], [0.0, 1.0])
    cam = torch.tensor([[[[2.0, 0.0]], [[-1.0, -1.0]]]])  # GAP = (1, -1)
    labels = torch.tensor([[1.0, 0.0]])
    result = build_loss(config)([SegmenterOutput(logits, cam=cam)],
                                LossTargets([mask_of(0, 1)], labels), LossContext(C))
    bce = math.log(1 + math.exp(-1))  # both entries: sigmoid(1) vs 1, sigmoid(-1) vs 0
    assert image_classification_loss(torch.tensor([[1.0, -1.0]]), labels).item() \
        == pytest.approx(bce, rel=1e-6)
    assert result.loss.item() == pytest.approx(
        dice_loss(logits, mask_of(0, 1)).item() + bce, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Registry


@pytest.fixture(scope="module")
def real_batch(sample_dataset_dir):
    """Four real patches cropped to 64 x 64, their labels, and three pseudo-masks each made of
    the label's classes in shifted bands (white pixels background, a padded ignore strip)."""
    patches = find_dataset(sample_dataset_dir).patches()
    spec = patches.spec
    indices = range(0, len(patches), len(patches) // 4)
    images = np.stack([patches.image(i)[:64, :64] for i in indices][:4])
    labels = torch.tensor(patches.labels[list(indices)[:4]], dtype=torch.float32)
    masks = []
    for shift in (0, 5, 11):
        rows = []
        for image, label in zip(images, labels, strict=True):
            classes = np.flatnonzero(label.numpy())
            band = classes[((np.arange(64) + shift) * len(classes) // 64) % len(classes)]
            mask = np.repeat(band[:, None], 64, axis=1)
            mask[image.mean(axis=-1) > 220] = spec.background_index
            mask[:, -3:] = IGNORE_INDEX
            rows.append(mask)
        masks.append(torch.tensor(np.stack(rows), dtype=torch.int64))
    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    return x, LossTargets(masks, labels), spec.num_classes


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_trains_on_a_real_batch(real_batch, name):
    """The contract of a registered loss: a finite differentiable loss, a trust map of the
    batch's pixel shape (or None), and the parts it declares for the loss log."""
    x, targets, num_classes = real_batch
    settings = SegmenterConfig(arch="pspnet", encoder_depth=3, weights="none", aux_head=True,
                               cam_head=True, loss=name, target_weights=(0.6, 0.2, 0.2))
    torch.manual_seed(0)
    model = build_segmenter(settings, num_classes).train()
    loss_fn = build_loss(settings)
    result = loss_fn([model(x) for _ in range(loss_fn.num_passes)], targets,
                     LossContext(num_classes, epoch=1, total_epochs=3))
    assert result.loss.ndim == 0 and torch.isfinite(result.loss)
    result.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    if result.pixel_weight is not None:
        assert result.pixel_weight.shape == targets.masks[0].shape
        assert not result.pixel_weight.requires_grad
    assert set(loss_fn.part_names) <= set(result.parts)
    assert all(math.isfinite(value) for value in result.parts.values())


def test_unknown_losses_and_settings_are_explained():
    with pytest.raises(ConfigError, match="unknown segmenter loss 'focal': choose one of ce, "):
        build_loss(SegmenterConfig(loss="focal"))
    with pytest.raises(ConfigError, match="unknown loss settings"):
        build_loss(SegmenterConfig(loss="ce", loss_params={"swv_wieght": 1}))
    with pytest.raises(ConfigError, match="CAM head"):
        build_loss(SegmenterConfig(loss="hisynseg"))
    # Settings of another strategy are accepted (a preset's params survive --loss changes).
    assert build_loss(SegmenterConfig(loss="anm", loss_params={"swv_weight": 0.8})).params == {
        "schedule_epochs": None, "ce_reduction": "released"}
    with pytest.raises(ConfigError, match="ce_reduction"):
        build_loss(SegmenterConfig(loss="anm", loss_params={"ce_reduction": "sum"}))
