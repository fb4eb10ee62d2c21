"""Models loaded from checkpoint files, kept between uses in a long-lived process.

The napari widgets predict image after image with the same checkpoints; loading one takes
seconds, so it is kept until its file changes (a newer training wrote it) or the device does.
Only the most recently used ``capacity`` models are kept, so browsing run after run does not
fill the device's memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


class ModelCache:
    """Loaded models by checkpoint path, reloaded when the file or the device changes."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._held: dict[Path, tuple[tuple, Any]] = {}  # least recently used first

    def get(self, checkpoint: str | Path, device: Any, load: Callable[[], Any]) -> Any:
        """The model of ``checkpoint`` on ``device``; ``load()`` makes it when it is not held."""
        checkpoint = Path(checkpoint)
        version = (checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None, str(device))
        held = self._held.pop(checkpoint, None)
        if held is None or held[0] != version:
            held = None  # free the old model before loading the new one
            while len(self._held) >= self.capacity:
                self._held.pop(next(iter(self._held)))
            held = (version, load())
        self._held[checkpoint] = held
        return held[1]

    def __len__(self) -> int:
        return len(self._held)
