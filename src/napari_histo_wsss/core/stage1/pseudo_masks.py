"""Class maps -> pseudo-masks (docs/algorithms.md 1.2, 2.2, 4.2), the generation job and its report.

Per patch: class maps at each configured layer (and scale) are upsampled to the patch, min-max
normalised jointly over all classes (absent classes included, as released), gated by the patch
label or by the classifier's probability, topped with the white-background plane (1.000001,
which beats any normalised score) and turned into labels by argmax. ESFAN fuses its layers' maps
before normalising; MSV votes the per-scale label maps pixel-wise, ties going to the first scale.

Gated-out classes are set below every normalised score rather than to 0, so a pixel where all
kept classes score 0 (common with ReLU'd CAMs) keeps a kept class instead of falling to class 0.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import defaultdict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..config.run_config import PseudoMaskConfig, RunConfig
from ..data.classes import DatasetSpec
from ..data.datasets import EvalSet, PatchSet, write_palette_mask
from ..data.stitching import StitchedImage, stitch_patches
from ..errors import ConfigError, DatasetError
from ..events import Batch, Done, Event, Preview, Started, StopToken
from ..inference.metrics import ConfusionMatrix
from ..models.classifier import CamClassifier, load_classifier
from ..registry import Registry
from ..runs.locks import writes_run
from ..runs.run_dir import RunDirectory
from ..runs.stages import PSEUDO_MASKS, REFINED_MASKS
from .cams import class_activation_maps, frozen_for_class_maps
from .overlap_fusion import OverlapFusion, fused_maps
from .superpixels import batch_superpixels, smooth_maps

STAGE = PSEUDO_MASKS
WHITE_SCORE = 1.000001
FINAL = "final"
FUSED = "fused"
#: Class maps are stored at 1/4 of the patch size: they come from feature maps of stride >= 8.
CAMS_DOWNSAMPLE = 4


# --------------------------------------------------------------------------------------------
# The steps, on tensors


def normalise_jointly(maps: torch.Tensor) -> torch.Tensor:
    """Min-max over all classes and pixels of each image: (N, C, H, W) -> [0, 1]."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1, 1) - low)
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def predicted_classes(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """Classes with probability > threshold; the most probable one where none passes."""
    kept = probabilities > threshold
    fallback = F.one_hot(probabilities.argmax(dim=1), probabilities.shape[1]).bool()
    return torch.where(kept.any(dim=1, keepdim=True), kept, fallback)


#: How the classes each pseudo-mask may use are chosen, by ``PseudoMaskConfig.gating``:
#: ``gate(labels (N, C) or None, probabilities (N, C), config) -> kept (N, C) bool``.
GATINGS: Registry[Callable[[np.ndarray | None, torch.Tensor, PseudoMaskConfig], torch.Tensor]] = \
    Registry("gating")


@GATINGS.register("label")
def gate_by_label(labels: np.ndarray | None, probabilities: torch.Tensor,
                  config: PseudoMaskConfig) -> torch.Tensor:
    """The classes of the patch label (MLPS, MSV, ARML)."""
    if labels is None:
        raise ConfigError("label gating needs the patch labels")
    return torch.from_numpy(np.asarray(labels, dtype=bool)).to(probabilities.device)


@GATINGS.register("predicted")
def gate_by_prediction(labels: np.ndarray | None, probabilities: torch.Tensor,
                       config: PseudoMaskConfig) -> torch.Tensor:
    """The classes the classifier finds (ESFAN), whatever the label says."""
    return predicted_classes(probabilities, config.gate_threshold)


def labels_from_maps(normalised: torch.Tensor, kept: torch.Tensor,
                     white: torch.Tensor | None) -> torch.Tensor:
    """Argmax of the kept classes' maps and the white plane: (N, H, W) int64, white = C.
    ``kept``: (N, C) per image or (N, C, H, W) per pixel."""
    gate = kept if kept.dim() == 4 else kept[:, :, None, None]
    scores = torch.where(gate, normalised, torch.full_like(normalised, -1.0))
    if white is not None:
        plane = torch.where(white, WHITE_SCORE, 0.0).to(scores.dtype)
        scores = torch.cat([scores, plane[:, None]], dim=1)
    return scores.argmax(dim=1)


def vote(label_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pixel-wise plurality of label maps, ties to the earliest (MSV: scale 1 first).

    For three maps this is MSV's rule: m1 if it agrees with either other, else the other two
    if they agree, else m1.
    """
    stacked = torch.stack(list(label_maps))
    agreement = (stacked[:, None] == stacked[None, :]).sum(dim=1)  # votes for each map's label
    winner = agreement.argmax(dim=0, keepdim=True)  # argmax returns the first maximum
    return stacked.gather(0, winner)[0]


def white_background(image: np.ndarray, threshold: int, min_size: int) -> np.ndarray:
    """White pixels (gray > threshold) in 4-connected components of at least ``min_size`` px.

    Gray uses OpenCV's fixed-point RGB->GRAY weights, as the released codes do.
    """
    rgb = image.astype(np.int32)
    gray = (rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + 8192) >> 14
    components, count = ndimage.label(gray > threshold)
    if count == 0:
        return np.zeros(image.shape[:2], dtype=bool)
    sizes = np.bincount(components.ravel())
    large = sizes >= min_size
    large[0] = False
    return large[components]


def layer_folder(layer: str) -> str:
    """Folder of a layer's masks: "-1" -> "layer-1", "b4_5" -> "layer-b4_5"."""
    return f"layer{layer}" if layer.startswith("-") else f"layer-{layer}"


# --------------------------------------------------------------------------------------------
# The recipe on a batch of same-size images


@dataclass
class PseudoMasks:
    """One image's result: label masks by folder name ("final", "layer-1", ...), the
    normalised class maps (C, H, W) by map name before gating (the first scale, or the mean
    of the scales with ``scale_fusion="mean"``), the classifier's
    probabilities and the classes the gate kept."""

    masks: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    probabilities: np.ndarray
    kept: np.ndarray


def _map_names(config: PseudoMaskConfig) -> list[str]:
    names = [layer_folder(layer) for layer in config.layers]
    return [*names, FUSED] if config.fuse_weights else names


def _check_recipe(model: CamClassifier, config: PseudoMaskConfig) -> None:
    if config.fuse_weights and len(config.fuse_weights) != len(config.layers):
        raise ConfigError(f"fuse_weights {list(config.fuse_weights)} need one weight per layer "
                          f"{list(config.layers)}")
    if not config.scales:
        raise ConfigError("pseudo-masks need at least one scale")
    for layer in config.layers:
        model.backbone.resolve_layer(layer)


def final_map_name(model: CamClassifier, config: PseudoMaskConfig) -> str:
    """The map that makes the recipe's own mask: the fusion, else the deepest layer (the
    widgets show it as the main map)."""
    if config.fuse_weights:
        return FUSED
    depth = {layer: model.backbone.layer_names.index(model.backbone.resolve_layer(layer))
             for layer in config.layers}
    return layer_folder(max(config.layers, key=depth.__getitem__))


def combine_layer_maps(per_scale: Sequence[Sequence[torch.Tensor]], names: Sequence[str],
                       fuse_weights: Sequence[float] | None, kept: torch.Tensor,
                       white: torch.Tensor | None, scale_fusion: str = "vote"
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Label masks from class maps already upsampled to the images.

    ``per_scale[s][l]``: maps (N, C, H, W) of layer ``l`` at scale ``s``; ``names``: one per
    layer, plus one for the fusion when ``fuse_weights`` is given. Each map (the fusion made
    from the raw maps) is normalised, gated by ``kept`` (N, C) and topped with the white plane;
    ``scale_fusion`` "vote" argmaxes each scale and votes the masks, "mean" argmaxes the mean
    of the scales' normalised maps. Returns masks (N, H, W) by name and the normalised maps by
    name (the first scale's when voting, the mean otherwise).
    """
    normalised: dict[str, list[torch.Tensor]] = defaultdict(list)
    for layer_maps in per_scale:
        layer_maps = list(layer_maps)
        if fuse_weights:
            layer_maps.append(sum(w * m for w, m in zip(fuse_weights, layer_maps, strict=True)))
        for name, maps in zip(names, layer_maps, strict=True):
            normalised[name].append(normalise_jointly(maps))
    if scale_fusion == "mean":
        means = {name: torch.stack(maps).mean(dim=0) for name, maps in normalised.items()}
        return {name: labels_from_maps(means[name], kept, white) for name in names}, means
    masks = {name: vote([labels_from_maps(m, kept, white) for m in normalised[name]])
             for name in names}
    return masks, {name: maps[0] for name, maps in normalised.items()}


def _recipe_batch(model: CamClassifier, images: np.ndarray, labels: np.ndarray | None,
                  config: PseudoMaskConfig, spec: DatasetSpec, white_plane: bool,
                  device: torch.device) -> list[PseudoMasks]:
    """The recipe on (N, H, W, 3) uint8 images of one size; ``labels`` (N, C) or None."""
    height, width = images.shape[1:3]
    x = model.normalise(torch.tensor(images, device=device).permute(0, 3, 1, 2))
    per_scale = []
    probabilities = None
    for scale in config.scales:
        scaled = x if scale == 1 else F.interpolate(
            x, size=(max(1, round(height * scale)), max(1, round(width * scale))),
            mode="bilinear", align_corners=False)
        logits, maps = class_activation_maps(model, scaled, config.layers, config.cam_method)
        if probabilities is None:  # the first scale is the reference (1.0 in every preset)
            probabilities = torch.sigmoid(logits.float())
        per_scale.append([
            F.interpolate(maps[model.backbone.resolve_layer(layer)].float(),
                          size=(height, width), mode="bilinear", align_corners=False)
            for layer in config.layers
        ])

    if config.superpixel_size:
        segments = batch_superpixels(images, config.superpixel_size)
        per_scale = [[smooth_maps(maps, segments) for maps in layer_maps]
                     for layer_maps in per_scale]

    kept = GATINGS.get(config.gating)(labels, probabilities, config)
    white = None
    if white_plane:
        white = torch.from_numpy(np.stack([
            white_background(image, spec.white_threshold, spec.white_min_size)
            for image in images
        ])).to(device)

    names = _map_names(config)
    masks, normalised = combine_layer_maps(per_scale, names, config.fuse_weights, kept, white,
                                           config.scale_fusion)
    masks[FINAL] = masks[final_map_name(model, config)]
    return [
        PseudoMasks(
            masks={name: mask[i].to(torch.uint8).cpu().numpy() for name, mask in masks.items()
                   if name != FUSED},
            maps={name: normalised[name][i].cpu().numpy() for name in names},
            probabilities=probabilities[i].cpu().numpy(),
            kept=kept[i].cpu().numpy(),
        )
        for i in range(len(images))
    ]


def eval_image_mask(model: CamClassifier, image: np.ndarray, present: np.ndarray,
                    config: PseudoMaskConfig, spec: DatasetSpec,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """The recipe's final mask of one (H, W, 3) eval image, its classes given by ``present``,
    (C,) for the image or (C, H, W) per pixel, in place of the recipe's own gating. No white
    plane: eval images are scored without one. ``model`` as ``frozen_for_class_maps`` gives it.
    """
    settings = dataclasses.replace(config, gating="label")
    return _recipe_batch(model, image[None], np.asarray(present)[None], settings, spec, False,
                         torch.device(device))[0].masks[FINAL]


def _uses_white_plane(config: PseudoMaskConfig, spec: DatasetSpec) -> bool:
    return spec.white_plane if config.white_plane is None else config.white_plane


def pseudo_masks_for_images(model: CamClassifier, images: Sequence[np.ndarray],
                            labels: np.ndarray | None, config: PseudoMaskConfig,
                            spec: DatasetSpec, device: torch.device | str = "cpu"
                            ) -> list[PseudoMasks]:
    """The recipe on (H, W, 3) uint8 images of any sizes, in memory (widget, report).
    Callers that keep a classifier for many calls prepare it once
    (``cams.frozen_for_class_maps``)."""
    device = torch.device(device)
    _check_recipe(model, config)
    model.to(device).eval()
    results: list[PseudoMasks | None] = [None] * len(images)
    for group in _batches_by_size([image.shape for image in images], config.batch_size):
        batch = np.stack([images[i] for i in group])
        batch_labels = None if labels is None else np.asarray(labels)[group]
        outputs = _recipe_batch(model, batch, batch_labels, config, spec,
                                _uses_white_plane(config, spec), device)
        for index, output in zip(group, outputs, strict=True):
            results[index] = output
    return results


def _batches_by_size(shapes: Sequence[tuple[int, ...]], batch_size: int) -> list[list[int]]:
    """Indices grouped by image shape, in batches of at most ``batch_size``."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, shape in enumerate(shapes):
        groups[tuple(shape)].append(index)
    return [indices[start:start + batch_size] for indices in groups.values()
            for start in range(0, len(indices), max(1, batch_size))]


# --------------------------------------------------------------------------------------------
# The job: every training patch of a run


@writes_run(STAGE)
def generate_pseudo_masks(run: RunDirectory, config: RunConfig, patches: PatchSet, *,
                          device: torch.device, stop: StopToken | None = None
                          ) -> Generator[Event, None, None]:
    """Write palette pseudo-masks named like the patches and the class maps of every patch.

    ``pseudo_masks/final/`` holds the recipe's mask, ``layer-1/``... the per-layer masks of a
    multi-layer recipe, ``cams.zarr`` one float16 array (maps, C, H/4, W/4) per patch.
    Ends with ``Done(result=final folder)``; a stop leaves the stage incomplete.
    """
    stop = stop or StopToken()
    config.validate()
    recipe = config.pseudo_masks
    spec = patches.spec
    model, _ = load_classifier(run.classifier_checkpoint, device, spec=spec)
    _check_recipe(model, recipe)
    model = frozen_for_class_maps(model)
    if patches.labels.shape[1] != spec.num_classes:
        raise DatasetError(f"labels have {patches.labels.shape[1]} entries but the classifier "
                           f"knows {spec.num_classes} classes", patches.paths[0].parent)
    run.mark_incomplete("pseudo_masks")
    run.mark_incomplete(REFINED_MASKS)  # a teacher's relabelling is of the masks replaced here
    names = _map_names(recipe)
    folders = [FINAL] + ([n for n in names if n != FUSED] if len(recipe.layers) > 1 else [])
    for folder in folders:
        shutil.rmtree(run.pseudo_mask_dir(folder), ignore_errors=True)
    cams = _open_cams_store(run, patches, names, spec)

    fusion = OverlapFusion(stitch_patches(patches) if recipe.fuse_overlaps else [])
    order = fusion.order(len(patches))
    shapes = [patches.image(i).shape for i in order]
    batches = [[order[i] for i in group]
               for group in _batches_by_size(shapes, recipe.batch_size)]
    white_plane = _uses_white_plane(recipe, spec)
    final_map = final_map_name(model, recipe)
    yield Started(STAGE, total_epochs=1, batches_per_epoch=len(batches))
    for number, group in enumerate(batches):
        if stop.requested:
            yield Done(STAGE, result=None, stopped=True)
            return
        images = np.stack([patches.image(i) for i in group])
        outputs = _recipe_batch(model, images, patches.labels[group], recipe, spec, white_plane,
                                device)
        for index, output in zip(group, outputs, strict=True):
            name = patches.paths[index].with_suffix(".png").name
            for folder in folders:
                if folder != FINAL or not fusion.holds(index):
                    write_palette_mask(run.pseudo_mask_dir(folder) / name, output.masks[folder],
                                       spec)
            _store_maps(cams, index, output, names)
            if fusion.holds(index):
                for stitched, members in fusion.add(index, output):
                    _write_fused_masks(run, patches, stitched, members, final_map, white_plane)
        yield Batch(STAGE, epoch=0, index=number, total=len(batches))
        yield Preview(STAGE, patches.paths[group[0]].name, outputs[0].masks[FINAL])
    stitched = {"stitched_images": len(fusion.stitched),
                "stitched_patches": len(fusion.image_of)} if recipe.fuse_overlaps else {}
    run.mark_complete(PSEUDO_MASKS, patches=len(patches), folders=folders, **stitched)
    yield Done(STAGE, result=run.pseudo_mask_dir(FINAL))


def fuse_stitched(stitched: StitchedImage, outputs: Sequence[PseudoMasks], map_name: str,
                  spec: DatasetSpec, white_plane: bool) -> PseudoMasks:
    """The recipe's result on a stitched image from its patches' results (placement order):
    the fused ``map_name`` maps, the final mask with the per-pixel gate and the white plane,
    the patches' mean probabilities and the classes any of them kept."""
    maps, allowed = fused_maps(stitched, outputs, map_name)
    white = None
    if white_plane:
        white = torch.from_numpy(white_background(stitched.pixels, spec.white_threshold,
                                                  spec.white_min_size)[None])
    labels = labels_from_maps(torch.from_numpy(maps)[None], torch.from_numpy(allowed)[None],
                              white)[0].to(torch.uint8).numpy()
    return PseudoMasks(masks={FINAL: labels}, maps={map_name: maps},
                       probabilities=np.mean([o.probabilities for o in outputs], axis=0),
                       kept=np.any([o.kept for o in outputs], axis=0))


def fused_pseudo_masks(model: CamClassifier, stitched: StitchedImage, patches: PatchSet,
                       config: PseudoMaskConfig, device: torch.device | str = "cpu"
                       ) -> PseudoMasks:
    """The recipe on each patch of a stitched image, fused (what the generation job writes
    for those patches, on the whole stitched image; the widget shows it)."""
    members = [p.index for p in stitched.placements]
    outputs = pseudo_masks_for_images(model, [patches.image(i) for i in members],
                                      patches.labels[members], config, patches.spec, device)
    return fuse_stitched(stitched, outputs, final_map_name(model, config), patches.spec,
                         _uses_white_plane(config, patches.spec))


def _write_fused_masks(run: RunDirectory, patches: PatchSet, stitched: StitchedImage,
                       outputs: Sequence[PseudoMasks], map_name: str, white_plane: bool) -> None:
    """The final masks of a stitched image's patches, cut from its fused label map."""
    labels = fuse_stitched(stitched, outputs, map_name, patches.spec, white_plane).masks[FINAL]
    for placement in stitched.placements:
        name = patches.paths[placement.index].with_suffix(".png").name
        write_palette_mask(run.pseudo_mask_dir(FINAL) / name, labels[placement.box],
                           patches.spec)


def _open_cams_store(run: RunDirectory, patches: PatchSet, names: list[str], spec: DatasetSpec):
    import zarr

    shutil.rmtree(run.cams_path, ignore_errors=True)
    group = zarr.open_group(str(run.cams_path), mode="w")
    group.attrs.update({
        "patches": [path.name for path in patches.paths],
        "maps": names,
        "class_names": list(spec.class_names),
        "downsample": CAMS_DOWNSAMPLE,
        "description": "per patch (index = position in 'patches', 6 digits): normalised class "
                       "maps (maps, classes, H/downsample, W/downsample) before gating",
    })
    return group


def _store_maps(group, index: int, output: PseudoMasks, names: list[str]) -> None:
    stacked = torch.from_numpy(np.stack([output.maps[name] for name in names]))
    height, width = stacked.shape[-2:]
    size = (-(-height // CAMS_DOWNSAMPLE), -(-width // CAMS_DOWNSAMPLE))
    small = F.interpolate(stacked, size=size, mode="area").numpy().astype(np.float16)
    array = group.create_array(f"{index:06d}", shape=small.shape, dtype="float16",
                               chunks=small.shape)
    array[:] = small


# --------------------------------------------------------------------------------------------
# Stage-1 quality: the recipe on images with masks


def pseudo_mask_report(run: RunDirectory, config: RunConfig, eval_set: EvalSet,
                       device: torch.device | str = "cpu") -> dict:
    """The released codes' "stage-1 mIoU": pseudo-masks of the eval images scored on their
    masks (one confusion matrix, background excluded); written to ``pseudo_masks/report.json``.

    Label gating uses the classes present in each mask. A recipe that gates by prediction
    (ESFAN) is scored that way, as its released routine does, and once more gated by the
    mask's classes under ``label_gated``, which separates the CAMs from the gate. As in the
    released evaluations, no white plane is added (background pixels are not scored).
    """
    spec = eval_set.spec
    device = torch.device(device)
    model, _ = load_classifier(run.classifier_checkpoint, device, spec=spec)
    recipe = config.pseudo_masks
    _check_recipe(model, recipe)
    model = frozen_for_class_maps(model)
    recipes = {"recipe": recipe}
    if recipe.gating != "label":
        recipes["label_gated"] = dataclasses.replace(recipe, gating="label")
    matrices = {name: ConfusionMatrix(spec.num_classes) for name in recipes}
    for index in range(len(eval_set)):
        image, truth = eval_set.pair(index)
        present = np.isin(np.arange(spec.num_classes), truth)[None]
        for name, settings in recipes.items():
            result = _recipe_batch(model, image[None], present, settings, spec, False, device)[0]
            matrices[name].update(result.masks[FINAL], truth)
    scores = matrices.pop("recipe").scores(spec.class_names)
    for name, matrix in matrices.items():
        scores[name] = matrix.scores(spec.class_names)
    scores["images"] = len(eval_set)
    scores["recipe"] = {"cam_method": recipe.cam_method, "layers": list(recipe.layers),
                        "scales": list(recipe.scales), "scale_fusion": recipe.scale_fusion,
                        "gating": recipe.gating,
                        "fuse_weights": list(recipe.fuse_weights or [])}
    run.pseudo_mask_root.mkdir(parents=True, exist_ok=True)
    (run.pseudo_mask_root / "report.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores
