"""Learning-rate schedules (``SegmenterConfig.schedule``; the classifier always runs "poly").

A schedule maps (step, total steps) to a factor of each parameter group's ``base_lr``; the lr
never falls below ``min_lr`` (or the group's own base lr where that is smaller).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..registry import Registry

POLY_POWER = 0.9

Schedule = Callable[[int, int], float]

SCHEDULES: Registry[Schedule] = Registry("lr schedule")


@SCHEDULES.register("poly")
def poly(step: int, total_steps: int) -> float:
    """(1 - step / total) ** 0.9, per iteration (DeepLab, mmseg)."""
    return (1 - min(step, total_steps) / max(total_steps, 1)) ** POLY_POWER


@SCHEDULES.register("constant")
def constant(step: int, total_steps: int) -> float:
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, schedule: str, step: int, total_steps: int,
           min_lr: float = 0.0, ramp: float = 1.0) -> float:
    """Set every group's lr for ``step``, times a warm-up ``ramp`` in [0, 1]; returns the
    first group's (the one reported)."""
    factor = SCHEDULES.get(schedule)(step, total_steps) * ramp
    for group in optimizer.param_groups:
        floor = min(min_lr, group["base_lr"])
        group["lr"] = floor + (group["base_lr"] - floor) * factor
    return optimizer.param_groups[0]["lr"]
