"""The on-disk segmentation of a slide: an OME-Zarr (NGFF 0.4, zarr v2) group written with zarr.

Layout of ``OUT.zarr``::

    .zattrs                 {"histo_wsss": {"complete": bool, "signature": {...}, ...}}
    labels/.zattrs          {"labels": ["tissue"]}
    labels/tissue/0..n      (Y, X) uint8 label pyramid (nearest); "image-label" colours
    probabilities/0..n      (C, Y, X) uint8 per-class maps 0-255 (2x2 mean pyramid)
    cams/0..n               (C, Y, X) uint8 class activation maps, when the model has them
    tissue_mask             (y, x) uint8 tissue mask at its own coarse resolution
    progress/done           (rows, cols) uint8: 1 where an output block is written

Label values are ``class index + 1``; 0 is background (glass, or not analysed), which is what
napari, napari-ome-zarr and QuPath expect. ``complete`` is set last, after the pyramids, so an
interrupted run never looks finished; the done map lets a rerun continue where it stopped.
Coordinates: NGFF scales are in micrometres when the slide mpp is known, otherwise in level-0
slide pixels; ``level0_downsample`` says how many level-0 pixels one output pixel spans.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.classes import DatasetSpec
from ..errors import SlideError

ATTRS_KEY = "histo_wsss"
LABELS_NAME = "tissue"
LABELS_PATH = f"labels/{LABELS_NAME}"
PROBABILITIES_PATH = "probabilities"
CAMS_PATH = "cams"
TISSUE_MASK_PATH = "tissue_mask"
DONE_PATH = "progress/done"
#: Pyramids stop once the longest side of a level is at most this.
PYRAMID_MIN_SIDE = 256
_CHUNK_KEYS = {"name": "v2", "separator": "/"}


@dataclass
class Segmentation:
    """A segmentation read back lazily: dask pyramids plus what the run recorded."""

    path: Path
    labels: list  # dask arrays (Y, X) uint8, finest first
    maps: dict[str, list]  # "probabilities"/"cams" -> dask arrays (C, Y, X) uint8, finest first
    channel_names: dict[str, list[str]]
    spec: DatasetSpec
    attrs: dict[str, Any]

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def level0_downsample(self) -> float:
        return float(self.attrs.get("level0_downsample", 1.0))

    @property
    def slide_mpp(self) -> float | None:
        return self.attrs.get("slide", {}).get("mpp")


def pyramid_shapes(height: int, width: int, min_side: int = PYRAMID_MIN_SIDE) -> list[tuple]:
    """Level shapes, halving (rounding up) until the longest side is at most ``min_side``."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_side:
        shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
    return shapes


def label_colours(spec: DatasetSpec) -> dict[int, tuple[int, int, int, int]]:
    """RGBA per stored label value: classes at index + 1, background 0 transparent."""
    colours = {0: (0, 0, 0, 0)}
    for index, colour in enumerate(spec.colours[: spec.num_classes]):
        colours[index + 1] = (*colour, 255)
    return colours


def create_segmentation(
    path: str | Path,
    *,
    shape: tuple[int, int],
    chunk: int,
    spec: DatasetSpec,
    maps: dict[str, list[str]],
    blocks: tuple[int, int],
    pixel_size: float,
    unit: str | None,
    attrs: dict[str, Any],
):
    """Create the empty layout (overwriting ``path``) and return the zarr group.

    ``maps`` names each per-class map group and its channels. ``pixel_size`` is the size of
    one output pixel in ``unit`` (micrometre) or, when ``unit`` is None, in level-0 slide
    pixels.
    """
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs[ATTRS_KEY] = {**attrs, "complete": False}
    shapes = pyramid_shapes(*shape)
    level0_downsample = attrs.get("level0_downsample", 1.0)
    labels_root = root.create_group("labels")
    labels_root.attrs["labels"] = [LABELS_NAME]
    labels = labels_root.create_group(LABELS_NAME)
    labels.attrs.update({
        "multiscales": [_multiscale(LABELS_NAME, ["y", "x"], len(shapes), pixel_size, unit,
                                    level0_downsample, nearest=True)],
        "image-label": _image_label(spec),
    })
    for level, level_shape in enumerate(shapes):
        labels.create_array(
            str(level), shape=level_shape, chunks=(chunk, chunk), dtype="uint8", fill_value=0,
            chunk_key_encoding=_CHUNK_KEYS,
        )
    for name, channel_names in maps.items():
        group = root.create_group(name)
        group.attrs.update({
            "multiscales": [_multiscale(name, ["c", "y", "x"], len(shapes), pixel_size, unit,
                                        level0_downsample, nearest=False)],
            "channel_names": list(channel_names),
        })
        for level, level_shape in enumerate(shapes):
            group.create_array(
                str(level), shape=(len(channel_names), *level_shape), chunks=(1, chunk, chunk),
                dtype="uint8", fill_value=0, chunk_key_encoding=_CHUNK_KEYS,
            )
    root.create_group("progress").create_array(
        "done", shape=blocks, chunks=(1, blocks[1]), dtype="uint8", fill_value=0,
        chunk_key_encoding=_CHUNK_KEYS,
    )
    return root


