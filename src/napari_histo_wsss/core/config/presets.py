"""Method presets: each fills every knob with a paper's recipe (docs/algorithms.md 10-11).

Presets set the recipe, not the backbone: the default backbone everywhere is EfficientNet-Lite0
with ImageNet weights that ship with the package, so every command runs offline and on a CPU.
``--backbone res38d --weights FILE`` reproduces the papers' set-up for users who have them.

Two schedules: ``paper`` keeps the published epochs and batch sizes (for a GPU); ``fast`` scales
them to the dataset so the whole pipeline on a few hundred patches finishes in minutes on a CPU.
Epoch-indexed switches (PDA, ARS start) are scaled with the epochs so the recipe keeps its shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import Registry
from .run_config import (
    REFINED_TARGET,
    ClassifierConfig,
    HisynSegConfig,
    PseudoMaskConfig,
    RunConfig,
    SegmenterConfig,
)


@dataclass(frozen=True)
class MethodPreset:
    """Everything known about one method: its recipe and the released codes' paper schedule."""

    build: Callable[[], RunConfig]
    #: Paper epochs of stage 1 and stage 2 (HisynSeg: per training round).
    classifier_epochs: int
    segmenter_epochs: int
    #: Segmenter images per run on the ``fast`` schedule (epochs = this / patches): a recipe
    #: whose weight average needs more steps to settle gets more.
    fast_segmenter_images: int = 2500
    #: Classifier images per run on the ``fast`` schedule (epochs = this / patches).
    fast_classifier_images: int = 3000
    #: The segmenter's decoder width on ``fast`` (None: the recipe's own): a narrower decoder
    #: trains faster on a CPU, and the time can buy more than the width does there.
    fast_decoder_channels: int | None = None

    @property
    def has_classifier(self) -> bool:
        """False for HisynSeg, which trains its segmenter from synthetic images instead."""
        return self.classifier_epochs > 0


#: Method presets by the name users give (``--method``).
METHODS: Registry[MethodPreset] = Registry("method")
#: How a preset's paper schedule is adapted: ``schedule(config, method, num_patches)`` edits
#: it in place.
PRESET_SCHEDULES: Registry[Callable[[RunConfig, MethodPreset, int], None]] = Registry("schedule")


