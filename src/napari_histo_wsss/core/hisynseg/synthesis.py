"""HisynSeg's synthetic training images: Mosaic transformation and Bezier-blob mixing.

Only single-label patches are tissue sources: each is a pure sample of its class, so an image
assembled from pieces of them comes with an exact pixel mask (docs/algorithms.md 5.1). Every image
is drawn on the fly from a numpy ``Generator``, so a seed reproduces it. Warps apply one transform
to the image (bilinear) and the mask (nearest), so masks stay aligned with their images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.draw import polygon
from skimage.transform import AffineTransform, resize, warp

from ..data.datasets import PatchSet
from ..errors import DatasetError
from ..stage1.pseudo_masks import white_background

SYNTHESIS_TYPES = ("mosaic", "bezier")

# Mosaic transformation (released HisynSeg): a quadrant of each gridded image is flipped and
# shift-scale-rotated, each with probability 0.8.
_MOSAIC_AUGMENT_P = 0.8
_SHIFT_LIMIT = 0.0625
_SCALE_LIMIT = 0.2
_ROTATE_LIMIT_DEG = 45.0
_SPLIT_RANGE = (0.2, 0.8)


@dataclass(frozen=True)
class BlobShape:
    """Bezier blob outline: more points give more lobes, ``rad`` rounds the curve between
    points (0 = straight polygon), ``edgy`` tilts the tangents towards the outgoing edge."""

    points: int = 5
    rad: float = 0.2
    edgy: float = 0.05
    samples_per_segment: int = 100


def ccw_sorted(points: np.ndarray) -> np.ndarray:
    """Points ordered by angle around their centroid, so the outline does not cross itself."""
    offsets = points - points.mean(axis=0)
    return points[np.argsort(np.arctan2(offsets[:, 1], offsets[:, 0]))]


def random_blob_points(count: int, rng: np.random.Generator, redraws: int = 200) -> np.ndarray:
    """``count`` CCW-sorted points in the unit square, neighbours at least 0.7/count apart.

    After ``redraws`` failed draws the last one is kept, as released, rather than looping on.
    """
    min_gap = 0.7 / count
    for _ in range(redraws + 1):
        points = ccw_sorted(rng.random((count, 2)))
        gaps = np.linalg.norm(np.diff(points, axis=0, append=points[:1]), axis=1)
        if np.all(gaps >= min_gap):
            break
    return points


def blob_outline(points: np.ndarray, shape: BlobShape) -> np.ndarray:
    """A closed C1 curve through CCW-sorted ``points``: one cubic Bezier segment per edge.

    The tangent at each point blends the incoming and outgoing edge directions (weight
    ``arctan(edgy)/pi + 0.5`` on the outgoing one); the inner control points sit ``rad`` times
    the edge length along those tangents. Returns (M, 2) x, y samples.
    """
    closed = np.vstack([points, points[:1]])
    edges = np.diff(closed, axis=0)
    outgoing = np.mod(np.arctan2(edges[:, 1], edges[:, 0]), 2 * np.pi)
    incoming = np.roll(outgoing, 1)
    weight = np.arctan(shape.edgy) / np.pi + 0.5
    # A weighted mean of two angles more than pi apart points backwards: turn it round.
    tangent = weight * outgoing + (1 - weight) * incoming
    tangent += np.pi * (np.abs(incoming - outgoing) > np.pi)
    direction = np.stack([np.cos(tangent), np.sin(tangent)], axis=1)
    reach = shape.rad * np.linalg.norm(edges, axis=1, keepdims=True)
    start, end = closed[:-1], closed[1:]
    control_1 = start + reach * direction
    control_2 = end - reach * np.roll(direction, -1, axis=0)
    t = np.linspace(0.0, 1.0, shape.samples_per_segment)[None, :, None]
    curve = ((1 - t) ** 3 * start[:, None] + 3 * (1 - t) ** 2 * t * control_1[:, None]
             + 3 * (1 - t) * t ** 2 * control_2[:, None] + t ** 3 * end[:, None])
    return curve.reshape(-1, 2)


def bezier_blob(size: int, rng: np.random.Generator, shape: BlobShape = BlobShape()) -> np.ndarray:
    """A random filled blob, (size, size) bool: the foreground region of a Bezier image."""
    outline = blob_outline(random_blob_points(shape.points, rng) * size, shape)
    blob = np.zeros((size, size), dtype=bool)
    rows, cols = polygon(outline[:, 1], outline[:, 0], shape=blob.shape)
    blob[rows, cols] = True
    return blob


def mask_labels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """The image-level label of a mask: which tissue classes it holds (background is none)."""
    return np.bincount(mask.ravel(), minlength=num_classes + 1)[:num_classes].clip(max=1).astype(
        np.uint8)


class Synthesizer:
    """Draws Mosaic and Bezier images of ``size`` x ``size`` from a patch set's single-label
    patches, with masks in the dataset's class indices.

    White glass inside a source is labelled background where the dataset asks for it
    (``spec.white_plane``, gray > ``white_threshold``, regions >= ``white_min_size`` px).
    Classes without any single-label patch cannot be drawn; ``missing_classes`` names them.
    """

    def __init__(self, patches: PatchSet, size: int = 224, blob: BlobShape = BlobShape()):
        self.patches = patches
        self.spec = patches.spec
        self.size = int(size)
        self.blob = blob
        self.sources = {
            c: indices
            for c in range(self.spec.num_classes)
            if (indices := patches.single_label_indices(c))
        }
        if not self.sources:
            raise DatasetError(
                "no patch is labelled with exactly one class: HisynSeg synthesises images from "
                "single-label patches (e.g. '[0, 1, 0]'), and this set has none",
                patches.paths[0].parent if len(patches) else None,
            )
        self.missing_classes = tuple(
            name for c, name in enumerate(self.spec.class_names) if c not in self.sources)
        # As released, mosaic tiles are drawn uniformly over all single-label patches.
        self._all_sources = np.array(sorted(i for ids in self.sources.values() for i in ids))
        self._class_of = {i: c for c, ids in self.sources.items() for i in ids}
        self._source_masks: dict[int, np.ndarray] = {}

    def missing_classes_message(self) -> str | None:
        if not self.missing_classes:
            return None
        present = ", ".join(self.spec.class_names[c] for c in self.sources)
        return (
            f"no single-label patch of {', '.join(self.missing_classes)}: synthetic images "
            f"only show {present}; {', '.join(self.missing_classes)} is learnt from the real "
            "patches' labels alone"
        )

    def __call__(self, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if kind == "mosaic":
            return self.mosaic(rng)
        if kind == "bezier":
            return self.bezier(rng)
        raise ValueError(f"unknown synthesis type '{kind}': use one of {SYNTHESIS_TYPES}")

    # -- sources ----------------------------------------------------------------------------------
    def source(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """A single-label patch and its mask (its class, background where it is white glass)."""
        image = self.patches.image(index)
        mask = self._source_masks.get(index)
        if mask is None:
            mask = np.full(image.shape[:2], self._class_of[index], dtype=np.uint8)
            if self.spec.white_plane:
                white = white_background(image, self.spec.white_threshold,
                                         self.spec.white_min_size)
                mask[white] = self.spec.background_index
            self._source_masks[index] = mask
        return image, mask

    # -- Mosaic transformation ------------------------------------------------------------------
    def mosaic(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Four quadrants split at a random even point, each a flipped, shift-scale-rotated
        random crop of its own 2x2 grid of single-label tiles."""
        size = self.size
        grids = [self._gridded(rng) for _ in range(4)]
        split_row, split_col = (_even_split(size, rng) for _ in range(2))
        image = np.empty((size, size, 3), dtype=np.uint8)
        mask = np.empty((size, size), dtype=np.uint8)
        quadrants = [
            (slice(0, split_row), slice(0, split_col)),
            (slice(0, split_row), slice(split_col, size)),
            (slice(split_row, size), slice(0, split_col)),
            (slice(split_row, size), slice(split_col, size)),
        ]
        for (rows, cols), (grid_image, grid_mask) in zip(quadrants, grids, strict=True):
            grid_image, grid_mask = _flip(grid_image, grid_mask, rng)
            grid_image, grid_mask = shift_scale_rotate(grid_image, grid_mask, rng)
            height, width = rows.stop - rows.start, cols.stop - cols.start
            image[rows, cols], mask[rows, cols] = _random_crop(
                grid_image, grid_mask, height, width, rng)
        return image, mask

    def _gridded(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A 2x2 grid of random crops (size/2 each) of random single-label patches."""
        tile = (self.size + 1) // 2
        image = np.empty((2 * tile, 2 * tile, 3), dtype=np.uint8)
        mask = np.empty((2 * tile, 2 * tile), dtype=np.uint8)
        for row in range(2):
            for col in range(2):
                source_image, source_mask = self.source(int(rng.choice(self._all_sources)))
                source_image, source_mask = _pad_to(source_image, source_mask, tile)
                window = (slice(row * tile, (row + 1) * tile), slice(col * tile, (col + 1) * tile))
                image[window], mask[window] = _random_crop(
                    source_image, source_mask, tile, tile, rng)
        return image, mask

    # -- Bezier mask mixing ---------------------------------------------------------------------
    def bezier(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A blob of one class's patch pasted on another class's patch (two distinct classes
        where at least two have sources)."""
        classes = sorted(self.sources)
        if len(classes) >= 2:
            background_class, foreground_class = rng.choice(classes, size=2, replace=False)
        else:
            background_class = foreground_class = classes[0]
        background_image, background_mask = self._resized_source(int(background_class), rng)
        foreground_image, foreground_mask = self._resized_source(int(foreground_class), rng)
        blob = bezier_blob(self.size, rng, self.blob)
        image = np.where(blob[..., None], foreground_image, background_image)
        mask = np.where(blob, foreground_mask, background_mask)
        return image, mask

    def _resized_source(self, class_index: int, rng) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.source(int(rng.choice(self.sources[class_index])))
        if image.shape[:2] == (self.size, self.size):
            return image, mask
        shape = (self.size, self.size)
        image = resize(image, shape, order=1, preserve_range=True, anti_aliasing=True)
        mask = resize(mask, shape, order=0, preserve_range=True, anti_aliasing=False)
        return np.rint(image).astype(np.uint8), mask.astype(np.uint8)


def _even_split(size: int, rng: np.random.Generator) -> int:
    split = int(size * rng.uniform(*_SPLIT_RANGE))
    return split + split % 2


def _pad_to(image: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Mirror-pad a source smaller than ``side`` (a tile must be fully covered)."""
    pad_rows, pad_cols = max(side - image.shape[0], 0), max(side - image.shape[1], 0)
    if not pad_rows and not pad_cols:
        return image, mask
    widths = ((pad_rows // 2, pad_rows - pad_rows // 2), (pad_cols // 2, pad_cols - pad_cols // 2))
    return (np.pad(image, (*widths, (0, 0)), mode="symmetric"),
            np.pad(mask, widths, mode="symmetric"))


def _random_crop(image, mask, height: int, width: int, rng) -> tuple[np.ndarray, np.ndarray]:
    top = int(rng.integers(0, image.shape[0] - height + 1))
    left = int(rng.integers(0, image.shape[1] - width + 1))
    window = (slice(top, top + height), slice(left, left + width))
    return image[window], mask[window]


def _flip(image, mask, rng) -> tuple[np.ndarray, np.ndarray]:
    """With p 0.8: a horizontal, vertical or both-ways flip, equally likely."""
    if rng.random() >= _MOSAIC_AUGMENT_P:
        return image, mask
    axes = [(1,), (0,), (0, 1)][int(rng.integers(3))]
    return np.flip(image, axes), np.flip(mask, axes)


def shift_scale_rotate(
    image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, *,
    scale_limit: float = _SCALE_LIMIT, probability: float = _MOSAIC_AUGMENT_P,
) -> tuple[np.ndarray, np.ndarray | None]:
    """With ``probability``: shift up to 6.25 %, scale by 1 +- ``scale_limit`` and rotate up to
    45 degrees about the centre (albumentations' ShiftScaleRotate); mirrored borders; bilinear
    for the image, nearest for the mask, so both move together."""
    if rng.random() >= probability:
        return image, mask
    height, width = image.shape[:2]
    shift = rng.uniform(-_SHIFT_LIMIT, _SHIFT_LIMIT, size=2) * (width, height)
    scale = rng.uniform(1 - scale_limit, 1 + scale_limit)
    angle = np.deg2rad(rng.uniform(-_ROTATE_LIMIT_DEG, _ROTATE_LIMIT_DEG))
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = centre + shift - linear @ centre  # rotate and scale about the centre
    inverse = AffineTransform(matrix=matrix).inverse
    warped = warp(image, inverse, order=1, mode="reflect", preserve_range=True)
    if mask is not None:
        mask = warp(mask, inverse, order=0, mode="reflect", preserve_range=True).astype(np.uint8)
    return np.rint(warped).astype(np.uint8), mask


@dataclass
class SyntheticPool:
    """A set of synthetic images with their masks (and, once filtered, the discriminator's
    P(real) of each); saved as one compressed ``.npz`` so a resumed run reuses it."""

    images: np.ndarray  # (N, S, S, 3) uint8
    masks: np.ndarray  # (N, S, S) uint8
    p_real: np.ndarray | None = None  # (N,) float32

    def __len__(self) -> int:
        return len(self.images)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.stem + ".tmp.npz")
        arrays = {"images": self.images, "masks": self.masks}
        if self.p_real is not None:
            arrays["p_real"] = self.p_real
        np.savez_compressed(temporary, **arrays)
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SyntheticPool:
        with np.load(path) as data:
            p_real = data["p_real"] if "p_real" in data.files else None
            return cls(data["images"], data["masks"], p_real)


def synthesize_pool(
    synthesizer: Synthesizer, kind: str, count: int, rng: np.random.Generator
) -> SyntheticPool:
    """``count`` unfiltered images of one type (the discriminator's synthetic class)."""
    pairs = [synthesizer(kind, rng) for _ in range(count)]
    return SyntheticPool(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
