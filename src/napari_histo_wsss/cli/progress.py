"""Rendering job events on a terminal: one tqdm bar per stage, Ctrl-C as a clean stop.

The first Ctrl-C asks the job to stop at the next batch, so it saves a checkpoint and the run can
be resumed; a second one aborts at once.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Generator

from tqdm import tqdm

from ..core.events import (
    Batch,
    CheckpointSaved,
    Done,
    Epoch,
    Event,
    Message,
    Started,
    StopToken,
)


def drive(make_job: Callable[[StopToken], Generator[Event, None, None]], quiet: bool = False):
    """Run ``make_job(stop)`` to the end, showing progress; returns the final ``Done`` event."""
    stop = StopToken()
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        if stop.requested:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.request()
        tqdm.write("Stopping after this batch (a checkpoint is saved; run again to resume). "
                   "Press Ctrl-C again to abort now.")

    signal.signal(signal.SIGINT, on_interrupt)
    bar: tqdm | None = None
    last: Done | None = None
    try:
        for event in make_job(stop):
            if isinstance(event, Started):
                if bar is not None:
                    bar.close()
                total = event.total_epochs * event.batches_per_epoch or None
                bar = tqdm(total=total, desc=event.stage, unit="step", disable=quiet,
                           dynamic_ncols=True, file=sys.stderr)
            elif isinstance(event, Batch) and bar is not None:
                if bar.n == 0:  # a resumed job: start at the work done before
                    before = event.epoch * event.total + event.index
                    bar.update(before if bar.total and before < bar.total else 0)
                bar.update(1)
                if event.loss is not None:
                    bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
            elif isinstance(event, Epoch) and not quiet:
                tqdm.write(_epoch_line(event))
            elif isinstance(event, CheckpointSaved) and not quiet and event.best:
                tqdm.write(f"[{event.stage}] best checkpoint so far: {event.path}")
            elif isinstance(event, Message) and not quiet:
                tqdm.write(f"[{event.stage}] {event.text}")
            elif isinstance(event, Done):
                last = event
    finally:
        if bar is not None:
            bar.close()
        signal.signal(signal.SIGINT, previous)
    return last


def _epoch_line(event: Epoch) -> str:
    parts = [f"[{event.stage}] epoch {event.epoch + 1}: loss {event.train_loss:.4f}"]
    if event.val_loss is not None:
        parts.append(f"val loss {event.val_loss:.4f}")
    for name in ("miou", "fwiou", "dice"):
        if name in event.metrics:
            parts.append(f"val {name} {100 * event.metrics[name]:.2f}")
    return ", ".join(parts)