def method_preset(name: str, classifier_epochs: int, segmenter_epochs: int,
                  fast_segmenter_images: int = 2500, fast_classifier_images: int = 3000,
                  fast_decoder_channels: int | None = None):
    """Decorator: register a recipe builder as the method ``name`` with its paper epochs."""

    def register(build: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        METHODS.add(name, MethodPreset(build, classifier_epochs, segmenter_epochs,
                                       fast_segmenter_images, fast_classifier_images,
                                       fast_decoder_channels))
        return build

    return register


def methods_with_classifier() -> tuple[str, ...]:
    """The methods whose first stage is a CAM classifier."""
    return tuple(name for name, method in METHODS.items() if method.has_classifier)


#: The method used when none is named: the best measured on WSSS4LUAD (docs/results.md).
DEFAULT_METHOD = "recommended"


#: ESFAN's segmenter network and training (PSPNet on the encoder's first three stages, the
#: patches at their own size, flips and blur, no weight average): the recipe's companion,
#: whose errors differ from the DeepLabV3+'s (+3.1 val mIoU as shipped when averaged with it,
#: three seeds, docs/results.md).
ESFAN_SEGMENTER_NETWORK = {
    "arch": "pspnet", "encoder_depth": 3, "decoder_channels": None, "head_lr_mult": 1.0,
    "input_size": None, "context": 0, "augment": "flip_blur", "weight_average": None,
}


@method_preset("recommended", classifier_epochs=20, segmenter_epochs=20,
               fast_segmenter_images=5000, fast_classifier_images=5600,
               fast_decoder_channels=128)
def _recommended() -> RunConfig:
    """Our composition (docs/algorithms.md 12): ESFAN's fused multi-layer CAM pseudo-masks
    from a classifier trained on about twice ``fast``'s images (its class maps were the cap:
    +3.2 val pseudo-mask mIoU for 10 epochs instead of 5), computed at the native and the
    doubled input size and averaged; a full-depth DeepLabV3+ trained with cross-entropy on
    D4 + H&E stain augmentation, a weight average as the kept model, a single forward pass
    (D4 test-time augmentation cost the averaged models 1.4-2.3 mIoU), and MLPS's
    classification gate at p 0.1, which the pipeline keeps only where it helps on val
    (+1.6 val mIoU over three seeds and a third of the spread, docs/results.md), then class
    offsets fitted on val (``core.inference.calibration``: +3.7 on held-out halves of val
    before the appearance model; +1.3 on the five runs of 2026-12-03, one seed carrying most).
    Training patches that overlap in their source image are stitched (docs/algorithms.md 13):
    one fused pseudo-mask where they overlap, and segmenter inputs cut from windows 80 px
    wider than the patch, 224-px crops at the patches' magnification. Those crops cost twice
    a 160-px one, so ``fast`` gives the segmenter 5,000 images (9 epochs on 557 patches) to
    stay inside 20 minutes on two CPU cores: +1.9 val mIoU as shipped over three seeds, a
    quarter of the spread (docs/results.md). A companion network, ESFAN's PSPNet trained on the
    same pseudo-masks, is averaged with the DeepLabV3+ at prediction (docs/algorithms.md 14),
    and each image's own colour/texture model moves the pair's boundaries onto its stain edges
    (docs/algorithms.md 15). Two classifiers are trained and the one whose val pseudo-masks,
    limited by its class gate, score best is kept (docs/algorithms.md 17: over four ``fast``
    seeds the spread between seeds halves, 68.49 +- 2.13 -> 69.28 +- 0.97 as shipped). On
    ``fast`` the second classifier is paid for by the DeepLabV3+'s decoder at 128 channels
    instead of 256: its training epochs take 42 s instead of 76 on two CPU cores and the four
    seeds end within 0.5 of the wide decoder's (69.18 +- 0.86), so a ``fast`` run with two
    classifiers takes about 16 minutes. ``long`` has the time and keeps the wide decoder (the
    narrow one ended 0.85 lower on its one measured seed; docs/results.md, "twenty-first
    session")."""
    config = _esfan()
    config.classifier.warmup_epochs = 1.0
    config.classifier.candidates = 2
    config.pseudo_masks.scales = (1.0, 2.0)
    config.pseudo_masks.scale_fusion = "mean"
    config.pseudo_masks.fuse_overlaps = True
    config.segmenter = SegmenterConfig(
        arch="deeplabv3plus", loss="ce", lr=0.01, head_lr_mult=10.0, augment="histo",
        weight_average=0.99, class_gate=0.1, fit_class_offsets=True,
        context=80, input_size=224, companion=dict(ESFAN_SEGMENTER_NETWORK, epochs=20),
        appearance_weight=0.5,
    )
    return config


@method_preset("mlps", classifier_epochs=20, segmenter_epochs=30)
def _mlps() -> RunConfig:
    return RunConfig(
        classifier=ClassifierConfig(train_modules=("pda",), batch_size=20),
        pseudo_masks=PseudoMaskConfig(cam_method="gradcam", layers=("-1", "-2", "-3")),
        segmenter=SegmenterConfig(
            arch="deeplabv3plus", loss="multilayer_ce", targets=("layer-1", "layer-2", "layer-3"),
            target_weights=(0.6, 0.2, 0.2), lr=0.01, head_lr_mult=10.0, batch_size=20,
            class_gate=0.1,
        ),
    )


@method_preset("msv-onss", classifier_epochs=20, segmenter_epochs=20)
def _msv_onss() -> RunConfig:
    return RunConfig(
        classifier=ClassifierConfig(
            train_modules=("pda", "coord_attention"), batch_size=16, input_size=512,
        ),
        pseudo_masks=PseudoMaskConfig(
            cam_method="gradcampp", layers=("-1",), scales=(1.0, 0.75, 1.25),
        ),
        segmenter=SegmenterConfig(
            arch="pspnet", aux_head=True, loss="onss", lr=0.005, head_lr_mult=1.0, min_lr=1e-4,
            batch_size=16, augment="onss", normalise="dataset", tta="multiscale",
        ),
    )


@method_preset("arml", classifier_epochs=20, segmenter_epochs=10)
def _arml() -> RunConfig:
    return RunConfig(
        classifier=ClassifierConfig(train_modules=("ars",), augment="arml"),
        pseudo_masks=PseudoMaskConfig(cam_method="gradcam", layers=("-1",)),
        segmenter=SegmenterConfig(
            arch="pspnet", encoder_depth=3, loss="arml",
            loss_params={"swv_weight": 0.8, "srm_weight": 0.2},
            lr=0.005, head_lr_mult=1.0,
        ),
    )


@method_preset("esfan", classifier_epochs=20, segmenter_epochs=20)
def _esfan() -> RunConfig:
    return RunConfig(
        classifier=ClassifierConfig(train_modules=("esf",), side_loss_weights=(0.2, 0.3, 0.5)),
        pseudo_masks=PseudoMaskConfig(
            cam_method="cam", layers=("-3", "-2", "-1"), fuse_weights=(0.47, 0.05, 0.47),
            gating="predicted", gate_threshold=0.31, white_plane=True,
        ),
        segmenter=SegmenterConfig(
            arch="pspnet", encoder_depth=3, loss="anm", lr=0.01, head_lr_mult=1.0,
        ),
    )


@method_preset("hisynseg", classifier_epochs=0, segmenter_epochs=25)
def _hisynseg() -> RunConfig:
    return RunConfig(
        segmenter=SegmenterConfig(
            arch="deeplabv3plus", cam_head=True, loss="hisynseg", optimizer="adamw",
            lr=1e-4, head_lr_mult=1.0, weight_decay=0.05, schedule="constant", batch_size=32,
            normalise="imagenet", tta="d4",
        ),
        hisynseg=HisynSegConfig(),
    )


@method_preset("cam-ce", classifier_epochs=20, segmenter_epochs=20)
def _cam_ce() -> RunConfig:
    """The baseline: plain CAM pseudo-masks and plain cross-entropy."""
    return RunConfig(
        pseudo_masks=PseudoMaskConfig(cam_method="cam", layers=("-1",)),
        segmenter=SegmenterConfig(arch="deeplabv3plus", loss="ce"),
    )


def preset(method: str, schedule: str = "fast", num_patches: int | None = None,
           self_train: bool = False) -> RunConfig:
    """The run configuration of ``method``; ``fast`` scales epochs to ``num_patches``;
    ``self_train`` adds the self-training teacher (``with_self_training``)."""
    method = method.lower()
    recipe = METHODS.get(method)
    adapt = PRESET_SCHEDULES.get(schedule)
    config = recipe.build()
    config.method = method
    config.schedule = schedule
    config.classifier.epochs = recipe.classifier_epochs
    config.segmenter.epochs = recipe.segmenter_epochs
    if self_train:
        with_self_training(config)
    adapt(config, recipe, num_patches or 500)
    return config


#: The self-training teacher that ``--self-train`` adds to any CAM method (docs/algorithms.md
#: 16): ESFAN's PSPNet with plain cross-entropy and each image's appearance model, whatever
#: the method's own segmenter, so every method's pseudo-masks are relabelled the same way
#: (docs/results.md, "fifteenth session": it lifts the paper presets' masks past 65
#: label-gated val mIoU in 6 of 8 runs, not ESFAN's seed 2). 20 epochs is the paper
#: schedule; ``fast`` and ``long`` scale it by ``TEACHER_IMAGES``.
SELF_TRAINING_TEACHER = {
    **ESFAN_SEGMENTER_NETWORK, "epochs": 20, "aux_head": False, "cam_head": False,
    "loss": "ce", "loss_params": {}, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
    "weight_decay": 5e-4, "schedule": "poly", "min_lr": 0.0, "batch_size": 16,
    "sampling": "uniform", "mosaic": 0.0, "normalise": "divide255", "class_gate": None,
    "fit_class_offsets": False, "tta": "none", "appearance_weight": 0.5,
}


def with_self_training(config: RunConfig) -> None:
    """Add the self-training teacher to ``config`` in place: its segmenter then trains on the
    teacher's relabelled masks (``refined``) where it trained on the ``final`` ones. A method
    without a classifier, or whose segmenter learns from other masks (MLPS's three layers),
    has nothing the teacher could replace: refused with the reason."""
    if config.hisynseg is not None:
        raise ConfigError("self-training relabels class-map pseudo-masks, and HisynSeg trains "
                          "on synthetic images without any")
    targets = config.segmenter.targets
    if "final" not in targets:
        raise ConfigError(f"self-training relabels the 'final' pseudo-masks, and the "
                          f"{config.method} segmenter learns from {', '.join(targets)}: "
                          "self-train another method")
    config.pseudo_masks.teacher = dict(SELF_TRAINING_TEACHER)
    config.segmenter.targets = tuple(REFINED_TARGET if target == "final" else target
                                     for target in targets)


@PRESET_SCHEDULES.register("fast")
def _scale_to_cpu(config: RunConfig, method: MethodPreset, num_patches: int) -> None:
    """Fewer epochs, native patch size and smaller batches, keeping each recipe's proportions.

    About 3,000-5,600 classifier and 2,500-7,000 segmenter images per run (per recipe) on two CPU
    cores; epoch switches (PDA from the 4th of 20 epochs) move with the epoch count.
    """
    _scale_budget(config, method, num_patches, budget=1.0)
    if method.fast_decoder_channels is not None:
        config.segmenter.decoder_channels = method.fast_decoder_channels


@PRESET_SCHEDULES.register("long")
def _scale_to_cpu_hour(config: RunConfig, method: MethodPreset, num_patches: int) -> None:
    """``fast`` with LONG_BUDGET times its images: under an hour on two CPU cores."""
    _scale_budget(config, method, num_patches, budget=LONG_BUDGET)


#: The companion segmenter's images per run on ``fast`` (ESFAN's segmenter budget).
COMPANION_IMAGES = 2500

#: The self-training teacher's images per run on ``fast``: twice the companion's, as the
#: labels of every later network come from it.
TEACHER_IMAGES = 5000

#: How many times the ``fast`` schedule's training images ``long`` gets.
LONG_BUDGET = 2.0


def _scale_budget(config: RunConfig, method: MethodPreset, num_patches: int,
                  budget: float) -> None:
    """Epochs from an image budget (never above the paper's), native patch size, batches of
    at most 16; the PDA/ARS start epochs and the PDA decay rescaled with the epochs."""
    patches = max(num_patches, 1)
    classifier = config.classifier
    paper_epochs = max(classifier.epochs, 1)
    classifier.epochs = int(min(paper_epochs, max(
        3, round(budget * method.fast_classifier_images / patches))))
    ratio = classifier.epochs / paper_epochs
    classifier.pda_start_epoch = max(1, round(classifier.pda_start_epoch * ratio))
    classifier.ars_start_epoch = max(1, round(classifier.ars_start_epoch * ratio))
    # Per-epoch gamma decay is compressed too, so the schedule still ends where 20 epochs would.
    classifier.pda_gamma_decay = classifier.pda_gamma_decay ** (1 / ratio)
    # Native patch size: no upsampling (MSV trains at 512 in the paper), no resampled scale.
    classifier.input_size = None
    classifier.batch_size = min(classifier.batch_size, 16)
    segmenter = config.segmenter
    segmenter.epochs = int(min(max(segmenter.epochs, 1), max(
        3, round(budget * method.fast_segmenter_images / patches))))
    segmenter.batch_size = min(segmenter.batch_size, 16)
    # Native patch size, as for the classifier: the magnification inference will see. HisynSeg's
    # synthetic images take that side too, so no source patch is mirror-padded up to 224.
    # Windows with context are larger than a patch: their crops keep the preset's side.
    if not segmenter.context:
        segmenter.input_size = None
    if "epochs" in segmenter.companion:  # a companion trains on ESFAN's image budget
        segmenter.companion = {**segmenter.companion, "epochs": int(min(
            segmenter.companion["epochs"], max(3, round(budget * COMPANION_IMAGES / patches))))}
    teacher = config.pseudo_masks.teacher
    if "epochs" in teacher:
        config.pseudo_masks.teacher = {**teacher, "epochs": int(min(
            teacher["epochs"], max(3, round(budget * TEACHER_IMAGES / patches))))}
    if config.hisynseg is not None:
        # Two training rounds share the segmenter budget. Synthetic images per type are half the
        # real patches (as released for WSSS4LUAD: 2 x 3,600 synthetic for 10,091 real), and a
        # ResNet-10-T filter trains in about 60 % of ResNet-18's time.
        hisynseg = config.hisynseg
        segmenter.epochs = min(segmenter.epochs, max(3, round(budget * 1500 / patches)))
        hisynseg.images_per_type = min(hisynseg.images_per_type, max(8, patches // 2))
        hisynseg.discriminator_images = min(hisynseg.discriminator_images, max(16, patches))
        hisynseg.discriminator_arch = "resnet10t"
        hisynseg.discriminator_batch_size = min(hisynseg.discriminator_batch_size, 32)


@PRESET_SCHEDULES.register("paper")
def _keep_paper_schedule(config: RunConfig, method: MethodPreset, num_patches: int) -> None:
    """The published epochs and batch sizes, for a GPU."""


def with_overrides(config: RunConfig, **changes) -> RunConfig:
    """A copy of ``config`` with top-level fields replaced (None values are ignored)."""
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
