"""Show a finished run in napari: what ``histo-wsss demo`` opens at the end.

Val images are laid out side by side with their ground truth and each trained strategy's
prediction; training patches below them with their pseudo-mask and one CAM layer per class.
Layers share positions, so toggling them compares results in place. The same layers are what
File > Open of a run folder gives (the plugin's reader).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.data.datasets import find_dataset, read_mask
from ..core.devices import resolve_device
from ..core.runs.run_dir import RunDirectory
from ._jobs import avoid_triton_llvm_clash
from ._layers import CAM_STYLE, OVERLAY_STYLE, cam_colormap, display_labels
from .class_colours import class_features, labels_colormap

GAP = 20  # pixels between images in the layout


def _row(images: list[np.ndarray], top: int) -> tuple[np.ndarray, list[tuple[int, int]], int]:
    """Paste images left to right on a white canvas; returns canvas, offsets and its height."""
    height = max(image.shape[0] for image in images)
    width = sum(image.shape[1] for image in images) + GAP * (len(images) - 1)
    canvas = np.full((height, width, *images[0].shape[2:]), 255, dtype=images[0].dtype)
    offsets, x = [], 0
    for image in images:
        canvas[: image.shape[0], x: x + image.shape[1]] = image
        offsets.append((top, x))
        x += image.shape[1] + GAP
    return canvas, offsets, height


def _paste(shape, arrays, offsets, top, fill=0):
    canvas = np.full(shape, fill, dtype=arrays[0].dtype)
    for array, (_, x) in zip(arrays, offsets, strict=True):
        canvas[..., : array.shape[-2], x: x + array.shape[-1]] = array
    return canvas


def add_run_layers(viewer, run_dir: Path, max_images: int = 6, max_patches: int = 6) -> None:
    """Add the run's val results and training-patch pseudo-masks/CAMs to ``viewer``."""
    from napari.layers import Layer

    for data, kwargs, kind in run_layer_data(run_dir, max_images, max_patches):
        viewer.add_layer(Layer.create(data, kwargs, kind))


def run_layer_data(run_dir: Path, max_images: int = 6, max_patches: int = 6) -> list[tuple]:
    """Layer data tuples for a run: val images with their ground truth (hidden) and each
    strategy's prediction (the first shown, the others hidden), then training patches with
    their pseudo-mask and one hidden class-map layer per class. Raises HistoWsssError."""
    avoid_triton_llvm_clash()  # the canvas may have loaded Mesa's LLVM already
    run = RunDirectory(run_dir)
    config = run.config()
    layout = find_dataset(config.data_dir)
    spec = layout.spec
    labels_style = {"colormap": labels_colormap(spec), "features": class_features(spec)}
    layers: list[tuple] = []
    top = 0
    val = layout.eval_set("val")
    if val is not None and len(val):
        pairs = [val.pair(i) for i in range(min(max_images, len(val)))]
        canvas, offsets, height = _row([image for image, _ in pairs], 0)
        layers.append((canvas, {"name": "val images", "rgb": True}, "image"))
        truth = _paste(canvas.shape[:2], [display_labels(m, spec.num_classes) for _, m in pairs],
                       offsets, 0)
        layers.append((truth, {"name": "ground truth", **labels_style, **OVERLAY_STYLE,
                               "visible": False}, "labels"))
        layers += _prediction_layers(run, config, pairs, canvas.shape[:2], offsets, spec,
                                     labels_style)
        top = height + 4 * GAP
    pseudo_dir = run.pseudo_mask_dir("final")
    if pseudo_dir.is_dir():
        patches = layout.patches()
        chosen = list(range(min(max_patches, len(patches))))
        images = [patches.image(i) for i in chosen]
        canvas, offsets, _ = _row(images, top)
        layers.append((canvas, {"name": "training patches", "rgb": True,
                                "translate": (top, 0)}, "image"))
        masks = [display_labels(read_mask(pseudo_dir / patches.paths[i].with_suffix(".png").name,
                                          spec), spec.num_classes) for i in chosen]
        layers.append((_paste(canvas.shape[:2], masks, offsets, top),
                       {"name": "pseudo-masks", **labels_style, **OVERLAY_STYLE,
                        "translate": (top, 0)}, "labels"))
        layers += _cam_layers(run, chosen, images, offsets, canvas.shape[:2], top, spec)
    return layers


def _prediction_layers(run, config, pairs, shape, offsets, spec, labels_style) -> list[tuple]:
    from ..core.inference.predict import load_predictor, predict_image

    device = resolve_device(config.device)
    layers = []
    for number, strategy in enumerate(run.segmenter_strategies()):
        predictor = load_predictor(run.root, device, strategy=strategy)
        predictions = [display_labels(predict_image(predictor, image)[0], spec.num_classes)
                       for image, _ in pairs]
        layers.append((_paste(shape, predictions, offsets, 0),
                       {"name": f"prediction: {strategy}", **labels_style, **OVERLAY_STYLE,
                        "visible": number == 0}, "labels"))
    return layers


def _cam_layers(run, chosen, images, offsets, shape, top, spec) -> list[tuple]:
    """One hidden layer per class from the stored class maps (first map, upsampled)."""
    if not run.cams_path.exists():
        return []
    import zarr
    from skimage.transform import resize

    group = zarr.open_group(str(run.cams_path), mode="r")
    layers = []
    for class_index, name in enumerate(spec.class_names):
        maps = []
        for index, image in zip(chosen, images, strict=True):
            stored = np.asarray(group[f"{index:06d}"][0, class_index], dtype=np.float32)
            maps.append(resize(stored, image.shape[:2], order=1).astype(np.float32))
        layers.append((_paste(shape, maps, offsets, top),
                       {"name": f"CAM {name}",
                        "colormap": cam_colormap(name, spec.colours[class_index]),
                        **CAM_STYLE, "contrast_limits": (0, 1), "translate": (top, 0)},
                       "image"))
    return layers


def show_run(run_dir: Path) -> None:
    """Open napari on a finished run and block until the window is closed."""
    import napari

    viewer = napari.Viewer(title=f"napari-histo-wsss: {run_dir}")
    add_run_layers(viewer, run_dir)
    viewer.reset_view()
    napari.run()
