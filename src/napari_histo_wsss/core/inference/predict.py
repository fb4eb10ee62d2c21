"""Prediction with a trained segmenter: test-time augmentation, the class gate, any image size,
and evaluation on images with masks (docs/algorithms.md 1.4, 2.4, 5.5, 7.5).

``SegmentationPredictor.predict_batch`` maps uint8 (N, H, W, 3) images to float32 (N, C, H, W)
class probabilities; it is what ``core.tiling`` and slide inference call per tile. Images up to
``WHOLE_IMAGE_LIMIT`` pixels a side are predicted in one pass (the papers' protocol for
patches), larger ones tile by tile with blended overlaps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config.run_config import RunConfig
from ..data.classes import DatasetSpec
from ..data.datasets import EvalSet, read_mask, write_palette_mask
from ..devices import autocast_dtype, resolve_device
from ..errors import CheckpointError, ConfigError, DatasetError
from ..models.ensemble import SegmenterEnsemble, companion_checkpoint, load_with_companion
from ..models.segmenter import Segmenter, normalise
from ..registry import Registry
from ..runs.run_dir import RunDirectory
from .appearance import STROKE_WEIGHT, refine_by_appearance
from .engines import Engine, ExportCache, averaged_with, torch_engine
from .metrics import ConfusionMatrix, per_image_spread

#: MSV's test scales (relative to the native patch size), softmax-averaged.
MULTISCALE_RATIOS = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
WHOLE_IMAGE_LIMIT = 1024
#: Beside a segmenter checkpoint: whether its recipe's class gate helped on the val masks.
GATE_CHOICE_FILE = "class_gate.json"
#: Beside a segmenter checkpoint: per-class offsets fitted on val (``core.calibration``).
CLASS_OFFSETS_FILE = "class_offsets.json"
TILE = 512
TILE_OVERLAP = 64


class ClassGate:
    """MLPS's classification gate: classes the stage-1 classifier gives p <= ``threshold`` are
    removed from the prediction (logit -inf, the clean form of the released x0).

    MLPS gates whole test patches; here the classifier looks at windows of ``window`` pixels
    (the training patch side) and each window gates its own pixels, so a large image or tile
    is gated at the scale the classifier was trained on. With ``stride`` under ``window`` the
    windows overlap and a pixel keeps a class only where every window covering it keeps it
    (finer cells, as overlapping labelled patches give). The most probable class of a window
    always stays, and a pixel whose windows share no class keeps every class.
    """

    def __init__(self, classifier: torch.nn.Module, threshold: float, window: int,
                 stride: int | None = None):
        self.classifier = classifier
        self.threshold = threshold
        self.window = window
        self.stride = stride or window

    def present(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) bool: the classes kept at each pixel of uint8 (N, 3, H, W) images."""
        height, width = images.shape[-2:]
        win_h, win_w = min(self.window, height), min(self.window, width)
        origins = window_origins(height, width, win_h, win_w, self.stride)
        crops = torch.stack([images[:, :, y:y + win_h, x:x + win_w] for y, x in origins],
                            dim=1).flatten(0, 1)
        logits = self.classifier(self.classifier.normalise(crops)).logits
        probabilities = torch.sigmoid(logits).view(images.shape[0], len(origins), -1)
        return self.intersect(self.keeps(probabilities), origins, (height, width),
                              (win_h, win_w))

    def keeps(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(N, windows, C) bool: the classes each window keeps."""
        top = probabilities == probabilities.amax(dim=2, keepdim=True)
        return (probabilities > self.threshold) | top

    @staticmethod
    def intersect(kept: torch.Tensor, origins: list[tuple[int, int]], size: tuple[int, int],
                  window: tuple[int, int]) -> torch.Tensor:
        """Per pixel, the classes every covering window keeps: (N, C, H, W) bool."""
        present = kept.new_ones((kept.shape[0], kept.shape[2], *size))
        for index, (y, x) in enumerate(origins):
            present[:, :, y:y + window[0], x:x + window[1]] &= kept[:, index, :, None, None]
        return present | ~present.any(dim=1, keepdim=True)


def window_origins(height: int, width: int, win_h: int, win_w: int,
                   stride: int) -> list[tuple[int, int]]:
    """Top-left corners of windows on a ``stride`` grid; the last row and column are moved
    inside the image, so the windows cover it."""
    tops = sorted({min(y, height - win_h) for y in range(0, max(height - win_h, 0) + stride,
                                                        stride)})
    lefts = sorted({min(x, width - win_w) for x in range(0, max(width - win_w, 0) + stride,
                                                         stride)})
    return [(y, x) for y in tops for x in lefts]


class SegmentationPredictor:
    """A segmenter with its normalisation, TTA and optional class gate, ready for images."""

    def __init__(self, model: Segmenter | SegmenterEnsemble, spec: DatasetSpec, *, mean, std,
                 input_size: int, mpp: float | None = None, tta: str = "none",
                 gate: ClassGate | None = None, config: dict[str, Any] | None = None,
                 engine: Engine | None = None, class_offsets: np.ndarray | None = None,
                 appearance_weight: float = 0.0):
        TTA_MODES.check(tta)
        self.model = model.eval()
        self.spec = spec
        self.mean, self.std = tuple(mean), tuple(std)
        self.input_size = input_size
        self.mpp = mpp
        self.tta = tta
        self.gate = gate
        self.device = next(model.parameters()).device
        #: What runs the network's forward pass (``core.inference.engines``); torch by default,
        #: with bf16 autocast on a GPU.
        self.engine = engine or torch_engine(
            model, "bf16" if autocast_dtype(self.device) is not None else "fp32", self.device)
        #: Log-probability offset per class (``core.calibration``), or None.
        self.class_offsets = None if class_offsets is None else np.asarray(class_offsets,
                                                                            np.float32)
        if not appearance_weight >= 0:
            raise ConfigError(f"the appearance weight must be 0 (off) or more, not "
                              f"{appearance_weight!r}")
        #: Weight of each image's own appearance model (``core.inference.appearance``); 0: off.
        self.appearance_weight = float(appearance_weight)
        self.config = {"tta": tta, "class_gate": gate.threshold if gate else None,
                       "class_offsets": None if class_offsets is None else
                       [float(v) for v in class_offsets],
                       "appearance_weight": self.appearance_weight,
                       "mean": list(self.mean), "std": list(self.std), **(config or {})}

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def predict_batch(self, images: np.ndarray, painted: np.ndarray | None = None
                      ) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, C, H, W) class probabilities; ``painted``
        (N, H, W): a user's strokes on these images (see ``finish``)."""
        network = self.network_probabilities(images)
        strokes = [None] * len(network) if painted is None else painted
        return np.stack([self.finish(probabilities, image, image_strokes)
                         for probabilities, image, image_strokes in zip(network, images, strokes,
                                                                       strict=True)])

    @torch.inference_mode()
    def network_probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, C, H, W): the network's test-time-augmented and
        gated probabilities, before each image's appearance model and the class offsets."""
        batch = torch.from_numpy(np.array(images, dtype=np.uint8)).to(self.device)
        present = self.gate.present(batch.permute(0, 3, 1, 2)) if self.gate else None
        x = normalise(batch, self.mean, self.std)
        return TTA_MODES.get(self.tta)(self, x, present).float().cpu().numpy()

    def finish(self, probabilities: np.ndarray, image: np.ndarray,
               painted: np.ndarray | None = None) -> np.ndarray:
        """One image's (C, H, W) network probabilities -> the predictor's: its appearance
        model, then the class offsets. ``painted`` (H, W) are a user's strokes on the image
        (``core.corrections.store``'s 0-ignore labels): the appearance model learns from them
        too, at ``STROKE_WEIGHT`` at least, and they overrule the network near them
        (``refine_by_appearance``); a way to correct one image without retraining."""
        weight = self.appearance_weight
        if painted is not None and ((painted > 0) & (painted <= self.num_classes)).any():
            weight = max(weight, STROKE_WEIGHT)  # only where a tissue class is painted
        if weight > 0:
            white = self.spec.white_threshold if self.spec.white_plane else 255
            probabilities = refine_by_appearance(probabilities, image, weight, white, painted)
        if self.class_offsets is not None:  # log p + offset, renormalised
            probabilities = probabilities * np.exp(self.class_offsets)[:, None, None]
            probabilities = probabilities / probabilities.sum(axis=0, keepdims=True)
        return probabilities

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass on any size: padded to the encoder's stride, cropped back."""
        height, width = x.shape[-2:]
        multiple = self.model.input_multiple
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.engine(x)[..., :height, :width].float()



