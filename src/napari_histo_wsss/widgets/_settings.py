"""Last-used widget values, kept between napari sessions in one small JSON file.

The file lives in the user's config folder (``~/.config/napari-histo-wsss/widgets.json`` on
Linux, the platform's equivalent elsewhere, as Qt reports it), one section per widget. Set
``HISTO_WSSS_CONFIG_DIR`` to keep it elsewhere (the tests point it at a temporary folder).
Anything unreadable is ignored: a broken settings file must never stop a widget from opening.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from ..core.runs.outputs import atomic_write_text

CONFIG_DIR_ENV_VAR = "HISTO_WSSS_CONFIG_DIR"
_FILE_NAME = "widgets.json"


def settings_path() -> Path:
    override = os.environ.get(CONFIG_DIR_ENV_VAR)
    if override:
        return Path(override).expanduser() / _FILE_NAME
    from qtpy.QtCore import QStandardPaths

    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericConfigLocation)
    root = Path(base) if base else Path.home() / ".config"
    return root / "napari-histo-wsss" / _FILE_NAME


def _read_all() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(settings_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_settings(section: str) -> dict[str, Any]:
    """The values saved for one widget (empty when there are none)."""
    values = _read_all().get(section, {})
    return values if isinstance(values, dict) else {}


def save_settings(section: str, values: dict[str, Any]) -> None:
    """Replace one widget's saved values; failures to write are silently skipped."""
    data = _read_all()
    data[section] = values
    path = settings_path()
    with contextlib.suppress(OSError):
        atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
