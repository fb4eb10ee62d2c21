"""User-facing errors.

Every problem a user can cause (a bad file, a wrong label format, a class-count mismatch, a
corrupt slide) is raised as a ``HistoWsssError`` whose message names the file and the problem.
The CLI prints that one line and exits non-zero; the widgets show it as a napari notification.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class HistoWsssError(Exception):
    """A problem with the user's input, explained in one line."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class DatasetError(HistoWsssError):
    """A dataset folder, file name, image or mask that cannot be used."""


class SlideError(HistoWsssError):
    """A slide that cannot be opened or read."""


class CheckpointError(HistoWsssError):
    """A checkpoint that is missing, corrupt or does not fit the dataset."""


class ConfigError(HistoWsssError):
    """A setting that does not make sense (unknown method, backbone, device, ...)."""