#: Test-time augmentations by ``SegmenterConfig.tta``: ``predict(predictor, x, present)`` maps
#: normalised (N, 3, H, W) inputs to (N, C, H, W) probabilities, keeping only the classes
#: ``present`` (N, C, H, W) allows where the class gate gives it (else None).
TTA_MODES: Registry[Callable[[SegmentationPredictor, torch.Tensor, torch.Tensor | None],
                             torch.Tensor]] = Registry("TTA mode")


def logit_averaging(transforms: tuple[tuple[int, bool], ...]):
    """A TTA mode averaging logits over (quarter turns, horizontal flip) views, each undone on
    its output (ttach's merge); the gate removes classes before the softmax."""

    def predict(predictor: SegmentationPredictor, x: torch.Tensor,
                present: torch.Tensor | None) -> torch.Tensor:
        total = None
        for turns, flip in transforms:
            view = torch.rot90(x, turns, dims=(2, 3))
            view = view.flip(-1) if flip else view
            logits = predictor.logits(view)
            logits = logits.flip(-1) if flip else logits
            logits = torch.rot90(logits, -turns, dims=(2, 3))
            total = logits if total is None else total + logits
        logits = total / len(transforms)
        if present is not None:
            logits = logits.masked_fill(~present, float("-inf"))
        return torch.softmax(logits, dim=1)

    return predict


TTA_MODES.add("none", logit_averaging(((0, False),)))
TTA_MODES.add("flip", logit_averaging(((0, False), (0, True))))
TTA_MODES.add("d4", logit_averaging(tuple((turns, flip) for turns in range(4)
                                          for flip in (False, True))))


@TTA_MODES.register("multiscale")
def multiscale(predictor: SegmentationPredictor, x: torch.Tensor,
               present: torch.Tensor | None) -> torch.Tensor:
    """MSV's test: softmax at each scale, resized back and averaged (then gated)."""
    size = x.shape[-2:]
    total = 0.0
    for ratio in MULTISCALE_RATIOS:
        scaled_size = [max(1, round(side * ratio)) for side in size]
        scaled = F.interpolate(x, size=scaled_size, mode="bilinear", align_corners=False)
        probabilities = torch.softmax(predictor.logits(scaled), dim=1)
        total = total + F.interpolate(probabilities, size=size, mode="bilinear",
                                      align_corners=False)
    probabilities = total / len(MULTISCALE_RATIOS)
    return probabilities if present is None else _restricted(probabilities, present)


def _restricted(probabilities: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Probabilities renormalised over the kept classes (uniform where all of them are 0)."""
    kept = probabilities * present
    total = kept.sum(dim=1, keepdim=True)
    kept = torch.where(total > 0, kept, present.to(kept.dtype))
    return kept / kept.sum(dim=1, keepdim=True)


def predict_image(predictor: SegmentationPredictor, image: np.ndarray, *,
                  whole_image_limit: int = WHOLE_IMAGE_LIMIT, tile: int = TILE,
                  overlap: int = TILE_OVERLAP, batch_size: int = 4,
                  painted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 (H, W), probabilities float32 (C, H, W)) of an RGB uint8 image.

    Images whose longer side exceeds ``whole_image_limit`` are tiled (``core.tiling``,
    linear blending across ``overlap`` pixels) so memory stays bounded. ``painted`` (H, W):
    a user's strokes on the image, which its appearance model learns from (images up to
    ``whole_image_limit`` only: a larger one learns from them by fine-tuning).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    if painted is not None and np.shape(painted) != image.shape[:2]:
        raise ConfigError(f"the strokes ({np.shape(painted)}) do not match the image "
                          f"({image.shape[:2]})")
    if max(image.shape[:2]) <= whole_image_limit:
        strokes = None if painted is None else np.asarray(painted)[None]
        probabilities = predictor.predict_batch(image[None], strokes)[0]
    elif painted is not None:
        raise ConfigError(f"strokes refine images of up to {whole_image_limit} px a side at "
                          f"once; fine-tune with them for an image of {image.shape[:2]}")
    else:
        from .tiling import predict_large_image

        probabilities = predict_large_image(predictor.predict_batch, image, tile=tile,
                                            overlap=overlap, blend="linear",
                                            batch_size=batch_size)
    return probabilities.argmax(axis=0).astype(np.uint8), probabilities


def evaluate(predictor: SegmentationPredictor, eval_set: EvalSet, *,
             save_masks: str | Path | None = None) -> dict[str, Any]:
    """Scores of the predictor on images with masks: one confusion matrix over the set,
    background excluded (``core.metrics``). ``save_masks`` writes the predicted palette masks,
    named like the images (as .png)."""
    if tuple(eval_set.spec.class_names) != tuple(predictor.spec.class_names):
        raise CheckpointError(
            f"the model knows classes {list(predictor.spec.class_names)} but the masks are "
            f"described as {list(eval_set.spec.class_names)}"
        )
    matrix = ConfusionMatrix(predictor.num_classes)
    image_mious = []
    for index in range(len(eval_set)):
        image, truth = eval_set.pair(index)
        labels, _ = predict_image(predictor, image)
        one_image = ConfusionMatrix(predictor.num_classes)
        one_image.update(labels, truth)
        matrix.merge(one_image)
        image_mious.append(one_image.scores()["miou"])
        if save_masks is not None:
            name = eval_set.image_paths[index].with_suffix(".png").name
            write_palette_mask(Path(save_masks) / name, labels, predictor.spec)
    return {**matrix.scores(predictor.spec.class_names), "images": len(eval_set),
            "per_image": per_image_spread(image_mious,
                                          [path.name for path in eval_set.image_paths])}


def evaluate_mask_folder(folder: str | Path, eval_set: EvalSet) -> dict[str, Any]:
    """Scores of predicted palette masks (named like the images) against ``eval_set``."""
    folder = Path(folder)
    spec = eval_set.spec
    matrix = ConfusionMatrix(spec.num_classes)
    for index, image_path in enumerate(eval_set.image_paths):
        candidates = [folder / image_path.name, folder / image_path.with_suffix(".png").name]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DatasetError(f"no predicted mask named like {image_path.name}", folder)
        truth = read_mask(eval_set.mask_paths[index], spec)
        prediction = read_mask(found, spec)
        if prediction.shape != truth.shape:
            raise DatasetError(
                f"predicted mask is {prediction.shape[1]}x{prediction.shape[0]} but the ground "
                f"truth is {truth.shape[1]}x{truth.shape[0]}", found)
        matrix.update(prediction, truth)
    return {**matrix.scores(spec.class_names), "images": len(eval_set)}


def json_ready(value: Any) -> Any:
    """``value`` with NaN (a class that never occurs) as None, so it is valid JSON."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Loading


def load_predictor(source: str | Path, device: torch.device | str | None = "auto",
                   strategy: str | None = None, *, tta: str | None = None,
                   use_class_gate: bool | None = None, engine: str = "torch",
                   precision: str | None = None,
                   use_class_offsets: bool = True,
                   appearance_weight: float | None = None) -> SegmentationPredictor:
    """A predictor from a run directory or a segmenter checkpoint file.

    In a run directory ``strategy`` picks the segmenter (``segmenter/<strategy>/``); without it,
    the one with the best validation mIoU, else the latest trained. ``tta`` None keeps the
    recipe's TTA. The recipe's class gate needs the run's stage-1 classifier; ``use_class_gate``
    None follows the choice made on val (``select_class_gate``), else the recipe. Class offsets
    fitted on val (``core.calibration``) are applied unless ``use_class_offsets`` is False.
    ``engine`` (``auto``, ``torch``, ``onnxruntime``, ``openvino``) and ``precision`` (``fp32``,
    ``bf16``, None for the engine's default) choose what runs the network (``engine_choice``);
    exports are cached beside the checkpoint. ``appearance_weight`` None keeps the recipe's
    (``core.inference.appearance``; 0 turns it off).
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    checkpoint, run_root = find_checkpoint(Path(source).expanduser(), strategy)
    model, payload = load_with_companion(checkpoint, device)
    companion = companion_checkpoint(checkpoint) if isinstance(model, SegmenterEnsemble) else None
    saved = payload["config"]
    config = RunConfig.from_dict(saved["run"])
    gate = None
    gate_threshold = config.segmenter.class_gate
    if use_class_gate is None:
        use_class_gate = _gate_choice(checkpoint.parent / GATE_CHOICE_FILE)
    classifier_path = run_root / "classifier" / "model.pt" if run_root else None
    if use_class_gate and gate_threshold is not None and classifier_path \
            and classifier_path.is_file():
        from ..models.classifier import load_classifier

        classifier, _ = load_classifier(classifier_path, device)
        gate = ClassGate(classifier, gate_threshold, window=saved["input_size"])
    spec = DatasetSpec.from_dict(payload["dataset"])
    mean, std = saved["normalisation"]["mean"], saved["normalisation"]["std"]
    from .engine_choice import build_engine

    exports = device.type == "cpu" and engine != "torch"
    own = model.members[0] if exports and isinstance(model, SegmenterEnsemble) else model
    runner = build_engine(own, engine, precision, device=device, mean=mean, std=std,
                          cache=ExportCache.beside(checkpoint) if exports else None)
    if own is not model:  # the strategy's network exported, its companion in torch
        runner = averaged_with(runner, list(model.members[1:]))
    return SegmentationPredictor(
        model, spec, mean=mean, std=std,
        input_size=saved["input_size"], mpp=config.mpp, tta=tta or config.segmenter.tta,
        gate=gate, engine=runner,
        class_offsets=_class_offsets(checkpoint.parent / CLASS_OFFSETS_FILE, spec)
        if use_class_offsets else None,
        appearance_weight=config.segmenter.appearance_weight if appearance_weight is None
        else appearance_weight,
        config={"checkpoint": str(checkpoint), "strategy": saved["strategy"],
                "companion": str(companion) if companion else None,
                "arch": config.segmenter.arch, "encoder": config.segmenter.encoder,
                "method": config.method},
    )


def _gate_choice(path: Path) -> bool:
    """The saved class-gate choice; True (the recipe) where none was made."""
    if not path.is_file():
        return True
    try:
        return bool(json.loads(path.read_text())["use"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError("unreadable class-gate choice: delete it, or run the pipeline "
                              "again to remake it", path) from None


def _class_offsets(path: Path, spec: DatasetSpec) -> np.ndarray | None:
    """The saved class offsets, or None where none were fitted or kept."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        offsets = np.asarray(record["offsets"], np.float32)
        use = bool(record["use"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError("unreadable class offsets: delete the file, or run the "
                              "pipeline again to remake it", path) from None
    if offsets.shape != (spec.num_classes,) or not np.isfinite(offsets).all():
        raise CheckpointError(f"class offsets for {offsets.size} classes, but the model has "
                              f"{spec.num_classes}: delete the file", path)
    return offsets if use else None


def select_class_gate(run: RunDirectory, strategy: str, eval_set: EvalSet,
                      device: torch.device | str = "auto") -> dict[str, Any]:
    """Keep the recipe's class gate only where it does not lower mIoU on ``eval_set``.

    The gate trusts the stage-1 classifier to recognise every class; one that misses a rare
    class (WSSS4LUAD's normal: 17 training patches) makes the gate erase that class everywhere.
    Like model selection, the choice is made on val; it is saved beside the checkpoint, where
    ``load_predictor`` reads it. Returns the scores of the chosen predictor with ``class_gate``
    (kept or not) and ``miou_with_gate`` / ``miou_without_gate`` when there was a choice.
    """
    predictor = load_predictor(run.root, device, strategy=strategy, use_class_gate=True,
                               use_class_offsets=False)
    scores = evaluate(predictor, eval_set)
    if predictor.gate is None:
        return scores
    predictor.gate = None
    plain = evaluate(predictor, eval_set)
    keep = scores["miou"] >= plain["miou"]
    choice = {"use": keep, "miou_with_gate": scores["miou"], "miou_without_gate": plain["miou"],
              "images": len(eval_set)}
    (run.segmenter_dir(strategy) / GATE_CHOICE_FILE).write_text(json.dumps(choice, indent=2))
    return {**(scores if keep else plain), "class_gate": keep,
            "miou_with_gate": scores["miou"], "miou_without_gate": plain["miou"]}


def describe_gate_choice(scores: dict[str, Any]) -> str | None:
    """One line on the class-gate choice in ``select_class_gate``'s scores (None: no choice)."""
    if "class_gate" not in scores:
        return None
    return (f"class gate {'kept' if scores['class_gate'] else 'dropped'} (val mIoU "
            f"{100 * scores['miou_with_gate']:.2f} with it, "
            f"{100 * scores['miou_without_gate']:.2f} without)")


def find_checkpoint(source: Path, strategy: str | None) -> tuple[Path, Path | None]:
    """(segmenter checkpoint, run directory or None) for a file or a run directory."""
    if source.is_file():
        run_root = source.parents[2] if len(source.parents) > 2 else None
        is_run = run_root is not None and RunDirectory(run_root).exists()
        return source, run_root if is_run else None
    if not source.is_dir():
        raise CheckpointError("no such run directory or checkpoint file", source)
    run = RunDirectory(source)
    trained = run.segmenter_strategies()
    if not trained:
        raise CheckpointError(
            "no trained segmenter in this folder: train one with "
            "`histo-wsss train-segmenter RUN_DIR` (or give a segmenter checkpoint file)",
            source,
        )
    if strategy is not None:
        if strategy not in trained:
            raise CheckpointError(
                f"no trained segmenter '{strategy}' here; trained: {', '.join(trained)}", source)
        return run.segmenter_checkpoint(strategy), source
    return run.segmenter_checkpoint(_best_strategy(run, trained)), source


def _best_strategy(run: RunDirectory, trained: list[str]) -> str:
    """The strategy with the best validation mIoU; the latest trained when none was scored."""
    best, best_miou = trained[-1], None
    for strategy in trained:
        metrics_path = run.segmenter_dir(strategy) / "metrics.json"
        if not metrics_path.is_file():
            continue
        miou = (json.loads(metrics_path.read_text()).get("best_val") or {}).get("miou")
        if miou is not None and (best_miou is None or miou > best_miou):
            best, best_miou = strategy, miou
    return best
