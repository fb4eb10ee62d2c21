"""Corrections on disk: sparse pixel labels a user painted, kept in the run directory.

::

    RUN_DIR/corrections/
      index.json          one entry per painted image or slide region (written last, atomically)
      <stem>-<hash>.png   its labels as a palette PNG in the run's class colours

A label map uses the **0-ignore convention**: 0 means "not painted" (the model's own targets
stay in charge there), a value ``k`` >= 1 means class ``k - 1``; ``num_classes + 1`` is white
background. This is the convention of napari's Labels layer (0 is "no label") and of the
slide segmentations (``label_offset = 1`` in ``core/wsi/geojson_export.py``), so a painted
layer is saved as it is and exported to QuPath with the same class table.

Each entry says what was painted: ``image`` (the image or slide file), ``kind`` (``image`` or
``slide``), ``region`` (top, left, height, width in the image's full-resolution pixels),
``downsample`` (full-resolution pixels per label pixel), ``author`` and ``created`` (UTC). The
CLI, the widget and the library all go through :class:`CorrectionStore`.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.classes import DatasetSpec
from ..data.datasets import read_rgb
from ..errors import ConfigError, DatasetError
from ..runs.outputs import atomic_write_bytes, atomic_write_text
from ..runs.run_dir import RunDirectory

FOLDER = "corrections"
INDEX = "index.json"
FORMAT_VERSION = 1
KINDS = ("image", "slide")
#: The label value of "not painted".
UNLABELLED = 0


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_author() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in containers without a passwd entry
        return ""


@dataclass
class Correction:
    """Painted pixels of one image (or one region of a slide) in the 0-ignore convention."""

    image: str
    labels: np.ndarray  # (h, w) uint8
    kind: str = "image"
    region: tuple[int, int, int, int] | None = None  # top, left, height, width (full res.)
    downsample: float = 1.0
    author: str = field(default_factory=default_author)
    created: str = field(default_factory=now_utc)

    def __post_init__(self):
        self.image = str(Path(self.image).expanduser().resolve())
        self.labels = np.ascontiguousarray(self.labels, dtype=np.uint8)
        if self.labels.ndim != 2:
            raise ConfigError(f"painted labels must be one 2-D map, got shape {self.labels.shape}")
        if self.kind not in KINDS:
            raise ConfigError(f"correction kind '{self.kind}' is not one of {', '.join(KINDS)}")
        if not self.downsample > 0:
            raise ConfigError(f"downsample must be above 0, got {self.downsample}")
        if self.region is None:
            height, width = self.labels.shape
            self.region = (0, 0, round(height * self.downsample), round(width * self.downsample))
        self.region = tuple(int(v) for v in self.region)

    @property
    def painted(self) -> int:
        return int(np.count_nonzero(self.labels))

    @property
    def key(self) -> str:
        """One file name per (image, region, resolution): painting it again replaces it."""
        identity = json.dumps([self.image, list(self.region), float(self.downsample)])
        digest = hashlib.sha1(identity.encode()).hexdigest()[:10]
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(self.image).stem)
        return f"{stem[:60]}-{digest}"

    def entry(self, spec: DatasetSpec) -> dict[str, Any]:
        painted = np.unique(self.labels[self.labels != UNLABELLED])
        return {"file": f"{self.key}.png", "image": self.image, "kind": self.kind,
                "region": list(self.region), "downsample": float(self.downsample),
                "shape": list(self.labels.shape), "author": self.author,
                "created": self.created, "painted_pixels": self.painted,
                "classes": [spec.all_names[v - 1] for v in painted.tolist()]}


class CorrectionStore:
    """The corrections of one run: save, list, load and remove painted label maps."""

    def __init__(self, root: str | Path, spec: DatasetSpec):
        self.folder = Path(root).expanduser() / FOLDER
        self.spec = spec

    @classmethod
    def of_run(cls, run: RunDirectory | str | Path) -> CorrectionStore:
        run = run if isinstance(run, RunDirectory) else RunDirectory(run)
        config = run.config()
        if not config.dataset:
            raise ConfigError("the run does not record its classes (run.json has no dataset)",
                              run.config_path)
        return cls(run.root, DatasetSpec.from_dict(config.dataset))

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX

    def entries(self) -> list[dict[str, Any]]:
        if not self.index_path.is_file():
            return []
        try:
            index = json.loads(self.index_path.read_text())
            entries = index["entries"]
        except (ValueError, KeyError, TypeError):
            raise DatasetError("unreadable corrections index: restore it or delete the "
                               "corrections folder", self.index_path) from None
        if list(index.get("classes", [])) != list(self.spec.all_names):
            raise DatasetError(f"corrections were painted for classes {index.get('classes')}, "
                               f"not this run's {list(self.spec.all_names)}", self.index_path)
        return entries

    def save(self, correction: Correction) -> Path | None:
        """Write ``correction`` (replacing an earlier one of the same image and region);
        one without any painted pixel removes that earlier one. The label file is written
        before the index, so a crash never indexes a missing file."""
        self._check_values(correction.labels)
        entries = [e for e in self.entries() if e["file"] != f"{correction.key}.png"]
        path = self.folder / f"{correction.key}.png"
        if correction.painted:
            atomic_write_bytes(path, self._png(correction.labels))
            entries.append(correction.entry(self.spec))
        self._write_index(entries)
        if not correction.painted:
            path.unlink(missing_ok=True)
            return None
        return path

    def load_all(self) -> list[Correction]:
        return [self._load(entry) for entry in self.entries()]

    def find(self, image: str | Path, region: tuple[int, int, int, int] | None = None
             ) -> Correction | None:
        """The correction of ``image`` (and ``region``, if given), or None."""
        wanted = str(Path(image).expanduser().resolve())
        for entry in self.entries():
            if entry["image"] == wanted and (region is None or
                                             tuple(entry["region"]) == tuple(region)):
                return self._load(entry)
        return None

    def remove(self, correction: Correction) -> None:
        self.save(Correction(correction.image, np.zeros_like(correction.labels),
                             correction.kind, correction.region, correction.downsample))

    def _load(self, entry: dict[str, Any]) -> Correction:
        path = self.folder / entry["file"]
        try:
            with Image.open(path) as image:
                labels = np.asarray(image, dtype=np.uint8)
        except FileNotFoundError:
            raise DatasetError("painted labels listed in the corrections index are missing",
                               path) from None
        except OSError as error:
            raise DatasetError(f"cannot read painted labels ({error})", path) from None
        if list(labels.shape) != list(entry["shape"]):
            raise DatasetError(f"painted labels are {labels.shape[1]}x{labels.shape[0]}, the "
                               f"index says {entry['shape'][1]}x{entry['shape'][0]}", path)
        self._check_values(labels, path)
        return Correction(entry["image"], labels, entry["kind"], tuple(entry["region"]),
                          entry["downsample"], entry.get("author", ""), entry.get("created", ""))

    def _check_values(self, labels: np.ndarray, path: Path | None = None) -> None:
        top = self.spec.background_index + 1
        if labels.size and int(labels.max()) > top:
            raise DatasetError(f"painted label {int(labels.max())} is not a class: use 0 (not "
                               f"painted) to {top} ({', '.join(self.spec.all_names)})", path)

    def _png(self, labels: np.ndarray) -> bytes:
        image = Image.fromarray(labels, mode="P")
        image.putpalette([0, 0, 0, *self.spec.palette()[: 3 * 255]])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        index = {"version": FORMAT_VERSION, "classes": list(self.spec.all_names),
                 "convention": "0 = not painted; k = class k-1", "entries": entries}
        atomic_write_text(self.index_path, json.dumps(index, indent=2) + "\n")


def correction_pixels(correction: Correction) -> np.ndarray:
    """The RGB pixels a correction was painted on, at the correction's resolution."""
    top, left, height, width = correction.region
    out_shape = correction.labels.shape
    if correction.kind == "slide":
        from ..wsi.slides import open_slide, read_region

        with open_slide(correction.image) as slide:
            level = max((k for k, d in enumerate(slide.downsamples)
                         if d <= correction.downsample + 1e-6), default=0)
            scale = slide.downsamples[level]
            image = read_region(slide, level, round(top / scale), round(left / scale),
                                max(1, round(height / scale)), max(1, round(width / scale)))
    else:
        image = read_rgb(correction.image)[top:top + height, left:left + width]
        if image.shape[:2] != (height, width):
            raise DatasetError(f"the correction's region {correction.region} lies outside "
                               f"the image ({image.shape[1]}x{image.shape[0]})",
                               correction.image)
    if image.shape[:2] != out_shape:
        image = np.asarray(Image.fromarray(image).resize(out_shape[::-1], Image.BILINEAR))
    return image
