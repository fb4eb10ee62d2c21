"""The one training loop: epochs of steps, stop and resume, checkpoints and progress events.

A trainer (``EpochTrainer``) supplies what differs: how one batch becomes a loss, the lr of a
step, and what an epoch's end means (validation, which model to keep, the logs). ``run_epochs``
does the rest the same way for every trainer:

- it continues from ``state`` (epoch, batch within it), so a resumed run goes on where it
  stopped;
- a stop request is honoured before the next batch: ``last.pt`` saves the position (and
  ``model.pt`` is always usable), then ``Done(stopped=True)``;
- after each epoch ``last.pt`` is saved, ``model.pt`` when the trainer keeps the epoch; weights
  that became NaN or infinite are never saved: training stops with one ``ConfigError``;
- it yields Started, Batch, Epoch, CheckpointSaved and Done. Under torchrun losses are averaged
  over the ranks and only rank 0 writes files and yields events (the other ranks yield only
  the final ``Done``, which names the same ``model.pt``).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..events import Batch, CheckpointSaved, Done, Epoch, Event, Message, Started, StopToken
from . import distributed
from .state import TrainingState
from .stepper import Stepper


@dataclass
class EpochResult:
    """What a trainer's epoch end decided."""

    metrics: dict[str, float] = field(default_factory=dict)
    #: This epoch's model becomes ``model.pt``...
    keep: bool = True
    #: ... because it scored best on validation so far.
    best: bool = False
    #: Events to show before the ``Epoch`` event (a preview of the last batch).
    events: list[Event] = field(default_factory=list)


class EpochTrainer:
    """One trainer's parts of the loop. Subclasses set the attributes in ``__init__`` and
    define ``set_lr``, ``step`` and ``end_epoch``; the other parts are optional."""

    stage: str
    epochs: int
    batches_per_epoch: int
    state: TrainingState
    stepper: Stepper
    #: ``last.pt`` (resume position) and ``model.pt``; None: nothing is saved (in memory only).
    last_path: Path | None = None
    model_path: Path | None = None
    #: The stage named by ``Done``; None: a part of a job that yields no ``Done`` at all.
    done_stage: str | None = None
    #: The last part of the job: once its epochs ran, ``model.pt`` exists, ``finish`` marks
    #: the job complete and ``Done`` follows. A stop ends the job in any part.
    final: bool = True
    #: The stopped model replaces ``model.pt`` (no validation decides what is kept).
    save_model_on_stop: bool = False

    def begin_epoch(self, epoch: int, first_batch: int) -> None:
        """Draw the epoch's order and seed its random streams (``first_batch`` > 0: resumed)."""

    def set_lr(self, epoch: int, index: int) -> float:
        """Set the optimiser's lr for batch ``index`` of ``epoch``; returns the lr to report."""
        raise NotImplementedError

    def step(self, model: nn.Module, epoch: int, index: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """One batch through ``model`` (under ``stepper.autocast()``): the loss to minimise
        and its parts (floats, for the logs)."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, train_loss: float, parts: dict[str, float],
                  lr: float) -> EpochResult:
        """Validate, decide what to keep and add the epoch to ``state.history`` (every rank)."""
        raise NotImplementedError

    def save(self, path: Path, with_optimizer: bool, stopped: bool = False) -> None:
        """Write a checkpoint of the model (rank 0 only)."""

    def record(self, epoch: int, train_loss: float, parts: dict[str, float], lr: float,
               result: EpochResult) -> None:
        """Write the epoch's logs after its checkpoints (rank 0 only)."""

    def finish(self) -> Any:
        """Mark the job complete once every epoch has run (rank 0 only); ``Done``'s result."""
        return self.model_path


def run_epochs(trainer: EpochTrainer, stop: StopToken) -> Generator[Event, None, bool]:
    """Train ``trainer``'s remaining epochs; True when they all ran, False when stopped."""
    main = distributed.is_main_process()
    events = _main_events if main else _silent
    state = trainer.state
    yield from events(Started(trainer.stage, trainer.epochs, trainer.batches_per_epoch))
    if trainer.stepper.precision_note and state.epoch < trainer.epochs:
        yield from events(Message(trainer.stage, trainer.stepper.precision_note))
    for epoch in range(state.epoch, trainer.epochs):
        trainer.stepper.model.train()
        trainer.begin_epoch(epoch, state.batch)
        started = time.perf_counter()
        lr = trainer.set_lr(epoch, state.batch)
        for index in range(state.batch, trainer.batches_per_epoch):
            if distributed.any_rank(stop.requested):
                state.seconds += time.perf_counter() - started
                yield from _stopped(trainer, epoch, main)
                return False
            lr = trainer.set_lr(epoch, index)
            with trainer.stepper.autocast():
                loss, parts = trainer.step(trainer.stepper.model, epoch, index)
            value = distributed.mean_over_ranks(
                trainer.stepper.step(loss, where=f"at epoch {epoch + 1}"))
            state.add_batch(value, {name: distributed.mean_over_ranks(part)
                                    for name, part in parts.items()})
            yield from events(Batch(trainer.stage, epoch, index, trainer.batches_per_epoch,
                                    value))
        state.seconds += time.perf_counter() - started
        trainer.stepper.check_weights(f"at epoch {epoch + 1}")
        yield from events(*_end_epoch(trainer, epoch, lr, main))
    if trainer.done_stage is not None and trainer.final:
        result = trainer.model_path
        if main:
            if trainer.model_path is not None and not trainer.model_path.is_file():
                trainer.save(trainer.model_path, with_optimizer=False)  # resumed when done
            result = trainer.finish()
        yield Done(trainer.done_stage, result)
    return True


def _end_epoch(trainer: EpochTrainer, epoch: int, lr: float, main: bool) -> list[Event]:
    """Close the epoch: the trainer's verdict, checkpoints, logs; the events to report."""
    state = trainer.state
    train_loss, parts = state.finish_epoch(trainer.batches_per_epoch)
    result = trainer.end_epoch(epoch, train_loss, parts, lr)
    events: list[Event] = [*result.events, Epoch(trainer.stage, epoch, train_loss, lr=lr,
                                                 metrics=result.metrics)]
    if trainer.last_path is None:
        return events
    if main:
        if result.keep:
            trainer.save(trainer.model_path, with_optimizer=False)
        trainer.save(trainer.last_path, with_optimizer=True)
        trainer.record(epoch, train_loss, parts, lr, result)
    events.append(CheckpointSaved(trainer.stage, trainer.last_path, state.epoch))
    if result.keep:
        events.append(CheckpointSaved(trainer.stage, trainer.model_path, state.epoch,
                                      best=result.best))
    return events


def _stopped(trainer: EpochTrainer, epoch: int, main: bool) -> Generator[Event, None, None]:
    """Save the position; ``model.pt`` too when the stopped model replaces it or none exists.
    The job ends with ``Done(stopped=True)`` unless the trainer is an unsaved part of it."""
    trainer.stepper.check_weights(f"at epoch {epoch + 1}")
    if trainer.last_path is not None and main:
        trainer.save(trainer.last_path, with_optimizer=True, stopped=True)
        if trainer.save_model_on_stop or not trainer.model_path.is_file():
            trainer.save(trainer.model_path, with_optimizer=False, stopped=True)
        yield CheckpointSaved(trainer.stage, trainer.last_path, epoch)
    if trainer.done_stage is not None:
        yield Done(trainer.done_stage, trainer.model_path, stopped=True)


def _main_events(*events: Event) -> Generator[Event, None, None]:
    yield from events


def _silent(*events: Event) -> Generator[Event, None, None]:
    yield from ()