def write_tissue_mask(root, mask: np.ndarray, downsample: float) -> None:
    array = root.create_array(
        TISSUE_MASK_PATH, shape=mask.shape, chunks=mask.shape, dtype="uint8", fill_value=0,
        chunk_key_encoding=_CHUNK_KEYS, overwrite=True,
    )
    array[:] = mask.astype(np.uint8)
    array.attrs["downsample"] = downsample


def build_pyramids(root, workers: int = 2, stopped: Callable[[], bool] | None = None) -> bool:
    """Fill levels 1..n from level 0: nearest for labels, 2x2 mean for the per-class maps.

    Works one output chunk at a time (reading twice the area from the level above), so memory
    stays at a few chunks whatever the slide size; all-background chunks are never written.
    ``stopped()`` is asked before each chunk: True ends the build early (it returns False;
    building again later starts over from level 0, which stays intact).
    """
    labels = root[LABELS_PATH]
    maps = [root[name] for name in (PROBABILITIES_PATH, CAMS_PATH) if name in root]
    stopped = stopped or (lambda: False)
    level = 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while str(level) in labels:
            pairs = [(group[str(level - 1)], group[str(level)]) for group in maps]
            source, target = labels[str(level - 1)], labels[str(level)]

            def downsample(origin, source=source, target=target, pairs=pairs):
                if not stopped():
                    _downsample_chunk(origin, source, target, pairs)

            list(pool.map(downsample, _chunk_origins(target.shape, target.chunks)))
            if stopped():
                return False
            level += 1
    return True


