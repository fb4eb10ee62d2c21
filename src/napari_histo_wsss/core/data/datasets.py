"""Datasets: weakly-labelled training patches and evaluation images with palette masks.

Patch labels live in file names (``...-[1 0 0 1].png``, ``...+0[1101].png``,
``...-[1, 0, 0].png``); evaluation masks are palette PNGs whose pixel values are class indices.
The folder layouts of the public datasets differ (``train/``, ``training/``, ``train/img/``,
``val/img`` + ``val/mask``, ``valid/``, ``1.training``), so ``find_dataset`` detects them and the
label format, and every problem is reported with the file that caused it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError
from .classes import BUILTIN_SPECS, DatasetSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_TRAIN_DIRS = ("train/img", "training/img", "train", "training", "1.training")
_EVAL_DIRS = {
    "val": ("val", "valid", "validation", "2.validation"),
    "test": ("test", "testing", "3.testing"),
}
_LABEL_TEXT = re.compile(r"\[([^\[\]]*)\]")


# --------------------------------------------------------------------------------------------
# Labels in file names


def label_text(path: str | Path) -> str | None:
    """The text between the last ``[`` and its ``]`` in a file name, or None."""
    matches = _LABEL_TEXT.findall(Path(path).stem)
    return matches[-1] if matches else None


def label_format_of(text: str) -> str:
    """``comma`` for "1, 0, 0", ``space`` for "1 0 0 1", ``packed`` for "1101"."""
    if "," in text:
        return "comma"
    if " " in text.strip():
        return "space"
    return "packed"


def parse_label(path: str | Path, num_classes: int | None = None) -> np.ndarray:
    """The patch-level label vector of a training file name, as uint8 0/1.

    Robust form of docs/algorithms.md 7.2: keep the 0/1 digits between the last brackets, in order.
    """
    text = label_text(path)
    if text is None:
        raise DatasetError(
            "no label in the file name: training patches must end in a label such as "
            "'[1, 0, 1]', '[1 0 1]' or '[101]'",
            path,
        )
    digits = re.sub(r"[\s,]", "", text)
    if not digits or set(digits) - {"0", "1"}:
        raise DatasetError(f"label '[{text}]' must hold only 0s and 1s", path)
    vector = np.array([int(d) for d in digits], dtype=np.uint8)
    if num_classes is not None and len(vector) != num_classes:
        raise DatasetError(
            f"label '[{text}]' has {len(vector)} entries but the dataset has {num_classes} classes",
            path,
        )
    return vector


# --------------------------------------------------------------------------------------------
# Images and masks


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8; grayscale, palette and RGBA are converted."""
    try:
        with Image.open(path) as image:
            if image.mode in ("I;16", "I;16B", "I", "F"):
                array = np.asarray(image, dtype=np.float64)
                span = max(float(array.max() - array.min()), 1e-12)
                image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA") or (
                image.mode == "P" and "transparency" in image.info
            ):
                # Composite onto white: transparent areas of a histology export are background.
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, rgba)
            return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    except FileNotFoundError:
        raise DatasetError("image file not found", path) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetError(f"cannot read image ({error})", path) from None


def read_mask(path: str | Path, spec: DatasetSpec) -> np.ndarray:
    """Read a mask as (H, W) uint8 class indices (background = ``spec.background_index``).

    Palette and grayscale masks store indices directly (read with PIL, not OpenCV, which would
    return palette colours). RGB masks are mapped back through the dataset's colours.
    """
    try:
        with Image.open(path) as image:
            if image.mode in ("P", "L"):
                mask = np.asarray(image, dtype=np.uint8)
            elif image.mode in ("RGB", "RGBA"):
                mask = _rgb_mask_to_indices(np.asarray(image.convert("RGB")), spec, path)
            elif image.mode in ("I", "I;16", "1"):
                mask = np.asarray(image).astype(np.int64)
                if mask.max(initial=0) > 255:
                    raise DatasetError(f"mask values up to {mask.max()} exceed 255", path)
                mask = mask.astype(np.uint8)
            else:
                raise DatasetError(f"unsupported mask mode '{image.mode}'", path)
    except FileNotFoundError:
        raise DatasetError("mask file not found", path) from None
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"cannot read mask ({error})", path) from None
    bad = np.unique(mask[mask > spec.background_index])
    if bad.size:
        raise DatasetError(
            f"mask values {bad.tolist()} are outside the classes 0..{spec.background_index} "
            f"({', '.join(spec.all_names)})",
            path,
        )
    return np.ascontiguousarray(mask)


