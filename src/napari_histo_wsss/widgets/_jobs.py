"""Running a core job (a generator of events) in a napari thread worker.

Every widget starts its long jobs through a :class:`JobRunner`, so they all behave alike:

* the job runs in a worker thread; its events arrive on the main thread, where the widget
  updates progress bars, the loss plot and layers (layers are never touched from the worker);
* a stop request sets the job's :class:`~napari_histo_wsss.core.events.StopToken`: the job
  finishes its batch, saves a checkpoint and still ends with ``Done(stopped=True)``;
* closing the napari window (which cancels running tasks) and closing the widget stop jobs the
  same graceful way, instead of abandoning the generator mid-batch;
* an error becomes one line in a napari notification (the traceback goes to the log);
* cached device memory is released when a job ends, whatever way it ends.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Generator
from enum import Enum
from pathlib import Path
from typing import Any

from psygnal import Signal
from superqt.utils import GeneratorWorker

from ..core.events import Done, StopToken

_log = logging.getLogger(__name__)

#: A function that builds the job generator; it runs in the worker thread, so it may load data.
JobFactory = Callable[[StopToken], Generator[Any, None, Any]]


class JobState(Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def busy(self) -> bool:
        return self in (JobState.RUNNING, JobState.STOPPING)


class _GracefulWorker(GeneratorWorker):
    """A generator worker whose ``quit`` asks the job to stop instead of abandoning it.

    napari cancels running tasks with ``quit()`` when its window closes; abandoning a training
    generator there would lose the batch in progress and skip the checkpoint.
    """

    stop_token: StopToken

    def quit(self) -> None:
        self.stop_token.request()


def _run_job(make_job: JobFactory, stop: StopToken, device: str | None):
    """The worker-thread side: run the job, then give cached device memory back."""
    try:
        return (yield from make_job(stop))
    finally:
        _release_device_memory(device)


def _release_device_memory(device: str | None) -> None:
    from ..core.devices import release_memory, resolve_device
    from ..core.errors import HistoWsssError

    with contextlib.suppress(HistoWsssError):
        release_memory(resolve_device(device))


def avoid_triton_llvm_clash() -> None:
    """Keep torch from loading Triton into a process where Mesa's LLVM is already loaded.

    Under Mesa OpenGL (software rendering, Xvfb, many AMD/Intel Linux desktops) napari's
    canvas loads libLLVM; the first ``import triton`` afterwards (torch pulls it in through
    torchvision/timm with CUDA builds of torch) crashes the whole process in Triton's own
    LLVM. Nothing here needs Triton, so in that situation it is marked as absent, which torch
    handles as "not installed". Where Triton is already loaded, or no LLVM is, nothing changes.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    if "libLLVM" in maps:
        sys.modules["triton"] = None  # type: ignore[assignment]
        _log.info("Mesa's LLVM is loaded: Triton is disabled for this napari session")


def describe_error(error: BaseException) -> str:
    """One line for the user: our own errors as they are, others with their type."""
    from ..core.devices import OUT_OF_MEMORY_MESSAGE, is_out_of_memory
    from ..core.errors import HistoWsssError

    if isinstance(error, HistoWsssError):
        return str(error)
    if is_out_of_memory(error):
        return OUT_OF_MEMORY_MESSAGE
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def toast_text(error: BaseException) -> str:
    """The error for a notification, whose one line is cut at the window's width: the file's
    name and the problem first (the full path stays in the widget's status line)."""
    from ..core.errors import HistoWsssError

    text = describe_error(error)
    if isinstance(error, HistoWsssError) and error.path is not None:
        return f"{error.path.name}: {text.removeprefix(f'{error.path}: ')}"
    return text


class JobRunner:
    """One job at a time for one widget, with a small state model.

    ``event`` re-emits every event the job yields, on the main thread; ``state_changed`` fires
    on every transition (IDLE -> RUNNING -> [STOPPING ->] DONE | STOPPED | FAILED).
    """

    state_changed = Signal(object)
    event = Signal(object)

    def __init__(self, description: str):
        self.description = description
        self.state = JobState.IDLE
        self.error: str | None = None
        self.last_done: Done | None = None
        self._worker: _GracefulWorker | None = None
        self._stop: StopToken | None = None

    @property
    def busy(self) -> bool:
        return self.state.busy

    def start(self, make_job: JobFactory, device: str | None = None) -> None:
        """Run ``make_job(stop)`` in a worker thread; ``device`` is released when it ends."""
        if self.busy:
            raise RuntimeError(f"{self.description} is already running")
        from napari.qt.threading import create_worker

        avoid_triton_llvm_clash()
        self._stop = StopToken()
        self.error = None
        self.last_done = None
        worker = create_worker(
            _run_job, make_job, self._stop, device,
            _worker_class=_GracefulWorker, _ignore_errors=True, _start_thread=False,
        )
        worker.stop_token = self._stop
        worker.yielded.connect(self._on_yielded)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_state(JobState.RUNNING)
        worker.start()

    def stop(self) -> None:
        """Ask the job to stop after its current batch (it saves a checkpoint first)."""
        if self.state is JobState.RUNNING and self._stop is not None:
            self._stop.request()
            self._set_state(JobState.STOPPING)

    def shutdown(self) -> None:
        """The widget is going away: stop the job and stop reporting to the widget.

        The worker thread keeps running until the job honours the stop (one batch), then ends
        on its own; nothing it emits reaches the (deleted) widget any more.
        """
        worker, self._worker = self._worker, None
        if self._stop is not None and worker is not None:
            self._stop.request()
        if worker is not None:
            for signal, slot in ((worker.yielded, self._on_yielded),
                                 (worker.errored, self._on_errored),
                                 (worker.finished, self._on_finished)):
                with contextlib.suppress(TypeError, RuntimeError):
                    signal.disconnect(slot)
        self.state_changed.disconnect()
        self.event.disconnect()

    def wait(self, timeout_ms: int = 60_000) -> bool:
        """Block (processing Qt events) until the job ends; True when it did. For scripts/tests."""
        from qtpy.QtCore import QCoreApplication, QElapsedTimer, QThread

        clock = QElapsedTimer()
        clock.start()
        while self.busy and clock.elapsed() < timeout_ms:
            QCoreApplication.processEvents()
            QThread.msleep(5)
        return not self.busy

    # -- main-thread handlers ------------------------------------------------------------------
    def _on_yielded(self, event: Any) -> None:
        if isinstance(event, Done):
            self.last_done = event
        self.event.emit(event)

    def _on_errored(self, error: BaseException) -> None:
        from napari.utils.notifications import show_error

        from ..core.errors import HistoWsssError

        self.error = describe_error(error)
        if isinstance(error, HistoWsssError):  # the user's input: one line, no traceback
            _log.warning("%s failed: %s", self.description, self.error)
        else:  # a bug: keep the traceback in the log
            _log.error("%s failed", self.description, exc_info=error)
        show_error(f"{self.description}: {toast_text(error)}")

    def _on_finished(self) -> None:
        self._worker = None
        if self.error is not None:
            final = JobState.FAILED
        elif self.last_done is not None:
            final = JobState.STOPPED if self.last_done.stopped else JobState.DONE
        elif self._stop is not None and self._stop.requested:
            final = JobState.STOPPED
        else:
            final = JobState.DONE
        self._set_state(final)

    def _set_state(self, state: JobState) -> None:
        self.state = state
        self.state_changed.emit(state)
