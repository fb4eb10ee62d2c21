"""Whole-slide images as lazy pyramids of RGB uint8 dask arrays.

``open_slide`` hides the file format: every slide becomes a :class:`Slide` whose ``levels`` are
dask arrays ``(Y, X, 3) uint8``, level 0 first, plus the microns per pixel of level 0. Nothing
reads a whole level: pyramidal files are wrapped tile by tile (tifffile ``aszarr`` or an
OME-Zarr group), and a single-level file gets a lazy 2x-coarsened pyramid built by dask.

Backends, tried in this order:

* a ``.zarr`` directory: an OME-Zarr image group (NGFF 0.1-0.4 ``attrs['multiscales']`` or
  0.5 ``attrs['ome']['multiscales']``) or a plain array;
* tifffile + imagecodecs: SVS, NDPI, SCN, OME-TIFF, generic tiled pyramidal and plain TIFF;
* Pillow for PNG/JPEG (these formats cannot be read partially, so they are decoded once);
* OpenSlide, only if ``openslide`` imports, for vendor formats tifffile cannot read (MIRAX...).

A file none of them can read raises :class:`~napari_histo_wsss.core.errors.SlideError` with one
line naming the file.
"""

from __future__ import annotations

import math
import re
import struct
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from ..errors import SlideError

#: Stop building a lazy pyramid once the longest side of a level is at most this.
PYRAMID_MIN_SIDE = 512
#: Microns per pixel outside this range are resolution tags, not a microscope scan (72 dpi...).
PLAUSIBLE_MPP = (0.01, 100.0)
#: A tiny window read on open so a missing codec or a corrupt file fails now, not mid-run.
_PROBE_SIZE = 16

_PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
_MICRONS_PER_UNIT = {
    "pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0,
    "mm": 1e3, "cm": 1e4, "m": 1e6, "in": 25400.0, "inch": 25400.0,
}
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
#: What decoding a damaged file raises (codecs raise RuntimeError subclasses, tifffile the rest).
_DECODE_ERRORS = (OSError, RuntimeError, ValueError, IndexError, KeyError, EOFError, struct.error)


