"""napari reader: whole-slide images as lazy multiscale layers, and our segmentations.

``get_reader`` only looks at the path (suffix, or one small JSON file for a ``.zarr`` folder)
so napari's start-up and drag-and-drop stay fast; it returns None for anything else.
napari computes a multiscale image's coarsest level first: ``open_slide`` builds each level of
a single-level file's pyramid straight from the file, one task per block, so that first view
costs reads in proportion to the coarsest level, whatever size the file declares.

A slide that cannot be opened (corrupt, truncated, not a slide) must give the user one clear
line. napari 0.9.2 wraps an exception raised by a reader into a ``ReaderPluginError`` whose
notification is a paragraph about plugins and file associations with our message at the end.
So the reader shows the ``SlideError`` message itself as an error notification and returns
napari's null-layer sentinel ``[(None,)]`` ("read, nothing to add"), which ends the open
without a second message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: The suffixes the manifest registers; ``.zarr`` folders are handled separately.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif")
#: The file that makes a folder a run folder (what the CLI and the widgets write).
RUN_FILE = "run.json"


def get_reader(path: str | list[str]):
    """The reader function for ``path``, or None when this plugin does not handle it."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(path)
    if (path / RUN_FILE).is_file():
        return read_run_folder
    if path.suffix.lower() == ".zarr" or path.is_dir():
        from .core.wsi.ome_zarr_labels import is_segmentation

        if is_segmentation(path):
            return read_segmentation
        if not _is_zarr(path):
            return None
        return read_labels_zarr if _holds_only_labels(path) else read_slide
    if path.name.lower().endswith(SLIDE_SUFFIXES):
        return read_slide
    return None


def read_slide(path: str | list[str]) -> list[tuple]:
    """A slide as one multiscale RGB image layer in microns when the mpp is known."""
    from .core.errors import SlideError
    from .core.wsi.slides import open_slide

    try:
        slide = open_slide(_single(path))
    except SlideError as error:
        return _report(error)
    return [slide_layer_data(slide)]


def slide_layer_data(slide) -> tuple[Any, dict[str, Any], str]:
    """``(data, kwargs, "image")`` for a :class:`~napari_histo_wsss.core.wsi.slides.Slide`."""
    pixel = slide.mpp if slide.mpp is not None else 1.0
    kwargs: dict[str, Any] = {
        "name": slide.name,
        "rgb": True,
        "multiscale": len(slide.levels) > 1,
        "scale": (pixel, pixel),
        "contrast_limits": (0, 255),
        "metadata": {"mpp": slide.mpp, "path": str(slide.path), "backend": slide.backend,
                     "downsamples": slide.downsamples},
    }
    if slide.mpp is not None:
        kwargs["units"] = ("micrometer", "micrometer")
    data = slide.levels if len(slide.levels) > 1 else slide.levels[0]
    return data, kwargs, "image"


def read_segmentation(path: str | list[str]) -> list[tuple]:
    """Per-class maps (hidden) and the label pyramid, aligned with the slide's layer."""
    from .core.errors import SlideError
    from .core.wsi.ome_zarr_labels import open_segmentation

    try:
        segmentation = open_segmentation(_single(path))
    except SlideError as error:
        return _report(error)
    return segmentation_layer_data(segmentation)


def segmentation_layer_data(segmentation) -> list[tuple]:
    """Layer data tuples for a :class:`~napari_histo_wsss.core.wsi.ome_zarr_labels.Segmentation`."""
    from napari.utils.colormaps import Colormap

    from .widgets.class_colours import bright_colour, class_features, labels_colormap

    mpp = segmentation.slide_mpp
    slide_pixel = mpp if mpp is not None else 1.0
    pixel = segmentation.level0_downsample * slide_pixel
    # A label pixel covers level0_downsample slide pixels: centre it on them.
    offset = (pixel - slide_pixel) / 2.0
    name = segmentation.attrs.get("slide", {}).get("name", segmentation.path.stem)
    if not segmentation.complete:
        name += " (incomplete)"
    common: dict[str, Any] = {
        "scale": (pixel, pixel),
        "translate": (offset, offset),
        "metadata": {"path": str(segmentation.path), "histo_wsss": segmentation.attrs},
    }
    if mpp is not None:
        common["units"] = ("micrometer", "micrometer")
    layers = []
    for map_name, levels in segmentation.maps.items():
        channel_names = segmentation.channel_names[map_name]
        colours = list(segmentation.spec.colours) + [(255, 255, 255)] * len(channel_names)
        for index, channel in enumerate(channel_names):
            colour = bright_colour(colours[index])
            colormap = Colormap([[0, 0, 0, 0], [*colour, 1.0]], name=f"{channel} {map_name}")
            layers.append((
                _levels_or_array([level[index] for level in levels]),
                {**common, "name": f"{name} {channel} {map_name}", "multiscale": len(levels) > 1,
                 "colormap": colormap, "contrast_limits": (0, 255), "blending": "additive",
                 "visible": False},
                "image",
            ))
    labels = segmentation.labels
    layers.append((
        _levels_or_array(labels if segmentation.complete else done_part_pyramid(labels)),
        {**common, "name": f"{name} labels", "multiscale": len(labels) > 1, "opacity": 0.5,
         "colormap": labels_colormap(segmentation.spec),
         "features": class_features(segmentation.spec)},
        "labels",
    ))
    return layers


