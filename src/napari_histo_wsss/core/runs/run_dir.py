"""The run directory: one folder holding everything a run produced.

::

    RUN_DIR/
      run.json                      resolved RunConfig
      status.json                   which stages are complete (written last by each stage;
                                    keys are the names in core/runs/stages.py)
      summary.json                  the pipeline's val scores and wall time
      classifier/model.pt           stage-1 checkpoint (final or stopped); last.pt for resuming
      classifier/losses.csv
      pseudo_masks/<layer or vote>/*.png   palette pseudo-masks, named like the patches
      pseudo_masks/cams.zarr        normalised class maps for inspection
      pseudo_masks/report.json      pseudo-mask quality on masks, where a set has them
      segmenter/<strategy>/model.pt best-on-validation segmenter; last.pt for resuming
      segmenter/<strategy>/losses.csv, metrics.json
      segmenter/<strategy>/class_gate.json   whether the recipe's class gate helped on val
      segmenter/<strategy>/class_offsets.json   per-class offsets fitted on val, if kept
      hisynseg/                     synthetic images (<type>.npz), synthesis.json (counts,
                                    acceptance, filter figures), examples/
      pseudo_masks/hisynseg/, segmenter/hisynseg/round1.pt   HisynSeg's self-training round

A stage is complete only once ``status.json`` says so; a stage that was interrupted leaves its
``last.pt`` and is resumed from it.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path
from typing import Any

from ..config.run_config import RunConfig
from ..errors import ConfigError
from .locks import RUN_LOCK_NAME
from .outputs import atomic_write_text
from .stages import canonical_stage

#: Names that become one folder inside the run directory (strategies, pseudo-mask sets):
#: letters, digits, '-', '_' and '.', not starting with '.', so no name can leave the run.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_folder_name(name: str, what: str) -> str:
    """``name`` if it is safe as one folder name inside the run directory; else one
    ``ConfigError`` (``what``: "strategy", ...)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"{what} name {name!r} cannot be a folder of the run: use letters, "
                          "digits, '-', '_' and '.' (not first), without path separators")
    return name


class RunDirectory:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    # -- layout ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "run.json"

    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    @property
    def lock_path(self) -> Path:
        """Held while a stage writes the run (core/runs/locks.py)."""
        return self.root / RUN_LOCK_NAME

    @property
    def classifier_dir(self) -> Path:
        return self.root / "classifier"

    @property
    def classifier_checkpoint(self) -> Path:
        return self.classifier_dir / "model.pt"

    @property
    def pseudo_mask_root(self) -> Path:
        return self.root / "pseudo_masks"

    def pseudo_mask_dir(self, name: str) -> Path:
        return self.pseudo_mask_root / check_folder_name(name, "pseudo-mask set")

    @property
    def cams_path(self) -> Path:
        return self.pseudo_mask_root / "cams.zarr"

    @property
    def teacher_dir(self) -> Path:
        """The self-training teacher's checkpoints (stage2/self_training.py)."""
        return self.root / "teacher"

    def segmenter_dir(self, strategy: str) -> Path:
        return self.root / "segmenter" / check_folder_name(strategy, "strategy")

    def segmenter_checkpoint(self, strategy: str) -> Path:
        return self.segmenter_dir(strategy) / "model.pt"

    def segmenter_strategies(self) -> list[str]:
        """Strategies with a trained segmenter, in the order they were trained."""
        folder = self.root / "segmenter"
        if not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if (p / "model.pt").is_file()]
        return [p.name for p in sorted(found, key=lambda p: (p / "model.pt").stat().st_mtime)]

    # -- config and status ------------------------------------------------------------------------
    def create(self, config: RunConfig) -> None:
        """Write ``run.json`` once the configuration's numbers are checked (nothing is
        created for a configuration that cannot run)."""
        config.validate()
        self.root.mkdir(parents=True, exist_ok=True)
        config.save(self.config_path)

    def exists(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> RunConfig:
        if not self.exists():
            raise ConfigError("not a run directory (no run.json)", self.root)
        return RunConfig.load(self.config_path)

    def status(self) -> dict[str, Any]:
        """Completed stages by name (``core.runs.stages``), older keys read as today's."""
        if not self.status_path.is_file():
            return {}
        stored = json.loads(self.status_path.read_text())
        return {canonical_stage(stage): info for stage, info in stored.items()}

    def is_complete(self, stage: str) -> bool:
        return bool(self.status().get(canonical_stage(stage), {}).get("complete"))

    def mark_complete(self, stage: str, **info: Any) -> None:
        """Record a finished stage; written atomically so a crash never half-writes status."""
        status = self.status()
        finished_at = time.strftime("%Y-%m-%dT%H:%M:%S")
        status[canonical_stage(stage)] = {"complete": True, "finished_at": finished_at, **info}
        self._write_status(status)

    def mark_incomplete(self, stage: str) -> None:
        status, stage = self.status(), canonical_stage(stage)
        if stage in status:
            del status[stage]
            self._write_status(status)

    def mark_stale(self, stage: str, reason: str) -> None:
        """Note on a complete stage that what it was made from has changed since: it stays
        complete and usable (the pipeline skips it); training it again clears the note."""
        status, stage = self.status(), canonical_stage(stage)
        if status.get(stage, {}).get("complete"):
            status[stage]["stale"] = reason
            self._write_status(status)

    def stale_stages(self) -> dict[str, str]:
        """Complete stages made from something that changed since, with the reason."""
        return {stage: info["stale"] for stage, info in self.status().items()
                if info.get("complete") and info.get("stale")}

    def _write_status(self, status: dict[str, Any]) -> None:
        atomic_write_text(self.status_path, json.dumps(status, indent=2) + "\n")


class LossLog:
    """Appends per-epoch figures to a CSV beside the checkpoint (readable while training runs)."""

    def __init__(self, path: str | Path, fields: list[str]):
        self.path = Path(path)
        self.fields = fields
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file():
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(fields)

    def append(self, **row: Any) -> None:
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([row.get(name, "") for name in self.fields])

    def rows(self) -> list[dict[str, str]]:
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))
