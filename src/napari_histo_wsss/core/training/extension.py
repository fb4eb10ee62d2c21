"""Training a finished stage for more epochs ("train N more epochs" on an existing run).

A finished classifier or segmenter continues from its ``last.pt`` (weights, optimiser state,
weight average, history) for N more epochs. ``run.json`` records the new total in
``RunConfig.extended_epochs`` (the stage's own section keeps the original plan), so a stop
during the extension resumes like any stopped stage, and the checkpoints record it too.

**The schedule** continues as the tail of a run planned for the longer total from the start:
the per-step schedule is re-planned over E + N epochs and picks up at step E x batches. For
poly the lr restarts at base x (N / (E + N)) ** 0.9 (E 20, N 5: 0.23 x base; E 2, N 2: 0.54)
and decays to the floor again by the new end; a constant schedule stays constant. Why: at the
end of the first plan the lr is about 0, so continuing "from the current lr" would not train at
all, and restarting at the base lr would undo much of a converged model; a warm restart whose
height grows with the share of new epochs is sized to what was asked, and it is exactly what a
run planned that long would have done over those last epochs. **The weight average**
(``SegmenterConfig.weight_average``) continues from its saved state, with the decay of the
longer plan (``train_segmenter.average_decay``), so it keeps averaging where it left off.

**What was made from the stage goes stale.** A longer-trained classifier makes other
pseudo-masks, so the pseudo-mask stage is marked incomplete (the pipeline makes them again)
and the segmenters trained on the old ones are marked stale in ``status.json`` (still complete
and usable; train them again with ``--restart`` to learn from the new pseudo-masks). A
segmenter has nothing downstream inside the run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..config.run_config import RunConfig
from ..errors import CheckpointError, ConfigError
from ..runs.outputs import atomic_write_text
from ..runs.run_dir import RunDirectory
from ..runs.stages import CLASSIFIER, PSEUDO_MASKS, REFINED_MASKS, segmenter_stage
from . import distributed
from .resume import load_resume_checkpoint
from .state import TrainingState

#: Why a segmenter is stale once the classifier was trained longer.
STALE_PSEUDO_MASKS = "trained on pseudo-masks of the classifier before it was trained longer"


def extend_stage(run: RunDirectory, config: RunConfig, stage: str, last_path: Path,
                 kind: str, more_epochs: int) -> RunConfig:
    """Record in ``run.json`` that the finished ``stage`` trains ``more_epochs`` more epochs
    from ``last_path``; mark it (and what was made from it) as the module docstring says.
    Returns ``config`` with the new total, to train with."""
    if isinstance(more_epochs, bool) or not isinstance(more_epochs, int) or more_epochs < 1:
        raise ConfigError(f"more epochs must be a whole number of at least 1, not "
                          f"{more_epochs!r}")
    if not run.is_complete(stage):
        raise ConfigError(f"the {stage} stage has not finished: resume it first (run the same "
                          "command without more epochs), then train it longer", run.root)
    if not last_path.is_file():
        raise CheckpointError("is missing, so the finished model cannot be trained longer "
                              "(only a retrain from scratch can)", last_path)
    done = TrainingState.from_dict(load_resume_checkpoint(last_path, kind)["training"]).epoch
    total = done + more_epochs
    distributed.barrier()  # under torchrun: every rank has checked before rank 0 writes
    if distributed.is_main_process():
        stored = run.config()
        stored.extended_epochs = {**stored.extended_epochs, stage: total}
        atomic_write_text(run.config_path, json.dumps(stored.to_dict(), indent=2) + "\n")
        run.mark_incomplete(stage)
        if stage == CLASSIFIER:
            run.mark_incomplete(PSEUDO_MASKS)
            run.mark_incomplete(REFINED_MASKS)
            for strategy in run.segmenter_strategies():
                run.mark_stale(segmenter_stage(strategy), STALE_PSEUDO_MASKS)
    distributed.barrier()
    return replace(config, extended_epochs={**config.extended_epochs, stage: total})


def may_extend(saved_epochs: int, finished: bool, epochs_now: int) -> bool:
    """Whether a checkpoint planned for ``saved_epochs`` may continue to ``epochs_now``: the
    same plan, or a finished run trained longer (``extend_stage``); anything else would
    change the schedule in the middle of a run."""
    return epochs_now == saved_epochs or (finished and epochs_now > saved_epochs)