def _downsample_chunk(origin, source, target, map_pairs) -> None:
    y0, x0 = origin
    y1 = min(y0 + target.chunks[0], target.shape[0])
    x1 = min(x0 + target.chunks[1], target.shape[1])
    labels = source[2 * y0 : 2 * y1, 2 * x0 : 2 * x1]
    if not labels.any():
        return
    target[y0:y1, x0:x1] = labels[::2, ::2]
    for map_source, map_target in map_pairs:
        values = map_source[:, 2 * y0 : 2 * y1, 2 * x0 : 2 * x1].astype(np.float32)
        values = np.pad(
            values, ((0, 0), (0, values.shape[1] % 2), (0, values.shape[2] % 2)), mode="edge"
        )
        channels, height, width = values.shape
        mean = values.reshape(channels, height // 2, 2, width // 2, 2).mean(axis=(2, 4))
        map_target[:, y0:y1, x0:x1] = np.round(mean).astype(np.uint8)


def _chunk_origins(shape, chunks) -> list[tuple[int, int]]:
    return [
        (y, x) for y in range(0, shape[0], chunks[0]) for x in range(0, shape[1], chunks[1])
    ]


def mark_complete(root, **extra: Any) -> None:
    """Set ``complete`` (and final figures) last: only a finished run ever carries it."""
    attrs = dict(root.attrs[ATTRS_KEY])
    attrs.update(extra)
    attrs["complete"] = True
    root.attrs[ATTRS_KEY] = attrs


def is_segmentation(path: str | Path) -> bool:
    """Cheap check (one small JSON read) that ``path`` is a segmentation written here."""
    try:
        read_attrs(path)
    except SlideError:
        return False
    return True


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The run's attributes (signature, provenance, ``complete``) without opening zarr."""
    attrs_file = Path(path) / ".zattrs"
    try:
        return dict(json.loads(attrs_file.read_text())[ATTRS_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        raise SlideError("not a napari-histo-wsss segmentation", path) from None


def open_segmentation(path: str | Path) -> Segmentation:
    """Read a segmentation lazily (dask), complete or not; SlideError if it is not one."""
    import dask.array as da
    import zarr

    path = Path(path)
    attrs = read_attrs(path)
    try:
        root = zarr.open_group(str(path), mode="r")
        labels_group = root[LABELS_PATH]
        spec = DatasetSpec.from_dict(attrs["spec"])
    except Exception as error:  # zarr raises many types for a damaged folder
        raise SlideError(f"damaged segmentation ({error})", path) from None
    labels = [da.from_zarr(labels_group[d["path"]]) for d in _datasets(labels_group)]
    maps, channel_names = {}, {}
    for name in (PROBABILITIES_PATH, CAMS_PATH):
        if name in root:
            group = root[name]
            maps[name] = [da.from_zarr(group[d["path"]]) for d in _datasets(group)]
            channel_names[name] = list(group.attrs.get("channel_names", []))
    return Segmentation(
        path=path, labels=labels, maps=maps, channel_names=channel_names, spec=spec,
        attrs=attrs,
    )


def write_label_pyramid(
    path: str | Path,
    labels,
    *,
    name: str = "labels",
    colours: dict[int, tuple[int, ...]] | None = None,
    class_names: dict[int, str] | None = None,
    pixel_size: float | tuple[float, float] = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    unit: str | None = None,
    chunk: int = 512,
) -> Path:
    """Write a label image as NGFF labels ``path/labels/<name>/0..n`` with a nearest pyramid.

    ``labels`` is any 2-D array-like that slices lazily (numpy, dask, zarr): it is copied one
    chunk at a time, so a huge lazy label layer never has to fit in memory. ``pixel_size``
    (y, x) and ``offset`` place level 0 (a layer's scale and translate); ``class_names``
    become ``image-label`` properties, so a reader can name the classes again.
    """
    import zarr

    root = zarr.open_group(str(path), mode="a", zarr_format=2)
    labels_root = root.require_group("labels")
    names = list(labels_root.attrs.get("labels", []))
    labels_root.attrs["labels"] = names if name in names else [*names, name]
    shapes = pyramid_shapes(*labels.shape)
    group = labels_root.create_group(name, overwrite=True)
    metadata: dict[str, Any] = {
        "multiscales": [
            _multiscale(name, ["y", "x"], len(shapes), pixel_size, unit, 1.0, nearest=True,
                        offset=offset)
        ]
    }
    image_label: dict[str, Any] = {"version": "0.4"}
    if colours:
        image_label["colors"] = [
            {"label-value": int(value), "rgba": [int(c) for c in rgba]}
            for value, rgba in sorted(colours.items())
        ]
    if class_names:
        image_label["properties"] = [
            {"label-value": int(value), "class": str(text)}
            for value, text in sorted(class_names.items())
        ]
    if len(image_label) > 1:
        metadata["image-label"] = image_label
    group.attrs.update(metadata)
    arrays = [
        group.create_array(
            str(index), shape=shape, chunks=(min(chunk, shape[0]), min(chunk, shape[1])),
            dtype=np.dtype(labels.dtype), fill_value=0, chunk_key_encoding=_CHUNK_KEYS,
        )
        for index, shape in enumerate(shapes)
    ]
    for y0, x0 in _chunk_origins(arrays[0].shape, arrays[0].chunks):
        y1, x1 = y0 + arrays[0].chunks[0], x0 + arrays[0].chunks[1]
        block = np.asarray(labels[y0:y1, x0:x1])
        if block.any():
            arrays[0][y0:y1, x0:x1] = block
    for source, target in zip(arrays[:-1], arrays[1:], strict=True):
        for origin in _chunk_origins(target.shape, target.chunks):
            _downsample_chunk(origin, source, target, [])
    return Path(path)


@dataclass
class NgffLabels:
    """One NGFF label image read back lazily, with what places and names it."""

    levels: list  # dask arrays (Y, X), finest first
    colours: dict[int, tuple]  # RGBA 0-255 per value (empty when not given)
    class_names: dict[int, str]  # ``image-label`` properties' "class" per value
    scale: tuple[float, float]  # level 0 (y, x)
    translate: tuple[float, float]  # level 0 (y, x)
    unit: str | None


def open_ngff_labels(path: str | Path) -> dict[str, NgffLabels]:
    """Every NGFF label image under ``path/labels``, by name."""
    import dask.array as da
    import zarr

    try:
        labels_root = zarr.open_group(str(path), mode="r")["labels"]
        result = {}
        for name in labels_root.attrs["labels"]:
            group = labels_root[name]
            datasets = _datasets(group)
            image_label = group.attrs.get("image-label", {})
            transforms = {t.get("type"): t for t in datasets[0].get("coordinateTransformations",
                                                                     [])}
            scale = transforms.get("scale", {}).get("scale", [1.0, 1.0])
            translate = transforms.get("translation", {}).get("translation", [0.0, 0.0])
            axes = (group.attrs.get("multiscales") or [{}])[0].get("axes", [])
            result[name] = NgffLabels(
                levels=[da.from_zarr(group[d["path"]]) for d in datasets],
                colours={int(entry["label-value"]): tuple(entry["rgba"])
                         for entry in image_label.get("colors", [])},
                class_names={int(entry["label-value"]): str(entry["class"])
                             for entry in image_label.get("properties", []) if "class" in entry},
                scale=(float(scale[-2]), float(scale[-1])),
                translate=(float(translate[-2]), float(translate[-1])),
                unit=next((axis.get("unit") for axis in axes if axis.get("unit")), None),
            )
    except Exception as error:  # zarr raises many types for a damaged or foreign folder
        raise SlideError(f"no readable NGFF labels ({error})", path) from None
    if not result:
        raise SlideError("the labels group lists no label images", path)
    return result


def _datasets(group) -> list[dict]:
    multiscales = group.attrs.get("multiscales") or group.attrs.get("ome", {}).get("multiscales")
    return multiscales[0]["datasets"]


def _multiscale(
    name: str, axes: list[str], levels: int, pixel_size: float | tuple[float, float],
    unit: str | None, level0_downsample: float, nearest: bool,
    offset: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Any]:
    """NGFF 0.4 multiscales with per-level scale and a half-pixel translation.

    The translation puts a pixel's centre where its value comes from: the centre of the
    level-0 slide pixels it covers for a mean pyramid, the sampled level-0 output pixel for a
    nearest (``[::2]``) pyramid, so overlays line up with the slide at every zoom. ``offset``
    (y, x) moves the whole image (a napari layer's translate).
    """
    sizes = dict(zip("yx", np.broadcast_to(np.asarray(pixel_size, float), (2,)), strict=True))
    shifts = dict(zip("yx", offset, strict=True))
    axis_entries = []
    for axis in axes:
        entry: dict[str, Any] = {"name": axis, "type": "channel" if axis == "c" else "space"}
        if axis != "c" and unit:
            entry["unit"] = unit
        axis_entries.append(entry)
    datasets = []
    for level in range(levels):
        scale, translation = [], []
        for axis in axes:
            if axis == "c":
                scale.append(1.0)
                translation.append(0.0)
                continue
            pixel, size = sizes[axis], sizes[axis] * 2**level
            centre = ((pixel if nearest else size) - pixel / level0_downsample) / 2.0
            scale.append(float(size))
            translation.append(float(centre + shifts[axis]))
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": translation},
                ],
            }
        )
    return {"version": "0.4", "name": name, "axes": axis_entries, "datasets": datasets}


def _image_label(spec: DatasetSpec) -> dict[str, Any]:
    colours = label_colours(spec)
    return {
        "version": "0.4",
        "colors": [
            {"label-value": value, "rgba": list(rgba)} for value, rgba in colours.items()
        ],
        "properties": [
            {"label-value": index + 1, "class": name}
            for index, name in enumerate(spec.class_names)
        ],
    }
