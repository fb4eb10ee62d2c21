"""The whole job: classifier, pseudo-masks and segmenter(s) with a method preset, resumable.

Each stage records its completion in the run directory, so running the pipeline again on the
same ``--out`` skips finished stages and resumes an interrupted one from its last checkpoint.
HisynSeg has no CAM stage and trains its own segmenter from synthetic images.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path

from .config.presets import preset
from .config.run_config import RunConfig
from .data.classes import DatasetSpec
from .data.datasets import DatasetLayout, find_dataset
from .devices import release_memory, resolve_device
from .errors import ConfigError
from .events import Done, Event, Message, StopToken
from .inference.metrics import format_scores
from .runs.run_dir import RunDirectory


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
    classifier: dict | None = None,
    pseudo_masks: dict | None = None,
    segmenter: dict | None = None,
) -> tuple[RunDirectory, RunConfig, DatasetLayout]:
    """Create the run directory (or reopen it to resume) and resolve the configuration.

    A run directory that already exists keeps its own configuration: resuming with other
    settings would silently mix two recipes, so a different ``method`` is refused.
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
        return run, config, find_dataset(data_dir, DatasetSpec.from_dict(config.dataset))
    num_patches = len(layout.patches())
    config = preset(method, schedule=schedule, num_patches=num_patches)
    config.data_dir = str(Path(data_dir).resolve())
    config.dataset = layout.spec.to_dict()
    if seed is not None:
        config.seed = seed
    if device is not None:
        config.device = device
    if mpp is not None:
        if not mpp > 0:
            raise ConfigError(f"the patches' microns per pixel must be positive, not {mpp}")
        config.mpp = mpp
    config.classifier = replace(config.classifier, **(classifier or {}))
    config.pseudo_masks = replace(config.pseudo_masks, **(pseudo_masks or {}))
    config.segmenter = replace(config.segmenter, **(segmenter or {}))
    run.create(config)
    return run, config, layout


def run_pipeline(
    run: RunDirectory,
    config: RunConfig,
    layout: DatasetLayout,
    *,
    stop: StopToken | None = None,
    strategies: list[str] | None = None,
) -> Generator[Event, None, None]:
    """Run every unfinished stage; ends with ``Done(result=summary dict)``.

    ``strategies`` trains several noise-suppression losses one after another on the same
    pseudo-masks (the napari comparison view shows them side by side).
    """
    stop = stop or StopToken()
    device = resolve_device(config.device)
    patches = layout.patches()
    patches.decode_all()
    val = layout.eval_set("val")
    started = time.perf_counter()
    summary: dict = {"run": str(run.root), "method": config.method, "device": str(device)}
    summary_path = run.root / "summary.json"
    earlier = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    trained = False

    def stage(job) -> Generator[Event, None, bool]:
        """Forward a stage's events; True when it finished, False when it was stopped."""
        nonlocal trained
        trained = finished = True
        for event in job:
            if isinstance(event, Done):
                finished = not event.stopped
            yield event
        release_memory(device)
        return finished

    if config.method == "hisynseg":
        from .hisynseg.train import train_hisynseg

        if not run.is_complete("segmenter:hisynseg"):
            finished = yield from stage(train_hisynseg(
                run, config, patches, device=device, stop=stop, resume=True, val=val))
            if not finished:
                yield Done("pipeline", summary, stopped=True)
                return
        strategies = ["hisynseg"]
    else:
        from .stage1.pseudo_masks import generate_pseudo_masks, pseudo_mask_report
        from .stage1.train_classifier import train_classifier
        from .stage2.train_segmenter import train_segmenter

        if not run.is_complete("classifier"):
            finished = yield from stage(train_classifier(
                run, config, patches, device=device, stop=stop, resume=True))
            if not finished:
                yield Done("pipeline", summary, stopped=True)
                return
        if not run.is_complete("pseudo_masks"):
            finished = yield from stage(generate_pseudo_masks(
                run, config, patches, device=device, stop=stop))
            if not finished:
                yield Done("pipeline", summary, stopped=True)
                return
            if val is not None:
                report = pseudo_mask_report(run, config, val, device)
                yield Message("pseudo-masks", "pseudo-mask quality on val: "
                              + format_scores(report).splitlines()[0])
        strategies = strategies or [config.segmenter.loss]
        for strategy in strategies:
            if run.is_complete(f"segmenter:{strategy}"):
                continue
            strategy_config = replace(config, segmenter=replace(config.segmenter, loss=strategy))
            finished = yield from stage(train_segmenter(
                run, strategy_config, patches, strategy=strategy, device=device, stop=stop,
                resume=True, val=val))
            if not finished:
                yield Done("pipeline", summary, stopped=True)
                return

    summary["strategies"] = strategies
    if val is not None:
        summary["val"] = yield from _evaluate_strategies(run, strategies, val, device)
    # Wall time of all invocations that trained something in this run (a strategy added later
    # adds its time); re-scoring a finished run adds nothing.
    elapsed = round(time.perf_counter() - started, 1)
    before = earlier.get("wall_seconds")
    if before is None:
        summary["wall_seconds"] = elapsed
    else:
        summary["wall_seconds"] = round(before + elapsed, 1) if trained else before
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    yield Done("pipeline", summary)


def _evaluate_strategies(run, strategies, val, device) -> Generator[Event, None, dict]:
    from .inference.predict import describe_gate_choice, select_class_gate

    results = {}
    for strategy in strategies:
        scores = select_class_gate(run, strategy, val, device)
        results[strategy] = scores
        gate_choice = describe_gate_choice(scores)
        if gate_choice:
            yield Message("evaluate", f"{strategy}: {gate_choice}")
        yield Message("evaluate", f"{strategy} on val: " + format_scores(scores).splitlines()[0])
    return results
