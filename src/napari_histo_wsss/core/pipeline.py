"""The whole job: classifier, pseudo-masks and segmenter(s) with a method preset, resumable.

Each stage records its completion in the run directory, so running the pipeline again on the
same ``--out`` skips finished stages and resumes an interrupted one from its last checkpoint.
HisynSeg has no CAM stage and trains its own segmenter from synthetic images.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from .config.presets import preset
from .config.run_config import RunConfig
from .data.classes import DatasetSpec
from .data.datasets import DatasetLayout, find_dataset
from .devices import release_memory, resolve_device
from .errors import ConfigError
from .events import Done, Event, Message, StopToken
from .inference.metrics import format_scores
from .runs.locks import writes_run
from .runs.run_dir import RunDirectory
from .runs.stages import CLASSIFIER, PSEUDO_MASKS, REFINED_MASKS, segmenter_stage
from .runs.status import METHOD_WITHOUT_CAMS


def prepare_run(
    data_dir: str | Path,
    out: str | Path,
    method: str,
    *,
    spec: DatasetSpec | None = None,
    schedule: str = "fast",
    seed: int | None = None,
    device: str | None = None,
    mpp: float | None = None,
    train_precision: str | None = None,
    self_train: bool = False,
    classifier: dict | None = None,
    pseudo_masks: dict | None = None,
    segmenter: dict | None = None,
) -> tuple[RunDirectory, RunConfig, DatasetLayout]:
    """Create the run directory (or reopen it to resume) and resolve the configuration;
    ``self_train`` adds the self-training teacher to a new run (``presets.with_self_training``).

    A run directory that already exists keeps its own configuration: resuming with other
    settings would silently mix two recipes, so a different ``method`` is refused, and so is
    ``self_train`` on a run made without the teacher.
    """
    layout = find_dataset(data_dir, spec)
    run = RunDirectory(out)
    if run.exists():
        config = run.config()
        if config.method != method:
            raise ConfigError(
                f"this run was made with --method {config.method}; use another --out for "
                f"{method}",
                run.root,
            )
        if self_train and not config.pseudo_masks.teacher:
            raise ConfigError("this run was made without the self-training teacher; use another "
                              "--out to self-train", run.root)
        return run, config, find_dataset(data_dir, DatasetSpec.from_dict(config.dataset))
    num_patches = len(layout.patches())
    config = preset(method, schedule=schedule, num_patches=num_patches,
                    self_train=self_train)
    config.data_dir = str(Path(data_dir).resolve())
    config.dataset = layout.spec.to_dict()
    if seed is not None:
        config.seed = seed
    if device is not None:
        config.device = device
    if train_precision is not None:
        config.train_precision = train_precision
    if mpp is not None:
        if not mpp > 0:
            raise ConfigError(f"the patches' microns per pixel must be positive, not {mpp}")
        config.mpp = mpp
    config.classifier = replace(config.classifier, **(classifier or {}))
    config.pseudo_masks = replace(config.pseudo_masks, **(pseudo_masks or {}))
    config.segmenter = replace(config.segmenter, **(segmenter or {}))
    run.create(config)
    return run, config, layout


@writes_run("pipeline")
def run_pipeline(
    run: RunDirectory,
    config: RunConfig,
    layout: DatasetLayout,
    *,
    stop: StopToken | None = None,
    strategies: list[str] | None = None,
    more_epochs: int = 0,
) -> Generator[Event, None, None]:
    """Run every unfinished stage; ends with ``Done(result=summary dict)``.

    ``strategies`` trains several noise-suppression losses one after another on the same
    pseudo-masks (the napari comparison view shows them side by side). ``more_epochs``
    trains those (finished) strategies that many epochs longer (core/training/extension.py)
    and scores them again.
    """
    if more_epochs and config.method == METHOD_WITHOUT_CAMS:
        raise ConfigError("HisynSeg's two training rounds cannot be trained longer: train a "
                          "new run with more segmenter epochs", run.root)
    stop = stop or StopToken()
    device = resolve_device(config.device)
    val = layout.eval_set("val")
    if val is not None:
        val.check()
    patches = layout.patches()
    patches.decode_all()
    started = time.perf_counter()
    summary: dict = {"run": str(run.root), "method": config.method, "device": str(device)}
    if config.method == METHOD_WITHOUT_CAMS:
        strategies = [METHOD_WITHOUT_CAMS]
    else:
        strategies = strategies or [config.segmenter.loss]
    trained = False
    longer = {segmenter_stage(strategy) for strategy in strategies} if more_epochs else set()
    for stage, job in _stage_jobs(run, config, patches, val, device, stop, strategies,
                                  more_epochs):
        if run.is_complete(stage) and stage not in longer:
            continue
        trained = True
        finished = True
        for event in job():
            if isinstance(event, Done):
                finished = not event.stopped
            yield event
        release_memory(device)
        if not finished:
            yield Done("pipeline", summary, stopped=True)
            return
    summary["strategies"] = strategies
    if val is not None:
        summary["val"] = yield from _evaluate_strategies(run, strategies, val, device)
    _write_summary(run.root / "summary.json", summary, time.perf_counter() - started, trained)
    yield Done("pipeline", summary)


def _stage_jobs(run, config, patches, val, device, stop, strategies, more_epochs=0
                ) -> list[tuple[str, Callable[[], Generator[Event, None, Any]]]]:
    """The method's stages in order, as (status name, job factory) pairs."""
    common = {"device": device, "stop": stop}
    if config.method == METHOD_WITHOUT_CAMS:
        from .hisynseg.train import train_hisynseg

        return [(segmenter_stage(METHOD_WITHOUT_CAMS),
                 partial(train_hisynseg, run, config, patches, resume=True, val=val, **common))]
    from .stage1.train_classifier import train_classifier
    from .stage2.train_segmenter import train_segmenter

    jobs = [(CLASSIFIER, partial(train_classifier, run, config, patches, resume=True, val=val,
                                  **common)),
            (PSEUDO_MASKS, partial(_pseudo_masks_then_report, run, config, patches, val,
                                   **common))]
    if config.pseudo_masks.teacher:
        from .stage2.self_training import refine_pseudo_masks

        jobs.append((REFINED_MASKS, partial(refine_pseudo_masks, run, config, patches, val=val,
                                            **common)))
    for strategy in strategies:
        strategy_config = replace(config, segmenter=replace(config.segmenter, loss=strategy))
        jobs.append((segmenter_stage(strategy), partial(
            train_segmenter, run, strategy_config, patches, strategy=strategy, resume=True,
            val=val, more_epochs=more_epochs, **common)))
    return jobs