def _levels_or_array(levels: list):
    """A small output has one level: napari wants the array itself, not a list of one."""
    return levels if len(levels) > 1 else levels[0]


def done_part_pyramid(levels: list) -> list:
    """Coarse levels sampled from level 0, for a stopped segmentation.

    The core builds levels 1..n only when the whole slide is done, so a stopped output has
    its finished rows in level 0 and zeros elsewhere: overview zooms would look empty. Level k
    of the finished pyramid samples level 0 every 2**k pixels, so sampling it lazily here shows
    the same thing the finished output will, at every zoom.
    """
    return [levels[0], *(levels[0][:: 2**k, :: 2**k] for k in range(1, len(levels)))]


def read_labels_zarr(path: str | list[str]) -> list[tuple]:
    """NGFF labels with no image beside them (what this plugin's writer saves): the layer as it
    was saved, with its position, colours and class names."""
    from .core.errors import SlideError
    from .core.wsi.ome_zarr_labels import open_ngff_labels

    try:
        labels = open_ngff_labels(_single(path))
    except SlideError as error:
        return _report(error)
    return [ngff_labels_layer_data(name, image) for name, image in labels.items()]


def ngff_labels_layer_data(name: str, image) -> tuple[Any, dict[str, Any], str]:
    """``(data, kwargs, "labels")`` for a :class:`~napari_histo_wsss.core.wsi.ome_zarr_labels.
    NgffLabels`."""
    from napari.utils.colormaps import DirectLabelColormap

    levels = image.levels
    kwargs: dict[str, Any] = {"name": name, "multiscale": len(levels) > 1,
                              "scale": image.scale, "translate": image.translate}
    if image.unit:
        kwargs["units"] = (image.unit, image.unit)
    if image.colours:
        color_dict = {value: np.asarray(rgba, float) / 255.0
                      for value, rgba in image.colours.items()}
        kwargs["colormap"] = DirectLabelColormap(color_dict={None: np.zeros(4), **color_dict})
    if image.class_names:
        top = max(image.class_names)
        kwargs["features"] = {"class": [image.class_names.get(value, str(value))
                                        for value in range(top + 1)]}
    return (levels if len(levels) > 1 else levels[0]), kwargs, "labels"


def read_run_folder(path: str | list[str]) -> list[tuple]:
    """A run folder: its val images with ground truth and predictions, its training patches
    with pseudo-masks and class maps (what ``histo-wsss demo`` shows)."""
    from .core.errors import HistoWsssError
    from .widgets.demo import run_layer_data

    try:
        return run_layer_data(Path(_single(path)))
    except HistoWsssError as error:
        return _report(error)


def _is_zarr(path: Path) -> bool:
    """A zarr folder, with v2 or v3 metadata."""
    return any((path / name).is_file() for name in (".zgroup", ".zarray", "zarr.json"))


def _holds_only_labels(path: Path) -> bool:
    """An NGFF group whose only content is ``labels/`` (no image multiscales at the root)."""
    attrs_file = path / ".zattrs"
    root_attrs = attrs_file.read_text() if attrs_file.is_file() else ""
    return (path / "labels").is_dir() and "multiscales" not in root_attrs


def _single(path: str | list[str]) -> str:
    return path[0] if isinstance(path, list) else path


def _report(error) -> list[tuple]:
    """Show a SlideError as one short notification and tell napari there is nothing to add.

    The toast has room for one line, so it starts with the file name and the problem; the
    full path is in the error itself (the notification's details).
    """
    from napari.utils.notifications import show_error

    reason = str(error)
    if error.path is not None:
        reason = reason.removeprefix(f"{error.path}: ")
        reason = f"Cannot open {error.path.name}: {reason}"
    show_error(reason)
    return [(None,)]
