"""torch, the model registries and pyqtgraph, imported once in a background thread.

Importing torch takes seconds (3.5 s on the 2-core test machine); done while a dock widget was
built, it froze napari for that long. The widgets only need torch for three lists (the
devices, the segmenter losses, the architectures) and pyqtgraph for the loss plot, so they
open with what is known without them ("auto" and "cpu", no plot yet) and fill those in when
the background import ends. Where torch is already loaded (a script, the tests, a second
widget) everything happens at once.

The import still holds Python's lock in long native stretches (loading half a gigabyte of
libraries), so the viewer stutters a few times while it runs (docs/widgets.md has figures);
doing it right after the first widget opens keeps those stutters out of the jobs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

_log = logging.getLogger(__name__)

#: Modules whose import pulls in torch and that fill the widgets' choices, pyqtgraph (the
#: loss plot; 0.5 s, most of it probing CUDA) and pandas.
HEAVY_MODULES = (
    "torch",
    "napari_histo_wsss.core.devices",
    "napari_histo_wsss.core.stage2.losses",
    "napari_histo_wsss.core.models.segmenter",
    "pyqtgraph",
    # napari imports pandas for the first layer with features (our labels layers' class
    # names): 0.5-1 s that froze the first pseudo-mask image shown.
    "pandas",
)
#: The import starts this long after the first widget asked, so the dock is drawn first.
START_DELAY_MS = 300
_callbacks: list[Callable[[], None]] = []
_worker = None
_done = False


def ready() -> bool:
    """True when the heavy modules are imported (or torch is, and they import quickly).

    False while the background import runs: its modules are in ``sys.modules`` from the
    start of their import, and importing them here would wait for it on the main thread.
    """
    global _done
    if _done:
        return True
    if _worker is not None:
        return False
    if "torch" in sys.modules:  # loaded by someone else: the rest takes a fraction of a second
        _import_heavy()
        _done = True
    return _done


def ready_without_waiting(module: str) -> bool:
    """True when ``module`` can be used now without importing torch on this thread."""
    return ready() or (_worker is None and module in sys.modules)


def when_ready(callback: Callable[[], None]) -> None:
    """Call ``callback`` on the main thread once the heavy modules are imported: now if they
    are, else when the background import ends (started on the first call)."""
    global _worker
    if ready():
        callback()
        return
    _callbacks.append(callback)
    if _worker is not None:
        return
    from qtpy.QtCore import QTimer
    from superqt.utils import create_worker

    _worker = create_worker(_import_heavy, _start_thread=False)
    _worker.returned.connect(_run_callbacks)
    _worker.errored.connect(lambda error: _log.error("importing torch failed", exc_info=error))
    QTimer.singleShot(START_DELAY_MS, _start)


def _start() -> None:
    from ._jobs import avoid_triton_llvm_clash

    avoid_triton_llvm_clash()  # before torch, in a process where the canvas loaded Mesa
    if _worker is not None:
        _worker.start()


def _import_heavy() -> None:
    import importlib

    for name in HEAVY_MODULES:
        importlib.import_module(name)


def _run_callbacks(*_) -> None:
    global _worker, _done
    _worker = None
    _done = True
    callbacks, _callbacks[:] = list(_callbacks), []
    for callback in callbacks:
        with contextlib.suppress(RuntimeError):  # a widget closed meanwhile
            callback()


def device_choices(*_) -> list[str]:
    """The device combo's choices: "auto" and "cpu" until torch can list the rest."""
    if not ready_without_waiting("napari_histo_wsss.core.devices"):
        return ["auto", "cpu"]
    from ..core.devices import available_devices

    return ["auto", *available_devices()]
