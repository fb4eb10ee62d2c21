"""Run folders and datasets as the widgets show them (the state itself: core.runs.status)."""

from __future__ import annotations

from pathlib import Path

from ..core.runs.status import StageState, run_status

CLASSIFIER_TEXT = {StageState.DONE: "classifier trained",
                   StageState.STOPPED: "classifier stopped early (resumes)",
                   StageState.MISSING: "classifier not trained"}


def describe_dataset(folder) -> str:
    """One line about a dataset folder: its classes and sizes; raises HistoWsssError."""
    from ..core.data.datasets import find_dataset

    layout = find_dataset(folder)
    parts = [f"{layout.spec.name}: {', '.join(layout.spec.class_names)}",
             f"{len(layout.patches())} training patches"]
    for split in ("val", "test"):
        evaluation = layout.eval_set(split)
        if evaluation is not None:
            parts.append(f"{len(evaluation)} {split} images with masks")
    return " · ".join(parts)


def describe_run(folder) -> str:
    """One line about a run folder: method and the state of each stage."""
    if folder is None or not str(folder) or str(folder) == ".":
        return "choose a run folder"
    status = run_status(folder)
    if not status.exists:
        return "new run: created when the job starts"
    parts = [f"method {status.method}"]
    if status.uses_cams:
        parts.append(CLASSIFIER_TEXT[status.classifier])
        parts.append("pseudo-masks done" if status.pseudo_masks is StageState.DONE
                     else "no pseudo-masks yet")
    strategies = [f"{name} (stale: older pseudo-masks)" if name in status.stale else name
                  for name in status.strategies]
    parts.append(f"segmenters: {', '.join(strategies)}" if strategies else "no segmenter yet")
    return " · ".join(parts)


def open_run(folder, dataset: Path | None = None):
    """(run, config, layout) of an existing run; its dataset is found where the run says
    unless ``dataset`` points elsewhere (a moved dataset). Raises HistoWsssError."""
    from ..core.data.classes import DatasetSpec
    from ..core.data.datasets import find_dataset
    from ..core.errors import ConfigError
    from ..core.runs.run_dir import RunDirectory

    if folder is None or not str(folder) or str(folder) == ".":
        raise ConfigError("choose a run folder first")
    run = RunDirectory(folder)
    config = run.config()
    spec = DatasetSpec.from_dict(config.dataset)
    data_dir = dataset if dataset and str(dataset) not in ("", ".") else config.data_dir
    return run, config, find_dataset(data_dir, spec)


def given_path(value) -> Path | None:
    """A FileEdit value, or None when the field is empty."""
    if value is None or str(value) in ("", "."):
        return None
    return Path(value)