def _rgb_mask_to_indices(rgb: np.ndarray, spec: DatasetSpec, path) -> np.ndarray:
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    mask = np.full(codes.shape, 255, dtype=np.uint8)
    for index, (r, g, b) in enumerate(spec.colours):
        mask[codes == ((r << 16) | (g << 8) | b)] = index
    unknown = mask == 255
    if unknown.any():
        y, x = np.argwhere(unknown)[0]
        raise DatasetError(
            f"RGB mask colour {tuple(int(v) for v in rgb[y, x])} at pixel ({y}, {x}) is not one "
            f"of the {spec.name} class colours",
            path,
        )
    return mask


def write_palette_mask(path: str | Path, mask: np.ndarray, spec: DatasetSpec) -> None:
    """Save class indices as a palette PNG in the dataset's colours."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(spec.palette())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def colourise(mask: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Class indices -> (H, W, 3) uint8 in the dataset's colours (for figures)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(spec.colours)] = np.array(spec.colours, dtype=np.uint8)
    return lut[mask]


# --------------------------------------------------------------------------------------------
# Collections


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class PatchSet:
    """Training patches with their patch-level labels; pixels are decoded once, on first use.

    The decoded uint8 arrays are kept in memory, so epochs never re-decode PNGs (a 10k-patch
    224x224 set is 1.5 GB; pass ``paths`` subsets for larger sets).
    """

    paths: list[Path]
    labels: np.ndarray  # (N, C) uint8
    spec: DatasetSpec
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> np.ndarray:
        cached = self._cache.get(index)
        if cached is None:
            cached = read_rgb(self.paths[index])
            self._cache[index] = cached
        return cached

    def decode_all(self) -> None:
        """Decode every patch now (so the first epoch is not slower than the others)."""
        for index in range(len(self)):
            self.image(index)

    def single_label_indices(self, class_index: int) -> list[int]:
        """Patches whose label is exactly one class (HisynSeg's synthesis sources)."""
        hits = (self.labels[:, class_index] == 1) & (self.labels.sum(axis=1) == 1)
        return np.flatnonzero(hits).tolist()

    def subset(self, indices) -> PatchSet:
        indices = list(indices)
        return PatchSet(
            [self.paths[i] for i in indices], self.labels[indices], self.spec,
            {new: self._cache[old] for new, old in enumerate(indices) if old in self._cache},
        )


@dataclass
class EvalSet:
    """Images with pixel masks (val or test). Masks are read and checked on access."""

    image_paths: list[Path]
    mask_paths: list[Path]
    spec: DatasetSpec

    def __len__(self) -> int:
        return len(self.image_paths)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_rgb(self.image_paths[index])
        mask = read_mask(self.mask_paths[index], self.spec)
        if mask.shape != image.shape[:2]:
            raise DatasetError(
                f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{self.image_paths[index].name} is {image.shape[1]}x{image.shape[0]}",
                self.mask_paths[index],
            )
        return image, mask

    def check(self) -> None:
        """Read every pair once (mask readable, values within the classes, size of its image):
        a bad mask is then refused before training starts, not at the first validation hours
        later."""
        for index in range(len(self)):
            self.pair(index)

    def names(self) -> list[str]:
        return [p.name for p in self.image_paths]


def load_patches(folder: str | Path, spec: DatasetSpec) -> PatchSet:
    """All labelled patches of a folder; every file must carry a label of the right length."""
    folder = Path(folder)
    files = _image_files(folder) if folder.is_dir() else []
    if not files:
        raise DatasetError("no training images (.png, .jpg, .tif) in this folder", folder)
    labels = np.stack([parse_label(p, spec.num_classes) for p in files])
    return PatchSet(files, labels, spec)


def load_eval_set(images: str | Path, masks: str | Path, spec: DatasetSpec) -> EvalSet:
    """Pair images with masks by file stem (a ``[..]`` label suffix on image names is allowed)."""
    images, masks = Path(images), Path(masks)
    for folder in (images, masks):
        if not folder.is_dir():
            raise DatasetError("folder not found", folder)
    image_files = _image_files(images)
    if not image_files:
        raise DatasetError("no images in this folder", images)
    mask_by_stem = {p.stem: p for p in _image_files(masks)}
    paired_masks = []
    for image in image_files:
        stem = image.stem
        mask = mask_by_stem.get(stem) or mask_by_stem.get(_LABEL_TEXT.sub("", stem).rstrip("-+_ "))
        if mask is None:
            raise DatasetError(f"no mask named like {image.name} in {masks}", image)
        paired_masks.append(mask)
    return EvalSet(image_files, paired_masks, spec)


# --------------------------------------------------------------------------------------------
# Layout detection


@dataclass
class DatasetLayout:
    """Where a dataset's parts are and what its labels mean."""

    root: Path
    spec: DatasetSpec
    train_dir: Path
    val: tuple[Path, Path] | None = None  # (images, masks)
    test: tuple[Path, Path] | None = None

    def patches(self) -> PatchSet:
        return load_patches(self.train_dir, self.spec)

    def eval_set(self, split: str = "val") -> EvalSet | None:
        folders = self.val if split == "val" else self.test
        return None if folders is None else load_eval_set(*folders, self.spec)

    def describe(self) -> str:
        parts = [f"{self.spec.name}: classes {', '.join(self.spec.class_names)}",
                 f"train {self.train_dir}"]
        for name, folders in (("val", self.val), ("test", self.test)):
            if folders:
                parts.append(f"{name} {folders[0]}")
        return "; ".join(parts)


def _find_train_dir(root: Path) -> Path:
    for candidate in _TRAIN_DIRS:
        folder = root / candidate
        if folder.is_dir() and any(label_text(p) for p in _image_files(folder)):
            return folder
    if any(label_text(p) for p in _image_files(root)):
        return root
    raise DatasetError(
        "no training patches found: expected labelled images in train/, training/, train/img/ "
        "or the folder itself",
        root,
    )


def _find_eval_dirs(root: Path, split: str) -> tuple[Path, Path] | None:
    for name in _EVAL_DIRS[split]:
        folder = root / name
        if (folder / "img").is_dir() and (folder / "mask").is_dir():
            return folder / "img", folder / "mask"
    return None


def detect_spec(train_dir: Path) -> DatasetSpec:
    """Recognise a public dataset from its label format and class count."""
    files = [p for p in _image_files(train_dir) if label_text(p) is not None]
    text = label_text(files[0])
    label_format = label_format_of(text)
    length = len(parse_label(files[0]))
    for spec in BUILTIN_SPECS.values():
        if spec.label_format == label_format and spec.num_classes == length:
            return spec
    raise DatasetError(
        f"labels like '[{text}]' ({length} classes, {label_format} format) match no built-in "
        "dataset: name the classes with --classes A,B,C (and --background N)",
        files[0],
    )


def find_dataset(root: str | Path, spec: DatasetSpec | None = None) -> DatasetLayout:
    """Detect the layout (and, unless given, the classes) of a dataset folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError("dataset folder not found", root)
    train_dir = _find_train_dir(root)
    spec = spec or detect_spec(train_dir)
    return DatasetLayout(
        root=root,
        spec=spec,
        train_dir=train_dir,
        val=_find_eval_dirs(root, "val"),
        test=_find_eval_dirs(root, "test"),
    )
