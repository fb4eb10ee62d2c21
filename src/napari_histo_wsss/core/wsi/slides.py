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
import uuid
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
#: Lazy levels up to this factor are exact (chained 2x2) means; coarser ones sample level 0,
#: unless level 0 has at most ``MAX_MEAN_PIXELS`` (then every level is a mean, as it always was).
MAX_MEAN_FACTOR = 4
#: A block mean reads at most this many pixels: a lazy pyramid's level 0, a thumbnail's level.
MAX_MEAN_PIXELS = 16 * 2**20
#: A sampled read decodes at most this many chunk rows (and columns); more are thinned evenly.
MAX_SAMPLED_CHUNKS = 64
#: Block side of the lazy levels' dask arrays.
LAZY_LEVEL_CHUNK = 512
#: A level with at least this many tiles/strips is refused when fewer than
#: ``MIN_PRESENT_FRACTION`` of them hold data: a declared size its bytes cannot back.
MIN_SEGMENTS_FOR_PRESENCE_RULE = 10_000
MIN_PRESENT_FRACTION = 0.001
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
    open file handle lives in ``_handle``. ``_sources[k]`` reads level k as stored in the file
    (None for the levels of a lazy pyramid), for sampled reads that skip dask.
    """

    path: Path
    levels: list[da.Array]
    mpp: float | None
    downsamples: list[float]
    name: str
    metadata: dict[str, Any] = field(default_factory=dict)
    backend: str = "tifffile"
    _handle: Any = field(default=None, repr=False)
    _sources: list[LevelSource | None] = field(default_factory=list, repr=False)

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

    Takes the smallest level that is still at least ``max_side`` long. When that level is
    cheap to read (stored in the file, or a mean level of a lazy pyramid) and has at most
    ``MAX_MEAN_PIXELS`` pixels, it is shrunk with a block mean, streaming through dask. Else
    (a single-level slide, or one missing its coarse levels) the thumbnail samples the nearest
    stored level at its stride, decoding at most ``MAX_SAMPLED_CHUNKS`` squared chunks, so the
    cost follows the thumbnail, not the level.
    """
    candidates = [k for k, level in enumerate(slide.levels) if max(level.shape[:2]) >= max_side]
    level = candidates[-1] if candidates else 0
    array = slide.levels[level]
    factor = max(1, math.ceil(max(array.shape[:2]) / max_side))
    stored = [k for k in range(level + 1) if _source(slide, k) is not None]
    if stored:  # the level's own pixels, or the stored level a lazy level is computed from
        base = stored[-1]
        lazy_factor = round(slide.downsamples[level] / slide.downsamples[base])
        cheap = _is_mean_level(lazy_factor, slide._sources[base].shape)
        if not cheap or math.prod(array.shape[:2]) > MAX_MEAN_PIXELS:
            return _sampled_thumbnail(slide, base, max_side)
    if factor > 1:
        array = da.coarsen(np.mean, array, {0: factor, 1: factor}, trim_excess=True)
        array = array.round().astype(np.uint8)
    try:
        # threads, never a distributed client: slide handles cannot travel to other workers
        return np.asarray(array.compute(scheduler="threads"))
    except _DECODE_ERRORS as error:
        problem = _first_line(error)
        raise SlideError(f"cannot decode level {level} ({problem})", slide.path) from None


def _source(slide: Slide, level: int) -> LevelSource | None:
    return slide._sources[level] if level < len(slide._sources) else None


