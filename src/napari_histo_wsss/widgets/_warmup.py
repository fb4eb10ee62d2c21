"""torch, the model registries and pyqtgraph, imported once in a background thread (with
what napari's first layers would otherwise load on the main thread).

Importing torch takes seconds (3.5 s on the 2-core test machine); done while a dock widget was
built, it froze napari for that long. The widgets only need torch for three lists (the
devices, the segmenter losses, the architectures) and pyqtgraph for the loss plot, so they
open with what is known without them ("auto" and "cpu", no plot yet) and fill those in when
the background import ends. Where torch is already loaded (a script, the tests, a second
widget) everything happens at once.

The import loads half a gigabyte of native libraries, and Python holds its lock while it
loads one (an extension module's import, ``ctypes.CDLL``: torch preloads its CUDA libraries
that way even on a CPU), so the viewer stood still up to 0.4 s at a time. The warm-up first
loads each such library with the lock released (``native_loads_without_the_gil``); Python's
own load then finds it loaded. What remains is mostly Python code, which hands the lock over
every few milliseconds, but a few single calls (unmarshalling a large module, torch's
operator registration) still hold it for a few hundred milliseconds (docs/widgets.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import logging
import os
import sys
from collections.abc import Callable, Iterator

_log = logging.getLogger(__name__)

#: Modules whose import pulls in torch and that fill the widgets' choices, pyqtgraph (the
#: loss plot; 0.5 s, most of it probing CUDA) and pandas.
HEAVY_MODULES = (
    "torch",
    "napari_histo_wsss.core.devices",
    "napari_histo_wsss.core.stage2.losses",
    "napari_histo_wsss.core.models.segmenter",
    # Imported by the first job's model otherwise: timm pulls in torch._dynamo and sympy,
    # seconds of imports holding Python's lock in the job's thread (0.2-0.3 s stalls).
    "timm",
    "segmentation_models_pytorch",
    "pyqtgraph",
    # napari imports pandas for the first layer with features (our labels layers' class
    # names): 0.5-1 s that froze the first pseudo-mask image shown.
    "pandas",
    # napari imports scipy.ndimage for an image layer's first thumbnail: 0.4 s, the same way.
    "scipy.ndimage",
    # and scikit-image's colour conversions (with scipy.linalg) for the first labels layer's
    # random colours: 0.05-0.1 s of the first pseudo-mask view.
    "skimage.color.colorconv",
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

    _worker = create_worker(_background_warmup, _start_thread=False)
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

    from ._jobs import avoid_triton_llvm_clash

    # Where torch was loaded before the canvas (another plugin, a script), timm still pulls
    # Triton in here, after Mesa's LLVM: the clash is avoided on this path too.
    avoid_triton_llvm_clash()
    for name in HEAVY_MODULES:
        importlib.import_module(name)


@contextlib.contextmanager
def native_loads_without_the_gil() -> Iterator[None]:
    """While inside, native libraries load with Python's lock released.

    CPython holds the lock through ``dlopen`` in ``ctypes.CDLL`` and in an extension module's
    import, and ``dlopen`` of a large library (its relocations and static constructors: libtorch
    registers thousands of operators there) takes up to half a second. Each load first calls
    libc's ``dlopen`` through a ctypes function, which releases the lock, with the same flags;
    Python's own load, unchanged, then only takes another reference to the loaded library and
    reports errors as before. Process-wide while inside, so only for the warm-up thread's
    imports, and harmless to other threads' loads meanwhile (they take the same path).
    """
    dlopen = _libc_dlopen()
    if dlopen is None:  # Windows: no dlopen, nothing to change
        yield
        return
    plain_dlopen = ctypes._dlopen
    plain_create_module = importlib.machinery.ExtensionFileLoader.create_module

    def ctypes_dlopen(name, mode=ctypes.DEFAULT_MODE):
        if name:
            dlopen(os.fsencode(name), mode | os.RTLD_NOW)  # as ctypes' own dlopen
        return plain_dlopen(name, mode)

    def create_module(loader, spec):
        dlopen(os.fsencode(spec.origin), sys.getdlopenflags())  # as the import's
        return plain_create_module(loader, spec)

    ctypes._dlopen = ctypes_dlopen
    importlib.machinery.ExtensionFileLoader.create_module = create_module
    try:
        yield
    finally:
        ctypes._dlopen = plain_dlopen
        importlib.machinery.ExtensionFileLoader.create_module = plain_create_module


def _libc_dlopen():
    """libc's ``dlopen`` as a ctypes function (which releases Python's lock), or None."""
    if not hasattr(os, "RTLD_NOW"):
        return None
    try:
        dlopen = ctypes.CDLL(None).dlopen
    except (AttributeError, OSError, TypeError):
        return None
    dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    dlopen.restype = ctypes.c_void_p
    return dlopen


def _background_warmup():
    """The worker's job: the imports, vispy's dash patterns, and a built pint unit registry
    while napari's is not built yet (installed on the main thread when the worker returns)."""
    with native_loads_without_the_gil():
        _import_heavy()
    _build_dash_patterns()
    if _unit_registry_is_lazy():
        import pint

        return pint.UnitRegistry(on_redefinition="raise")  # as pint's lazy one builds it
    return None


def _build_dash_patterns() -> None:
    """napari's first labels layer builds vispy's line dash patterns for its polygon overlay:
    0.06-0.16 s of numpy on the main thread, kept in a module-level cache once built."""
    from vispy.visuals.line.dash_atlas import DashAtlas

    DashAtlas()


def _unit_registry_is_lazy() -> bool:
    """napari asks pint's application registry for "pixel" units when it makes its first
    layer, and pint builds that registry then: 0.15-0.35 s on the main thread."""
    import pint
    from pint.registry import LazyRegistry

    return isinstance(pint.get_application_registry().get(), LazyRegistry)


def _install_unit_registry(registry) -> None:
    """Swap in the registry built in the background, on the main thread and only while no
    layer has made napari build its own (so no unit from another registry exists yet)."""
    if registry is not None and _unit_registry_is_lazy():
        import pint

        pint.set_application_registry(registry)


def _run_callbacks(registry=None) -> None:
    global _worker, _done
    _install_unit_registry(registry)
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