def _pseudo_masks_then_report(run, config, patches, val, *, device, stop
                              ) -> Generator[Event, None, None]:
    """Generate the pseudo-masks; once they are complete, say how good they are on val."""
    from .stage1.pseudo_masks import generate_pseudo_masks, pseudo_mask_report

    yield from generate_pseudo_masks(run, config, patches, device=device, stop=stop)
    if val is not None and run.is_complete(PSEUDO_MASKS):
        report = pseudo_mask_report(run, config, val, device)
        yield Message(PSEUDO_MASKS, "pseudo-mask quality on val: "
                      + format_scores(report).splitlines()[0])


def _write_summary(path: Path, summary: dict, elapsed: float, trained: bool) -> None:
    """Save the summary with the wall time of all invocations that trained something in this
    run (a strategy added later adds its time); re-scoring a finished run adds nothing."""
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    before = earlier.get("wall_seconds")
    if before is None:
        summary["wall_seconds"] = round(elapsed, 1)
    else:
        summary["wall_seconds"] = round(before + elapsed, 1) if trained else before
    path.write_text(json.dumps(summary, indent=2) + "\n")


def _evaluate_strategies(run, strategies, val, device) -> Generator[Event, None, dict]:
    from .inference.calibration import make_val_choices

    results = {}
    for strategy in strategies:
        scores, choices = make_val_choices(run, strategy, val, device)
        for line in choices:
            yield Message("evaluate", f"{strategy}: {line}")
        results[strategy] = scores
        yield Message("evaluate", f"{strategy} on val: " + format_scores(scores).splitlines()[0])
    return results