def _sampled_thumbnail(slide: Slide, level: int, max_side: int) -> np.ndarray:
    """Every ``factor``-th pixel of a stored level (thinned to a chunk budget), as the thumbnail."""
    source = slide._sources[level]
    height, width = source.shape
    factor = max(1, math.ceil(max(height, width) / max_side))
    rows = sample_positions(0, max(height // factor, 1), factor, height, source.chunks[0])
    cols = sample_positions(0, max(width // factor, 1), factor, width, source.chunks[1])
    try:
        return source.sample(rows, cols)
    except _DECODE_ERRORS as error:
        problem = _first_line(error)
        raise SlideError(f"cannot decode level {level} ({problem})", slide.path) from None


def sample_positions(
    start: int, stop: int, step: int, length: int, chunk: int, budget: int = MAX_SAMPLED_CHUNKS
) -> np.ndarray:
    """Source indices for output indices ``[start, stop)`` of a level ``step`` times coarser.

    Each output pixel takes the source pixel at the centre of its span. When those fall in more
    than ``budget`` chunks, only ``budget`` evenly spread chunks are kept and every position
    moves to the nearest kept chunk (same offset inside it): a coarser but bounded read.
    Chunk indices never decrease along the result, as ``LevelSource.sample`` needs.
    """
    positions = np.minimum(np.arange(start, stop) * step + step // 2, length - 1)
    chunk_index = positions // chunk
    kept = np.unique(chunk_index)
    if len(kept) <= budget:
        return positions
    kept = kept[np.linspace(0, len(kept) - 1, budget).round().astype(int)]
    nearest = kept[np.abs(chunk_index[:, None] - kept[None, :]).argmin(axis=1)]
    return np.minimum(nearest * chunk + positions % chunk, length - 1)


@dataclass(frozen=True)
class LevelSource:
    """One level as the file stores it (zarr, numpy or dask; any axes and dtype).

    Reads touch only the chunks a selection falls in, and go through the same conversion to
    ``(Y, X, 3) uint8`` as the level's dask array, so sampled pixels equal the level's pixels.
    """

    array: Any
    axes: str
    path: Path

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[self.axes.index("Y")]), int(
            self.array.shape[self.axes.index("X")])

    @property
    def chunks(self) -> tuple[int, int]:
        """Chunk height and width (the whole level for an in-memory array)."""
        sizes = getattr(self.array, "chunksize", None) or getattr(self.array, "chunks", None)
        if not isinstance(sizes, tuple) or not all(isinstance(size, int) for size in sizes):
            sizes = self.array.shape
        return int(sizes[self.axes.index("Y")]), int(sizes[self.axes.index("X")])

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0, y1) x [x0, x1)`` as RGB uint8."""
        return self._to_rgb(self._read(slice(y0, y1), slice(x0, x1)))

    def sample(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Pixels at ``rows`` x ``cols``, decoding only the chunks they fall in.

        zarr gets one orthogonal selection, so it fetches those chunks in one batch.
        """
        return self._to_rgb(self._read(np.asarray(rows), np.asarray(cols)))

    def _read(self, rows: slice | np.ndarray, cols: slice | np.ndarray) -> np.ndarray:
        """The raw block; only the first time point / z-plane of other axes, as levels show."""
        index: list[Any] = []
        seen = set()
        for axis in self.axes.upper().replace("S", "C"):
            if axis == "Y":
                index.append(rows)
            elif axis == "X":
                index.append(cols)
            elif axis == "C" and axis not in seen:
                index.append(slice(None))
            else:
                index.append(slice(0, 1))
            seen.add(axis)
        if isinstance(rows, slice):
            block = self.array[tuple(index)]
        elif hasattr(self.array, "oindex"):  # zarr
            block = self.array.oindex[tuple(index)]
        else:  # numpy and dask: one fancy axis at a time
            x_axis = self.axes.index("X")
            index[x_axis] = slice(None)
            block = self.array[tuple(index)]
            block = block[(slice(None),) * x_axis + (cols,)]
        return block.compute(scheduler="synchronous") if hasattr(block, "compute") else (
            np.asarray(block))

    def _to_rgb(self, block: np.ndarray) -> np.ndarray:
        array = _to_rgb_uint8(da.from_array(block, chunks=-1), self.axes, self.path)
        return np.asarray(array.compute(scheduler="synchronous"))


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
    _check_tile_data(tiff, series, path)
    # tiles the file leaves out read as white glass, not as black
    store = series.aszarr(multiscales=True, fillvalue=_white(series.dtype))
    node = zarr.open(store, mode="r")
    arrays = _arrays_from_zarr_node(node, path)
    axes = series.axes
    levels = [_to_rgb_uint8(da.from_zarr(array), axes, path) for array in arrays]
    sources = [LevelSource(array, axes, path) for array in arrays]
    metadata = {
        "format": _tiff_flavour(tiff),
        "description": (tiff.pages[0].description or "")[:2000],
    }
    return _finish(path, levels, _tiff_mpp(tiff), metadata, backend="tifffile", handle=tiff,
                   sources=sources)


def _check_tile_data(tiff, series, path: Path) -> None:
    """Fail now on tile data past the end of the file, or a size the file's bytes cannot back.

    A tile or strip with offset 0 or byte count 0 is missing. Sparse files leave out empty
    background tiles, so missing ones read as glass; but a level of at least
    ``MIN_SEGMENTS_FOR_PRESENCE_RULE`` tiles where fewer than ``MIN_PRESENT_FRACTION`` hold
    data is not a scan (a damaged or hand-made header declaring a huge image) and is refused.
    """
    size = tiff.filehandle.size
    for index, level in enumerate(series.levels):
        page = level.keyframe
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        ends = (offsets + counts)[counts > 0]
        if ends.size and ends.max() > size:
            raise SlideError(
                f"file is truncated: image data runs {int(ends.max()) - size} bytes past its end "
                "(incomplete copy or download?)", path)
        present = int(np.count_nonzero((offsets > 0) & (counts > 0)))
        total = counts.size
        if total >= MIN_SEGMENTS_FOR_PRESENCE_RULE and present < MIN_PRESENT_FRACTION * total:
            height, width = page.imagelength, page.imagewidth
            raise SlideError(
                f"level {index} declares {width} x {height} px but only {present} of its "
                f"{total} tiles/strips hold data: not a usable slide (damaged or hand-made "
                "header?)", path)


def _white(dtype) -> float:
    """The fill value that reads as white: the dtype's maximum, or 1.0 for floats."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return 1
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def _open_zarr(path: Path) -> Slide:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:  # zarr raises many types for a folder that is not zarr
        raise SlideError(f"not a readable zarr image ({_first_line(error)})", path) from None
    arrays = _arrays_from_zarr_node(node, path)
    axes = _ngff_axes(node) or _guess_axes(arrays[0].shape)
    levels = [_to_rgb_uint8(da.from_zarr(array), axes, path) for array in arrays]
    sources = [LevelSource(array, axes, path) for array in arrays]
    return _finish(path, levels, _ngff_mpp(node, axes), {"format": "zarr"}, backend="zarr",
                   sources=sources)


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
    return _finish(path, [level0], mpp, {"format": path.suffix.lower()[1:]}, backend="pillow",
                   sources=[LevelSource(pixels, axes, path)])


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
        sources=[LevelSource(level, "YXC", path) for level in levels],
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
    sources: list[LevelSource] | None = None,
) -> Slide:
    """Add lazy levels below a single level, or below a coarsest stored level still over
    ``MAX_MEAN_PIXELS`` (napari shows the coarsest level first), then fill in downsamples."""
    sources = list(sources or [])
    coarsest = levels[-1]
    if len(sources) == len(levels) and (
        len(levels) == 1 or math.prod(coarsest.shape[:2]) > MAX_MEAN_PIXELS
    ):
        levels = levels[:-1] + _lazy_pyramid(coarsest, sources[-1])
    height, width = levels[0].shape[:2]
    downsamples = [
        (height / level.shape[0] + width / level.shape[1]) / 2.0 for level in levels
    ]
    metadata = {**metadata, "mpp": mpp, "path": str(path)}
    return Slide(
        path=path, levels=levels, mpp=mpp, downsamples=downsamples, name=slide_name(path),
        metadata=metadata, backend=backend, _handle=handle,
        _sources=sources + [None] * (len(levels) - len(sources)),
    )


def _lazy_pyramid(level0: da.Array, source: LevelSource) -> list[da.Array]:
    """``level0`` (read by ``source``) halved until its longest side is at most
    ``PYRAMID_MIN_SIDE``; nothing is computed here.

    Each level reads ``source`` directly per block (never through the finer levels), so its
    graph has one task per block and a block costs reads in proportion to its own size.
    """
    levels = [level0]
    height, width = level0.shape[:2]
    factor = 1
    while max(height, width) // factor > PYRAMID_MIN_SIDE and min(height, width) // factor >= 2:
        factor *= 2
        levels.append(_lazy_level(source, factor, (height // factor, width // factor)))
    return levels


def _lazy_level(source: LevelSource, factor: int, shape: tuple[int, int]) -> da.Array:
    """Level-0 ``source`` shrunk ``factor`` times: chained 2x2 means (the same pixels as
    coarsening level by level) where ``_is_mean_level``, else sampled at the stride."""
    height, width = source.shape
    chunk_height, chunk_width = source.chunks

    def read_block(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        if _is_mean_level(factor, (height, width)):
            return _halve(source.region(y0 * factor, y1 * factor, x0 * factor, x1 * factor),
                          factor)
        rows = sample_positions(y0, y1, factor, height, chunk_height)
        cols = sample_positions(x0, x1, factor, width, chunk_width)
        return source.sample(rows, cols)

    chunks = (_chunk_sizes(shape[0], LAZY_LEVEL_CHUNK), _chunk_sizes(shape[1], LAZY_LEVEL_CHUNK),
              (3,))
    return da.map_blocks(read_block, chunks=chunks, dtype=np.uint8,
                         meta=np.empty((0, 0, 3), np.uint8),
                         name=f"lazy-level-{factor}-{uuid.uuid4().hex}")


def _is_mean_level(factor: int, level0_shape: tuple[int, int]) -> bool:
    """Whether a lazy level is a block mean: a block reads a bounded level-0 region."""
    return factor <= MAX_MEAN_FACTOR or math.prod(level0_shape) <= MAX_MEAN_PIXELS


def _halve(pixels: np.ndarray, factor: int) -> np.ndarray:
    """2x2 means (rounded each time) until ``factor`` is used up."""
    while factor > 1:
        height, width = pixels.shape[0] // 2, pixels.shape[1] // 2
        pixels = pixels[: 2 * height, : 2 * width].reshape(height, 2, width, 2, 3)
        pixels = pixels.mean(axis=(1, 3)).round().astype(np.uint8)
        factor //= 2
    return pixels


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
