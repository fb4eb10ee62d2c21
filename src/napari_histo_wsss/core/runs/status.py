"""What a run directory holds: which stages are done, stopped part-way, or still missing.

The widgets show this as one line and the pipeline skips what is done; both read it here so
"done" means the same thing everywhere (a stage is done once ``status.json`` says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .run_dir import RunDirectory
from .stages import CLASSIFIER, PSEUDO_MASKS, REFINED_MASKS, segmenter_stage

#: The method that trains its segmenter from synthetic images, without the CAM stages.
METHOD_WITHOUT_CAMS = "hisynseg"


class StageState(Enum):
    DONE = "done"
    STOPPED = "stopped"  # interrupted: a checkpoint to resume from is there
    MISSING = "missing"


@dataclass(frozen=True)
class RunStatus:
    """One run directory's progress; ``method`` is None when the folder holds no run yet."""

    root: Path
    method: str | None
    classifier: StageState = StageState.MISSING
    pseudo_masks: StageState = StageState.MISSING
    strategies: list[str] = field(default_factory=list)  # trained segmenters, oldest first
    #: Trained segmenters made from something that changed since (RunDirectory.mark_stale).
    stale: list[str] = field(default_factory=list)

    @property
    def exists(self) -> bool:
        return self.method is not None

    @property
    def uses_cams(self) -> bool:
        """Whether the method has the classifier and pseudo-mask stages at all."""
        return self.method != METHOD_WITHOUT_CAMS


def run_status(folder: str | Path) -> RunStatus:
    """The progress of the run in ``folder`` (a folder without ``run.json`` is a new run)."""
    run = RunDirectory(folder)
    if not run.exists():
        return RunStatus(run.root, None)
    config = run.config()
    masks_done = run.is_complete(PSEUDO_MASKS) and (
        not config.pseudo_masks.teacher or run.is_complete(REFINED_MASKS))
    return RunStatus(run.root, config.method, classifier=_classifier_state(run),
                     pseudo_masks=StageState.DONE if masks_done else StageState.MISSING,
                     strategies=run.segmenter_strategies(),
                     stale=[name for name in run.segmenter_strategies()
                            if segmenter_stage(name) in run.stale_stages()])


def _classifier_state(run: RunDirectory) -> StageState:
    if run.is_complete(CLASSIFIER):
        return StageState.DONE
    if run.classifier_checkpoint.is_file() or (run.classifier_dir / "last.pt").is_file():
        return StageState.STOPPED
    return StageState.MISSING
