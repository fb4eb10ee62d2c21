"""Typed events that every long job yields, and the stop token jobs poll.

A job is a generator: ``result = yield from job(...)`` or iterate it and read ``Done.result``.
The CLI turns events into a progress bar, napari into progress bars and a loss plot, and the
tests assert on them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Started:
    """A job (or one stage of a pipeline) begins."""

    stage: str
    total_epochs: int
    batches_per_epoch: int


@dataclass(frozen=True)
class Batch:
    """One optimisation step (or one unit of work for inference jobs) finished."""

    stage: str
    epoch: int
    index: int
    total: int
    loss: float | None = None


@dataclass(frozen=True)
class Epoch:
    """An epoch finished; ``metrics`` holds validation figures where they exist."""

    stage: str
    epoch: int
    train_loss: float
    val_loss: float | None = None
    lr: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSaved:
    stage: str
    path: Path
    epoch: int
    best: bool = False


@dataclass(frozen=True)
class Preview:
    """Something worth showing while the job runs (a CAM, a pseudo-mask, a filled tile)."""

    stage: str
    name: str
    data: Any


@dataclass(frozen=True)
class Message:
    """A line for the user (a class with no single-label patch, a lowered batch size...)."""

    stage: str
    text: str


@dataclass(frozen=True)
class Done:
    """The job ended; ``stopped`` is True when a stop request ended it early."""

    stage: str
    result: Any
    stopped: bool = False


Event = Started | Batch | Epoch | CheckpointSaved | Preview | Message | Done


class StopToken:
    """A thread-safe stop request, checked by jobs between batches."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


def run_to_completion(job) -> Any:
    """Drain a job generator and return the result carried by its ``Done`` event."""
    result = None
    for event in job:
        if isinstance(event, Done):
            result = event.result
    return result
