"""Where a training run stands, saved into every checkpoint so that training can resume.

``TrainingState`` is typed for the code and a plain dict of numbers, strings, lists and dicts in
the checkpoint (``to_dict``), so checkpoints still load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Keys of classifier checkpoints written before ``TrainingState`` existed, read on resume.
_LEGACY_KEYS = ("running_loss", "running_batches", "epoch_losses")


@dataclass
class TrainingState:
    """The position (epoch, batch, step), the running epoch's sums and what was kept."""

    #: Epochs finished.
    epoch: int = 0
    #: Batches finished in the running epoch.
    batch: int = 0
    #: Optimiser steps finished.
    step: int = 0
    loss_sum: float = 0.0
    parts_sum: dict[str, float] = field(default_factory=dict)
    #: One entry per finished epoch: epoch (from 1), train_loss, lr, validation figures.
    history: list[dict[str, Any]] = field(default_factory=list)
    best_miou: float | None = None
    #: Counted from 1, like ``history``.
    best_epoch: int | None = None
    seconds: float = 0.0
    #: A trainer's own entries (HisynSeg's round), saved beside the others.
    extra: dict[str, Any] = field(default_factory=dict)

    def add_batch(self, loss: float, parts: dict[str, float]) -> None:
        self.step += 1
        self.batch += 1
        self.loss_sum += loss
        for name, value in parts.items():
            self.parts_sum[name] = self.parts_sum.get(name, 0.0) + value

    def finish_epoch(self, batches: int) -> tuple[float, dict[str, float]]:
        """The epoch's mean loss and loss parts; the sums start again for the next epoch."""
        batches = max(batches, 1)
        means = (self.loss_sum / batches,
                 {name: value / batches for name, value in self.parts_sum.items()})
        self.epoch, self.batch, self.loss_sum, self.parts_sum = self.epoch + 1, 0, 0.0, {}
        return means

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "extra"}
        return {**self.extra, **_plain(data)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingState:
        """Read ``to_dict``'s output, or an older checkpoint's ``training`` dict (the
        classifier's ``running_loss``/``running_batches``/``epoch_losses``); entries that are
        not part of the state go to ``extra``."""
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "running_loss" in data:  # a classifier checkpoint from before TrainingState
            per_epoch = max(int(data.get("steps_per_epoch") or 1), 1)
            data.setdefault("epoch", data["step"] // per_epoch)
            data.setdefault("batch", data["running_batches"])
            data.setdefault("loss_sum", data["running_loss"])
            data.setdefault("history", [{"epoch": number + 1, "train_loss": loss}
                                        for number, loss in enumerate(data["epoch_losses"])])
        state = cls(**{key: value for key, value in data.items() if key in names})
        state.parts_sum = dict(state.parts_sum)
        state.history = [dict(entry) for entry in state.history]
        state.extra = {key: value for key, value in data.items()
                       if key not in names and key not in _LEGACY_KEYS}
        return state


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Copies of the containers, so a saved dict never changes with the live state."""
    return {key: ([dict(v) for v in value] if key == "history" else
                  dict(value) if isinstance(value, dict) else value)
            for key, value in data.items()}