@dataclass
class Slide:
    """A lazily read whole-slide image.

    ``levels[k]`` is a dask array ``(Y, X, 3) uint8``; ``downsamples[k]`` says how many level-0
    pixels one level-k pixel spans (1.0 for level 0); ``mpp`` is microns per level-0 pixel, or
    None where the file does not say. Keep the slide (or its arrays) alive while reading: the
    open file handle lives in ``_handle``.
    """

    path: Path
    levels: list[da.Array]
    mpp: float | None
    downsamples: list[float]
    name: str
    metadata: dict[str, Any] = field(default_factory=dict)
    backend: str = "tifffile"
    _handle: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """Height and width of level 0."""
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    def level_shape(self, level: int) -> tuple[int, int]:
        return int(self.levels[level].shape[0]), int(self.levels[level].shape[1])

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.downsamples[level]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_slide(path: str | Path) -> Slide:
    """Open any supported slide or image lazily; raise SlideError if it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise SlideError("file not found", path)
    if path.is_dir() or path.suffix.lower() == ".zarr":
        slide = _open_zarr(path)
    elif path.suffix.lower() in _PIL_SUFFIXES:
        slide = _open_with_pillow(path)
    else:
        slide = _open_tiff_or_openslide(path)
    _probe(slide)
    return slide


def read_region(
    slide: Slide, level: int, y: int, x: int, height: int, width: int, fill: int = 255
) -> np.ndarray:
    """Read ``height x width`` pixels of ``level`` at ``(y, x)`` as uint8 RGB.

    Parts of the window outside the image are ``fill`` (white: glass), so callers can ask for
    windows with a halo at the slide border without special cases.
    """
    array = slide.levels[level]
    level_height, level_width = int(array.shape[0]), int(array.shape[1])
    out = np.full((height, width, 3), fill, dtype=np.uint8)
    y0, y1 = max(y, 0), min(y + height, level_height)
    x0, x1 = max(x, 0), min(x + width, level_width)
    if y0 >= y1 or x0 >= x1:
        return out
    try:
        pixels = array[y0:y1, x0:x1].compute(scheduler="synchronous")
    except _DECODE_ERRORS as error:
        raise SlideError(
            f"cannot decode level {level} at y={y0}, x={x0} ({_first_line(error)})", slide.path
        ) from None
    out[y0 - y : y1 - y, x0 - x : x1 - x] = pixels
    return out


def best_level_for_mpp(slide: Slide, target_mpp: float) -> tuple[int, float]:
    """The level to read for ``target_mpp`` and the resampling factor left over.

    Like OpenSlide's ``get_best_level_for_downsample``: the coarsest level that is not coarser
    than needed (1% tolerance, so a 2.0005 downsample counts as 2), then ``factor`` = how many
    pixels of that level make one output pixel (>= 1 means shrink; < 1 only when the target is
    finer than the scan, which upsamples).
    """
    if slide.mpp is None:
        raise SlideError(
            "has no microns-per-pixel in its metadata; choose a pyramid level instead", slide.path
        )
    if target_mpp <= 0:
        raise SlideError(f"target mpp must be positive, got {target_mpp}", slide.path)
    wanted = target_mpp / slide.mpp
    level = 0
    for index, downsample in enumerate(slide.downsamples):
        if downsample <= wanted * 1.01:
            level = index
    factor = wanted / slide.downsamples[level]
    if abs(factor - 1.0) < 0.01:
        factor = 1.0
    return level, factor


def read_thumbnail(slide: Slide, max_side: int = 2048) -> np.ndarray:
    """The whole slide with its longest side at most ``max_side`` (and close to it).

    Reads the smallest level that is still at least ``max_side`` long, then shrinks it by an
    integer factor with a block mean, streaming through dask so memory stays near the output.
    """
    candidates = [k for k, level in enumerate(slide.levels) if max(level.shape[:2]) >= max_side]
    level = candidates[-1] if candidates else 0
    array = slide.levels[level]
    factor = max(1, math.ceil(max(array.shape[:2]) / max_side))
    if factor > 1:
        array = da.coarsen(np.mean, array, {0: factor, 1: factor}, trim_excess=True)
        array = array.round().astype(np.uint8)
    try:
        # threads, never a distributed client: slide handles cannot travel to other workers
        return np.asarray(array.compute(scheduler="threads"))
    except _DECODE_ERRORS as error:
        problem = _first_line(error)
        raise SlideError(f"cannot decode level {level} ({problem})", slide.path) from None


# --------------------------------------------------------------------------- backends


def _open_tiff_or_openslide(path: Path) -> Slide:
    import tifffile

    try:
        tiff = tifffile.TiffFile(path)
    except Exception as error:  # arbitrary bytes make tifffile fail in many ways
        tiff_problem = _first_line(error)
        slide = _open_with_openslide(path)
        if slide is not None:
            return slide
        raise SlideError(f"not a readable slide ({tiff_problem})", path) from None
    try:
        return _slide_from_tiff(path, tiff)
    except SlideError:
        tiff.close()
        raise
    except _DECODE_ERRORS as error:
        tiff.close()
        slide = _open_with_openslide(path)
        if slide is not None:
            return slide
        raise SlideError(f"not a readable slide ({_first_line(error)})", path) from None


def _slide_from_tiff(path: Path, tiff) -> Slide:
    import zarr

    if not tiff.series:
        raise SlideError("TIFF file holds no image", path)
    series = tiff.series[0]
    _check_not_truncated(tiff, series, path)
    store = series.aszarr(multiscales=True)
    node = zarr.open(store, mode="r")
    arrays = _arrays_from_zarr_node(node, path)
    axes = series.axes
    levels = [_to_rgb_uint8(da.from_zarr(array), axes, path) for array in arrays]
    metadata = {
        "format": _tiff_flavour(tiff),
        "description": (tiff.pages[0].description or "")[:2000],
    }
    return _finish(path, levels, _tiff_mpp(tiff), metadata, backend="tifffile", handle=tiff)


def _check_not_truncated(tiff, series, path: Path) -> None:
    """Fail now if tile data lies past the end of the file (an interrupted copy/download)."""
    size = tiff.filehandle.size
    for level in series.levels:
        page = level.keyframe
        ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts,
                                                        strict=False) if count]
        if ends and max(ends) > size:
            raise SlideError(
                f"file is truncated: image data runs {max(ends) - size} bytes past its end "
                "(incomplete copy or download?)", path)


def _open_zarr(path: Path) -> Slide:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:  # zarr raises many types for a folder that is not zarr
        raise SlideError(f"not a readable zarr image ({_first_line(error)})", path) from None
    arrays = _arrays_from_zarr_node(node, path)
    axes = _ngff_axes(node) or _guess_axes(arrays[0].shape)
    levels = [_to_rgb_uint8(da.from_zarr(array), axes, path) for array in arrays]
    return _finish(path, levels, _ngff_mpp(node, axes), {"format": "zarr"}, backend="zarr")


def _open_with_pillow(path: Path) -> Slide:
    from PIL import Image

    try:
        with Image.open(path) as image:
            dpi = image.info.get("dpi")
            if image.mode in ("P", "PA"):
                image = image.convert("RGBA")
            elif image.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                image = image.convert("RGB")
            pixels = np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise SlideError(
            f"not a readable image ({_first_line(error)}); very large images should be "
            "pyramidal TIFF",
            path,
        ) from None
    mpp = None
    if dpi and dpi[0]:
        mpp = _plausible(_MICRONS_PER_UNIT["inch"] / float(dpi[0]))
    axes = "YX" if pixels.ndim == 2 else "YXS"
    chunks = (1024, 1024, -1)[: pixels.ndim]
    level0 = _to_rgb_uint8(da.from_array(pixels, chunks=chunks), axes, path)
    return _finish(path, [level0], mpp, {"format": path.suffix.lower()[1:]}, backend="pillow")


def _open_with_openslide(path: Path) -> Slide | None:
    """Vendor formats tifffile cannot read; None when OpenSlide is absent or refuses too."""
    try:
        import openslide
    except ImportError:
        return None
    try:
        handle = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError):
        return None
    levels = [_openslide_level(handle, level) for level in range(handle.level_count)]
    mpp = handle.properties.get(openslide.PROPERTY_NAME_MPP_X)
    metadata = {"format": handle.properties.get(openslide.PROPERTY_NAME_VENDOR, "openslide")}
    return _finish(
        path, levels, _plausible(float(mpp)) if mpp else None, metadata,
        backend="openslide", handle=handle,
    )


def _openslide_level(handle, level: int, chunk: int = 512) -> da.Array:
    """One OpenSlide level as a dask array whose blocks call ``read_region``."""
    width, height = handle.level_dimensions[level]
    downsample = handle.level_downsamples[level]

    def read_block(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        origin = (int(round(x0 * downsample)), int(round(y0 * downsample)))
        rgba = np.asarray(handle.read_region(origin, level, (x1 - x0, y1 - y0)))
        return _composite_on_white(rgba)

    chunks = (_chunk_sizes(height, chunk), _chunk_sizes(width, chunk), (3,))
    return da.map_blocks(read_block, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 3)))


# --------------------------------------------------------------------------- helpers


def _finish(
    path: Path,
    levels: list[da.Array],
    mpp: float | None,
    metadata: dict[str, Any],
    backend: str,
    handle: Any = None,
) -> Slide:
    """Add a lazy pyramid where the file has a single level, then fill in downsamples."""
    if len(levels) == 1:
        levels = _lazy_pyramid(levels[0])
    height, width = levels[0].shape[:2]
    downsamples = [
        (height / level.shape[0] + width / level.shape[1]) / 2.0 for level in levels
    ]
    metadata = {**metadata, "mpp": mpp, "path": str(path)}
    return Slide(
        path=path, levels=levels, mpp=mpp, downsamples=downsamples, name=slide_name(path),
        metadata=metadata, backend=backend, _handle=handle,
    )


def _lazy_pyramid(level0: da.Array) -> list[da.Array]:
    """Halve ``level0`` with a 2x2 mean until it is small; nothing is computed here."""
    tile = max(level0.chunksize[0], level0.chunksize[1])
    block = max(1, 1024 // tile) * tile
    levels = [level0]
    current = level0.rechunk((block, block, 3))
    while max(current.shape[:2]) > PYRAMID_MIN_SIDE and min(current.shape[:2]) >= 2:
        current = da.coarsen(np.mean, current, {0: 2, 1: 2}, trim_excess=True)
        current = current.round().astype(np.uint8)
        levels.append(current)
    return levels


def _arrays_from_zarr_node(node, path: Path) -> list:
    """The arrays of a multiscale group, finest first, or a lone array as one level."""
    import zarr

    if isinstance(node, zarr.Array):
        return [node]
    multiscales = _multiscales(node)
    if multiscales:
        return [node[dataset["path"]] for dataset in multiscales[0]["datasets"]]
    arrays = sorted(
        (array for _, array in node.arrays()), key=lambda array: -int(np.prod(array.shape))
    )
    if not arrays:
        raise SlideError("zarr group holds no image arrays", path)
    return arrays


def _multiscales(group) -> list[dict]:
    """NGFF multiscales in either metadata style (tifffile < 2026.5 / NGFF <= 0.4 or 0.5)."""
    attrs = group.attrs.asdict()
    return attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales") or []


def _ngff_axes(node) -> str | None:
    import zarr

    if isinstance(node, zarr.Array):
        return None
    multiscales = _multiscales(node)
    axes = multiscales[0].get("axes") if multiscales else None
    if not axes:
        return None
    names = [axis["name"] if isinstance(axis, dict) else axis for axis in axes]
    return "".join(name.upper() for name in names)


def _ngff_mpp(node, axes: str) -> float | None:
    """Microns per pixel from the first dataset's scale where the x axis unit says so."""
    import zarr

    if isinstance(node, zarr.Array) or "X" not in axes:
        return None
    multiscales = _multiscales(node)
    if not multiscales:
        return None
    units = [
        axis.get("unit") if isinstance(axis, dict) else None
        for axis in multiscales[0].get("axes", [])
    ]
    x_index = axes.index("X")
    unit = units[x_index] if x_index < len(units) else None
    if unit is None or unit.lower() not in _MICRONS_PER_UNIT:
        return None
    for transform in multiscales[0]["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            return _plausible(float(transform["scale"][x_index]) * _MICRONS_PER_UNIT[unit.lower()])
    return None


def _guess_axes(shape: tuple[int, ...]) -> str:
    """Axes of a zarr array without NGFF metadata: trailing RGB(A) or a leading channel axis."""
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXS" if shape[-1] in (3, 4) else "CYX"
    return "TCZYX"[-len(shape):] if len(shape) <= 5 else "Q" * (len(shape) - 5) + "TCZYX"


def _to_rgb_uint8(array: da.Array, axes: str, path: Path) -> da.Array:
    """Reduce any axes layout and dtype to ``(Y, X, 3) uint8``, lazily."""
    axes = axes.upper().replace("S", "C")
    if "Y" not in axes or "X" not in axes:
        raise SlideError(f"image has no Y/X axes (axes {axes!r})", path)
    index: list[Any] = []
    kept = []
    for axis in axes:
        if axis in "YXC" and axis not in kept:
            index.append(slice(None))
            kept.append(axis)
        else:
            index.append(0)  # first time point, z-plane, ... of a multi-dimensional file
    array = array[tuple(index)]
    if "C" not in kept:
        array = array[..., None]
        kept.append("C")
    array = array.transpose([kept.index("Y"), kept.index("X"), kept.index("C")])
    array = _scale_to_uint8(array)
    channels = array.shape[2]
    if channels == 1:
        return da.concatenate([array] * 3, axis=2)
    if channels == 2:
        return da.concatenate([array[..., :1]] * 3, axis=2)
    if channels == 4:
        return array.map_blocks(_composite_on_white, chunks=(*array.chunks[:2], (3,)))
    return array[..., :3]


def _scale_to_uint8(array: da.Array) -> da.Array:
    """Map the dtype's range onto 0-255: integers by their maximum, floats assumed 0-1."""
    dtype = array.dtype
    if dtype == np.uint8:
        return array
    if dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        scaled = (array.astype(np.float32) - max(info.min, 0)) * (255.0 / info.max)
        return da.clip(scaled, 0, 255).round().astype(np.uint8)
    return da.clip(array.astype(np.float32) * 255.0, 0, 255).round().astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA -> RGB over white glass, so transparent areas look like background."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _tiff_flavour(tiff) -> str:
    for flavour in ("svs", "ndpi", "scn", "ome", "philips", "bif", "qpi"):
        if getattr(tiff, f"is_{flavour}", False):
            return flavour
    return "tiff"


def _tiff_mpp(tiff) -> float | None:
    """Aperio ``MPP =``, OME ``PhysicalSizeX``, else the resolution tags of the first page."""
    page = tiff.pages[0]
    description = page.description or ""
    if tiff.is_svs:
        match = _APERIO_MPP.search(description)
        if match:
            return _plausible(float(match.group(1)))
    if tiff.is_ome and tiff.ome_metadata:
        mpp = _ome_mpp(tiff.ome_metadata)
        if mpp is not None:
            return mpp
    x_resolution = page.tags.get("XResolution")
    unit_tag = page.tags.get("ResolutionUnit")
    if x_resolution is None or unit_tag is None:
        return None
    numerator, denominator = x_resolution.value
    unit = {2: "inch", 3: "cm"}.get(int(unit_tag.value))
    if unit is None or not numerator or not denominator:
        return None
    return _plausible(_MICRONS_PER_UNIT[unit] * denominator / numerator)


def _ome_mpp(ome_xml: str) -> float | None:
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
            unit = element.attrib.get("PhysicalSizeXUnit", "µm").lower()
            if unit not in _MICRONS_PER_UNIT:
                return None
            return _plausible(float(element.attrib["PhysicalSizeX"]) * _MICRONS_PER_UNIT[unit])
    return None


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _probe(slide: Slide) -> None:
    """Decode the first tile now, so a missing codec or a bad file fails at open time."""
    read_region(slide, 0, 0, 0, _PROBE_SIZE, _PROBE_SIZE)


def _chunk_sizes(length: int, chunk: int) -> tuple[int, ...]:
    sizes = [chunk] * (length // chunk)
    if length % chunk:
        sizes.append(length % chunk)
    return tuple(sizes)


def slide_name(path: str | Path) -> str:
    """The file name without its extension(s): ``a.ome.tiff`` -> ``a``, ``b.svs`` -> ``b``."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
