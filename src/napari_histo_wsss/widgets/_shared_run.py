"""One run folder for all the widgets of a viewer.

Each widget has its own run-folder field (a widget opened alone must work), but the folders
follow one another: choosing a run in one widget chooses it in every other widget of the same
viewer, and a widget opened later starts on the run already chosen. A user who trains, then
makes pseudo-masks, then compares, picks the folder once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

#: viewer -> its shared run folder
_SHARED: WeakKeyDictionary = WeakKeyDictionary()


class SharedRunFolder:
    """The run folder of one viewer and the fields that follow it."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self._fields: list[Any] = []
        self._updating = False

    def follow(self, field) -> None:
        """Keep ``field`` (a magicgui FileEdit) and the shared folder in step both ways."""
        self._fields.append(field)
        if self.folder is not None:
            self._set(field, self.folder)
        elif _chosen(field.value) is not None:
            self.folder = _chosen(field.value)
        field.changed.connect(lambda value, field=field: self.choose(value, source=field))

    def choose(self, value, source=None) -> None:
        """A folder was picked in ``source``: every other field follows."""
        folder = _chosen(value)
        if self._updating or folder is None or folder == self.folder:
            return
        self.folder = folder
        self._updating = True
        try:
            for field in list(self._fields):
                if field is not source:
                    try:
                        self._set(field, folder)
                    except RuntimeError:  # its widget was closed
                        self._fields.remove(field)
        finally:
            self._updating = False

    def _set(self, field, folder: Path) -> None:
        if _chosen(field.value) != folder:
            was = self._updating
            self._updating = True
            try:
                field.value = folder
            finally:
                self._updating = was


def _chosen(value) -> Path | None:
    if value is None or str(value) in ("", "."):
        return None
    with contextlib.suppress(TypeError, ValueError):
        return Path(value)
    return None


def shared_run_folder(viewer) -> SharedRunFolder:
    """The viewer's shared run folder (created on first use)."""
    if viewer not in _SHARED:
        _SHARED[viewer] = SharedRunFolder()
    return _SHARED[viewer]
