"""Resuming: a run's ``last.pt`` back into the model, the optimiser and a ``TrainingState``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..runs.checkpoints import load_checkpoint
from .state import TrainingState
from .stepper import Stepper, restore_optimizer

#: How to get past a resume checkpoint that cannot be used (said with every such refusal).
RESTART_HINT = "run again with --restart to start this stage over (or delete this file)"


def load_resume_checkpoint(path: Path, kind: str) -> dict[str, Any]:
    """``last.pt`` read for resuming; a truncated or corrupt one is refused with the way out."""
    try:
        return load_checkpoint(path, kind=kind)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {RESTART_HINT}") from None


def resume_state(payload: dict[str, Any], path: Path, model: nn.Module,
                 optimizer: torch.optim.Optimizer, mismatch: str) -> TrainingState:
    """Load ``payload`` (read from ``path``) into ``model`` and ``optimizer``; a checkpoint
    that does not fit raises one ``CheckpointError``: ``mismatch`` with the first line of
    torch's complaint in place of ``{reason}``."""
    try:
        model.load_state_dict(payload["state_dict"])
        if payload.get("optimizer_state"):
            restore_optimizer(optimizer, payload["optimizer_state"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise CheckpointError(mismatch.format(reason=reason), path) from None
    return TrainingState.from_dict(payload["training"])


def restore_average(stepper: Stepper, payload: dict[str, Any], path: Path) -> None:
    """Continue the saved weight average; a run saved without one (or with the average
    turned on later) starts it from the resumed weights."""
    saved = payload.get("average_state")
    if stepper.average is None or not saved:
        return
    try:
        stepper.average.load_state_dict(saved)
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"its weight average does not fit this model: "
                              f"{str(error).strip().splitlines()[0]}", path) from None
