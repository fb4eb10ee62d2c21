"""Run configuration: every knob of the pipeline, as plain dataclasses that round-trip to JSON.

A method preset (``presets.py``) fills these with a paper's recipe; each field can still be set on
its own, so recipes can be mixed. The resolved config is written into the run directory and into
every checkpoint, so a run can be inspected and reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _is_non_negative(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _is_non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: How ``PseudoMaskConfig.scale_fusion`` combines the scales (core/stage1/pseudo_masks.py).
SCALE_FUSIONS = ("vote", "mean")

#: ``SegmenterConfig.encoder_init``: the ``weights`` setting, or the run's stage-1 backbone.
ENCODER_INITS = ("weights", "classifier")

#: ``RunConfig.train_precision`` (``devices.training_autocast`` says what each one does).
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")

_RULES = {_is_count: "a whole number of at least 1", _is_positive: "a number above 0",
          _is_non_negative: "a number of at least 0",
          _is_non_negative_int: "a whole number of at least 0"}


def require(section: str, rule, **settings: Any) -> None:
    """One ``ConfigError`` naming the first setting (None: unset, allowed) that breaks
    ``rule``; a tuple is checked entry by entry. Checked where a run is set up or trained, so
    the CLI, the widgets and library callers are refused the same way, before any work."""
    for name, value in settings.items():
        values = value if isinstance(value, tuple) else (value,)
        if any(entry is not None and not rule(entry) for entry in values):
            raise ConfigError(f"{section}.{name} must be {_RULES[rule]}, not {value!r}")


@dataclass
class ClassifierConfig:
    """Stage 1: the multi-label CAM classifier."""

    backbone: str = "tf_efficientnet_lite0"  # a BACKBONES name or any timm model
    #: None: ImageNet weights (the offline EfficientNet-Lite0 file for that backbone, timm's
    #: download otherwise); "none": random init; a path: a local weights file.
    weights: str | None = None
    output_stride: int = 16
    #: Side of the square training inputs: larger patches are randomly cropped, smaller ones
    #: resized up. None: the patches' most common side, so typical patches are not resampled.
    input_size: int | None = 224
    #: FEATURE_MODULES names (models/feature_modules.py): "pda", "coord_attention", "ars" act in
    #: training only (absent from the CAM network); "esf" is part of the network, CAM network
    #: included.
    train_modules: tuple[str, ...] = ()
    pda_start_epoch: int = 3
    pda_gamma: float = 1.0
    pda_gamma_decay: float = 0.98
    pda_gamma_floor: float = 0.65
    ars_start_epoch: int = 2
    #: Deep-supervision weights for side heads then the main head (ESFAN 0.2/0.3/0.5).
    side_loss_weights: tuple[float, ...] = ()
    augment: str = "flips"  # "flips" | "arml" (flips + blur + colour jitter)
    normalise: str = "divide255"  # "divide255" | "imagenet" | "dataset"
    epochs: int = 20
    batch_size: int = 20
    #: With momentum 0.9, lr 0.001 takes the released steps lr / (1 - momentum) = 0.01: the
    #: released optimiser (lr 0.01) has effectively no momentum (docs/algorithms.md 0). Momentum
    #: smooths the few hundred noisy steps of a CPU schedule; lr 0.01 with it diverges.
    lr: float = 0.001
    weight_decay: float = 5e-4
    new_layer_lr_mult: float = 10.0
    momentum: float = 0.9
    #: Epochs over which the lr ramps linearly from 0 to the schedule's (0: none, as released).
    #: The new layers' x10 lr with momentum can kick a fresh head into a poor start (seed-
    #: dependent first-epoch losses of 0.36-0.98 measured): a ramp over the first epoch avoids it.
    warmup_epochs: float = 0.0
    #: Classifiers trained, each with its own seed; the one whose val pseudo-masks, limited by
    #: its class gate, score best is kept (core/stage1/classifier_choice.py; needs val masks).
    candidates: int = 1

    def validate(self) -> None:
        require("classifier", _is_count, epochs=self.epochs, batch_size=self.batch_size,
                input_size=self.input_size, output_stride=self.output_stride,
                candidates=self.candidates)
        require("classifier", _is_positive, lr=self.lr, new_layer_lr_mult=self.new_layer_lr_mult)
        require("classifier", _is_non_negative, weight_decay=self.weight_decay,
                momentum=self.momentum, side_loss_weights=self.side_loss_weights,
                warmup_epochs=self.warmup_epochs)
        require("classifier", _is_non_negative_int, pda_start_epoch=self.pda_start_epoch,
                ars_start_epoch=self.ars_start_epoch)


@dataclass
class PseudoMaskConfig:
    """Turning class maps into pseudo-masks."""

    cam_method: str = "gradcam"  # a CAM_METHODS name (stage1/cams.py)
    #: Backbone layers whose maps make pseudo-masks; negative numbers count from the deepest.
    layers: tuple[str, ...] = ("-1",)
    #: When set, the layers' maps are fused with these weights into one pseudo-mask (ESFAN).
    fuse_weights: tuple[float, ...] | None = None
    #: Input scales the class maps are computed at (the first also gives the class
    #: probabilities the gate reads), combined by ``scale_fusion``.
    scales: tuple[float, ...] = (1.0,)
    #: "vote": each scale's mask votes pixel-wise (MSV: 1.0, 0.75, 1.25; ties to the first);
    #: "mean": the scales' normalised maps are averaged before the argmax, so an enlarged
    #: input's finer map sharpens the boundaries the native one places (docs/algorithms.md 12).
    scale_fusion: str = "vote"
    #: When > 0, each class map is averaged inside SLIC superpixels about this many pixels
    #: across before the argmax, so mask boundaries follow the tissue (stage1/superpixels.py).
    superpixel_size: int = 0
    gating: str = "label"  # a GATINGS name (stage1/pseudo_masks.py): "label" or "predicted"
    #: Training patches that overlap in their source image (positions in their names) get
    #: one fused final mask there: mean class maps, classes every covering gate kept
    #: (stage1/overlap_fusion.py).
    fuse_overlaps: bool = False
    gate_threshold: float = 0.31
    #: None follows the dataset description.
    white_plane: bool | None = None
    batch_size: int = 16
    #: Self-training (stage2/self_training.py): a network trained first on the ``final``
    #: pseudo-masks relabels the training patches, restricted to each patch's labels, into
    #: ``pseudo_masks/refined/``; given as the settings it changes from the run's segmenter
    #: (e.g. ``{"arch": "pspnet", "encoder_depth": 3}``). Empty: none.
    teacher: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        require("pseudo_masks", _is_count, batch_size=self.batch_size)
        require("pseudo_masks", _is_non_negative_int, superpixel_size=self.superpixel_size)
        require("pseudo_masks", _is_positive, scales=self.scales)
        if self.scale_fusion not in SCALE_FUSIONS:
            raise ConfigError(f"pseudo_masks.scale_fusion must be one of {list(SCALE_FUSIONS)}, "
                              f"not {self.scale_fusion!r}")
        require("pseudo_masks", _is_non_negative, gate_threshold=self.gate_threshold,
                fuse_weights=self.fuse_weights)


#: The pseudo-mask folder a self-training teacher writes (``PseudoMaskConfig.teacher``).
REFINED_TARGET = "refined"

#: Settings the companion segmenter shares with its strategy's network (prediction-level).
COMPANION_SHARED = frozenset({"companion", "normalise", "class_gate", "fit_class_offsets",
                              "tta", "appearance_weight"})


@dataclass
class SegmenterConfig:
    """Stage 2: the segmenter and its noise-suppression strategy."""

    arch: str = "deeplabv3plus"  # an ARCHITECTURES name (models/segmenter.py)
    encoder: str = "tf_efficientnet_lite0"
    weights: str | None = None  # as ClassifierConfig.weights
    #: Where the encoder starts: "weights" (``weights`` above: ImageNet by default) or
    #: "classifier", the run's trained stage-1 backbone, which already tells this dataset's
    #: tissues apart (same encoder only).
    encoder_init: str = "weights"
    encoder_depth: int | None = None  # None: the architecture's default
    #: Channels of the decoder's convolutions (DeepLabV3+'s ASPP and decoder, PSPNet's pooling
    #: output, a U-Net's first decoder stage, halved per stage); None: the architecture's
    #: default (256, 512, 256). On a CPU DeepLabV3+'s wide decoder is a third to almost half
    #: of its training step (docs/results.md, "twenty-first session").
    decoder_channels: int | None = None
    aux_head: bool = False  # MSV's auxiliary FCN head (loss weight 0.4)
    cam_head: bool = False  # HisynSeg's classification/CAM head
    loss: str = "ce"  # a LOSSES name (stage2/losses.py)
    loss_params: dict[str, Any] = field(default_factory=dict)
    #: Pseudo-mask folders (under ``pseudo_masks/``) the loss reads, main target first, and
    #: their weights for multi-layer CE. "final" is the recipe's own mask (deepest layer, vote
    #: or fusion); "layer-1", "layer-2", ... are the per-layer masks of a multi-layer recipe.
    targets: tuple[str, ...] = ("final",)
    target_weights: tuple[float, ...] = (1.0,)
    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.01
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "poly"  # "poly" | "constant"
    min_lr: float = 0.0  # floor of the poly schedule (mmseg's min_lr; MSV-ONSS 1e-4)
    epochs: int = 20
    batch_size: int = 20
    #: Side of the square training inputs (rounded down to the encoder's stride): larger
    #: patches are randomly cropped, smaller ones resized up. None: the patches' most common
    #: side, so typical patches keep the magnification that inference sees.
    input_size: int | None = 224
    #: Pixels of the stitched source image around each training patch that its training
    #: window takes in (0: the patch alone; data/stitching.py): more tissue per input at the
    #: patches' magnification, from patches that overlap in their source image.
    context: int = 0
    augment: str = "flip_blur"  # "flip_blur" | "onss" (rescale, crop, flip, photometric)
    #: "uniform": each patch once per epoch (the papers); "balanced": patches drawn with
    #: replacement, weighted by the rarest class in their label (see ``epoch_order``).
    sampling: str = "uniform"
    #: Probability that a training input is a 2 x 2 mosaic of four patches' half-size crops
    #: (``train_segmenter.mosaic_sample``), so that classes never labelled together meet.
    mosaic: float = 0.0
    normalise: str = "divide255"
    #: MLPS classification gate: classes with classifier probability <= this are suppressed.
    class_gate: float | None = None
    #: Fit a log-probability offset per class on the val masks after training, kept where it
    #: raises val mIoU (``core.inference.calibration``).
    fit_class_offsets: bool = False
    tta: str = "none"  # a TTA_MODES name (inference/predict.py)
    #: Weight of each image's own appearance model in prediction (``log p + weight * log q``,
    #: ``core.inference.appearance``): region boundaries moved onto stain edges. 0: off.
    appearance_weight: float = 0.0
    #: Decay of an exponential moving average of the weights, validated and saved instead of
    #: the raw weights (None: off). 0.99 averages over about the last 100 steps; short runs
    #: average over at most their last quarter (``train_segmenter.average_decay``).
    weight_average: float | None = None
    #: A second network trained on the same pseudo-masks (before this one, in the same job),
    #: given as the settings it changes (e.g. ``{"arch": "pspnet", "encoder_depth": 3}``);
    #: prediction averages the two networks' class probabilities (docs/algorithms.md 14).
    #: Empty: none.
    companion: dict[str, Any] = field(default_factory=dict)

    def companion_settings(self) -> SegmenterConfig | None:
        """The companion network's full settings, or None where there is none."""
        if not self.companion:
            return None
        fixed = sorted(set(self.companion) & COMPANION_SHARED)
        if fixed:
            raise ConfigError(f"segmenter.companion cannot change {', '.join(fixed)}: the two "
                              "networks are one predictor, with one normalisation, gate, "
                              "offsets, appearance model and test-time augmentation")
        return self.changed({**self.companion, "companion": {}}, "segmenter.companion")

    def changed(self, changes: dict[str, Any], where: str) -> SegmenterConfig:
        """A copy with ``changes`` (settings by name, lists read as tuples, as run.json gives
        them); ``where`` names the section they came from when one is unknown."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown settings {unknown} in {where}")
        return dataclasses.replace(self, **{
            key: tuple(value) if isinstance(value, list) else value
            for key, value in changes.items()})

    def validate(self) -> None:
        if self.encoder_init not in ENCODER_INITS:
            raise ConfigError(f"segmenter.encoder_init must be one of {', '.join(ENCODER_INITS)}, "
                              f"not {self.encoder_init!r}")
        if self.weight_average is not None and not 0 < self.weight_average < 1:
            raise ConfigError(f"segmenter.weight_average must be between 0 and 1 (a decay), "
                              f"not {self.weight_average!r}")
        require("segmenter", _is_count, epochs=self.epochs, batch_size=self.batch_size,
                input_size=self.input_size, encoder_depth=self.encoder_depth,
                decoder_channels=self.decoder_channels)
        require("segmenter", _is_positive, lr=self.lr, head_lr_mult=self.head_lr_mult)
        if not (isinstance(self.context, int) and not isinstance(self.context, bool)
                and self.context >= 0):
            raise ConfigError(f"segmenter.context must be a whole number of pixels (0 or more), "
                              f"not {self.context!r}")
        if not 0 <= self.mosaic <= 1:
            raise ConfigError(f"segmenter.mosaic must be a probability (0 to 1), not "
                              f"{self.mosaic!r}")
        require("segmenter", _is_non_negative, momentum=self.momentum, min_lr=self.min_lr,
                weight_decay=self.weight_decay, target_weights=self.target_weights,
                class_gate=self.class_gate, appearance_weight=self.appearance_weight)
        companion = self.companion_settings()
        if companion is not None:
            companion.validate()


@dataclass
class HisynSegConfig:
    """HisynSeg: synthesis, the real-vs-synthetic filter and self-training."""

    images_per_type: int = 3600
    discriminator_images: int = 10000
    discriminator_epochs: int = 5
    #: timm model of the real-vs-synthetic filter (random init): ResNet-18 as released.
    discriminator_arch: str = "resnet18"
    discriminator_batch_size: int = 256
    accept_threshold: float = 0.5
    bezier_points: int = 5
    bezier_rad: float = 0.2
    bezier_edgy: float = 0.05
    self_training: bool = True
    consistency_weight: float = 1.0

    def validate(self) -> None:
        require("hisynseg", _is_count, images_per_type=self.images_per_type,
                discriminator_images=self.discriminator_images,
                discriminator_epochs=self.discriminator_epochs,
                discriminator_batch_size=self.discriminator_batch_size,
                bezier_points=self.bezier_points)
        require("hisynseg", _is_non_negative, accept_threshold=self.accept_threshold,
                bezier_rad=self.bezier_rad, bezier_edgy=self.bezier_edgy,
                consistency_weight=self.consistency_weight)


@dataclass
class RunConfig:
    """Everything a run needs; written as ``run.json`` in the run directory."""

    method: str = "mlps"  # a METHODS name (config/presets.py)
    data_dir: str = ""
    dataset: dict[str, Any] = field(default_factory=dict)  # DatasetSpec.to_dict()
    seed: int = 0
    device: str = "auto"
    #: A PRESET_SCHEDULES name (config/presets.py): "fast" scales the schedules to the dataset
    #: and a CPU; "paper" uses the papers' schedules.
    schedule: str = "fast"
    #: Microns per pixel of the training patches, where known (slide inference matches it).
    mpp: float | None = None
    #: Autocast of the trainers (``TRAIN_PRECISIONS``): "auto" (mixed precision on CUDA,
    #: fp32 elsewhere), "fp32", or "bf16" (also on CPUs with bf16 kernels).
    train_precision: str = "auto"
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    pseudo_masks: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    hisynseg: HisynSegConfig | None = None
    #: Stages trained on past their section's ``epochs`` ("train N more epochs",
    #: core/training/extension.py): stage name ("classifier", "segmenter:ce") -> the epochs
    #: the stage now runs to. The sections keep the original plan.
    extended_epochs: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        """Every section's numbers; a HisynSeg run (``hisynseg`` set) trains no classifier,
        so its classifier section is not checked."""
        require("run", _is_non_negative_int, seed=self.seed)
        require("run", _is_positive, mpp=self.mpp)
        if self.train_precision not in TRAIN_PRECISIONS:
            raise ConfigError(f"run.train_precision must be one of {', '.join(TRAIN_PRECISIONS)}"
                              f", not {self.train_precision!r}")
        require("run", _is_count, **{f"extended_epochs[{stage}]": epochs
                                     for stage, epochs in self.extended_epochs.items()})
        if self.hisynseg is None:
            self.classifier.validate()
        else:
            self.hisynseg.validate()
        self.pseudo_masks.validate()
        self.segmenter.validate()
        teacher = self.teacher_settings()
        if teacher is not None:
            teacher.validate()
        if REFINED_TARGET in self.segmenter.targets and teacher is None:
            raise ConfigError(f"segmenter.targets reads '{REFINED_TARGET}' pseudo-masks, which "
                              "only a teacher makes: set pseudo_masks.teacher")

    def teacher_settings(self) -> SegmenterConfig | None:
        """The self-training teacher's full settings (the run's segmenter with the teacher's
        changes, trained on the ``final`` pseudo-masks, alone), or None where there is none."""
        if not self.pseudo_masks.teacher:
            return None
        return self.segmenter.changed({**self.pseudo_masks.teacher, "companion": {},
                                       "targets": ("final",), "target_weights": (1.0,)},
                                      "pseudo_masks.teacher")

    def stage_epochs(self, stage: str, planned: int) -> int:
        """The epochs ``stage`` runs to: its extension where it has one, else ``planned`` (the
        epochs of its config section)."""
        return self.extended_epochs.get(stage, planned)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        sections = {
            "classifier": ClassifierConfig,
            "pseudo_masks": PseudoMaskConfig,
            "segmenter": SegmenterConfig,
            "hisynseg": HisynSegConfig,
        }
        for name, section in sections.items():
            if data.get(name) is not None:
                data[name] = section_from_dict(section, data[name])
        return _build(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError("run configuration not found", path) from None
        except (json.JSONDecodeError, TypeError) as error:
            raise ConfigError(f"unreadable run configuration ({error})", path) from None


def section_from_dict(section: type, data: dict[str, Any]):
    """Build a config section, turning JSON lists back into tuples."""
    values = {}
    hints = {f.name: f for f in dataclasses.fields(section)}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown setting '{key}' for {section.__name__}")
        values[key] = tuple(value) if isinstance(value, list) else value
    return section(**values)


def _build(cls, data: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)} for {cls.__name__}")
    return cls(**data)


def override(section, **changes):
    """A copy of a config section with the non-None ``changes`` applied (CLI flags)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    valid = {f.name for f in dataclasses.fields(section)}
    unknown = set(changes) - valid
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)} for {type(section).__name__}")
    return dataclasses.replace(section, **changes)
