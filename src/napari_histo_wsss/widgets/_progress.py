"""In-widget feedback for long jobs: a status line, epoch and batch bars, a live loss plot.

``ProgressPanel.show_event`` understands every core event, so a widget only forwards what its
job yields. The plot draws the batch losses as they arrive (a curve that moves from the first
batch on), the epoch means and the validation loss, one colour per stage (one per strategy when
several segmenters train one after another).
"""

from __future__ import annotations

import time
from typing import Any

from qtpy.QtWidgets import QLabel, QProgressBar, QVBoxLayout, QWidget

from ..core.events import Batch, CheckpointSaved, Done, Epoch, Message, Started

#: The shortest time between two moves of the activity dock's bar.
UPDATE_INTERVAL_S = 0.5
#: Curve colours, one per stage, readable on napari's dark and light themes.
_STAGE_COLOURS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176")


class LossPlot:
    """A small pyqtgraph plot of training and validation losses against epochs."""

    def __init__(self) -> None:
        import pyqtgraph as pg

        self.widget = pg.PlotWidget()
        self.widget.setMinimumHeight(170)
        self.widget.setLabel("bottom", "epoch")
        self.widget.setLabel("left", "loss")
        self.widget.showGrid(x=True, y=True, alpha=0.25)
        self.widget.addLegend(offset=(-10, 10))
        self._curves: dict[str, Any] = {}
        self._points: dict[str, tuple[list[float], list[float]]] = {}
        self._stage_colours: dict[str, str] = {}

    def clear(self) -> None:
        self.widget.clear()
        self._curves.clear()
        self._points.clear()
        self._stage_colours.clear()

    def add_point(self, stage: str, kind: str, x: float, y: float) -> None:
        """Append to the curve of ``kind`` ("batch", "train" or "val") for ``stage``."""
        key = f"{stage} {kind}"
        if key not in self._curves:
            self._curves[key] = self._new_curve(stage, kind)
            self._points[key] = ([], [])
        xs, ys = self._points[key]
        xs.append(x)
        ys.append(y)
        self._curves[key].setData(xs, ys)

    def series(self) -> dict[str, tuple[list[float], list[float]]]:
        """The plotted points by curve name (for tests and figures)."""
        return {key: (list(xs), list(ys)) for key, (xs, ys) in self._points.items()}

    def _new_curve(self, stage: str, kind: str):
        import pyqtgraph as pg
        from qtpy.QtCore import Qt

        if stage not in self._stage_colours:
            self._stage_colours[stage] = _STAGE_COLOURS[
                len(self._stage_colours) % len(_STAGE_COLOURS)
            ]
        colour = self._stage_colours[stage]
        if kind == "batch":
            pen = pg.mkPen(colour, width=1)
            pen.setStyle(Qt.PenStyle.DotLine)
            return self.widget.plot(pen=pen, name=f"{stage} batch")
        if kind == "val":
            pen = pg.mkPen(colour, width=2, style=Qt.PenStyle.DashLine)
            return self.widget.plot(pen=pen, symbol="s", symbolSize=6, symbolBrush=colour,
                                    name=f"{stage} val")
        return self.widget.plot(pen=pg.mkPen(colour, width=2), symbol="o", symbolSize=6,
                                symbolBrush=colour, name=f"{stage} train")


class QuietProgressBar(QProgressBar):
    """A progress bar whose new value is painted with the next ordinary paint.

    ``QProgressBar.setValue`` repaints synchronously whenever its text changes ("batch 3 / 40"
    does at every batch). In a window that holds napari's OpenGL canvas such a repaint flushes
    the whole window and draws any pending canvas frame inside the job's signal handler: the
    main-thread stalls traced by ``benchmarks/bench_freezes.py --trace-stalls``, and the
    moment Xvfb's software OpenGL crashed. With updates switched off the value changes without
    painting; switching them on schedules an asynchronous paint.
    """

    def setValue(self, value: int) -> None:  # noqa: N802 (Qt's name)
        self.setUpdatesEnabled(False)
        try:
            super().setValue(value)
        finally:
            self.setUpdatesEnabled(True)


class ProgressPanel(QWidget):
    """Status line, epoch and batch progress bars and (optionally) the loss plot."""

    def __init__(self, *, epochs: bool = True, plot: bool = True, parent=None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.epoch_bar = QuietProgressBar()
        self.epoch_bar.setFormat("epoch %v / %m")
        self._show_epochs = epochs
        self._epoch_text: str | None = None  # the last epoch's summary, kept on screen
        self._message_stage: str | None = None  # stage of the event before, if a Message
        layout.addWidget(self.epoch_bar)
        self.batch_bar = QuietProgressBar()
        self.batch_bar.setFormat("batch %v / %m" if epochs else "%v / %m  (%p%)")
        layout.addWidget(self.batch_bar)
        self.loss_plot: LossPlot | None = None
        self._layout = layout
        if plot:  # pyqtgraph is imported in the background with torch (see _warmup)
            from ._warmup import when_ready

            when_ready(self._add_loss_plot)
        self.reset()

    def _add_loss_plot(self) -> None:
        self.loss_plot = LossPlot()
        self._layout.addWidget(self.loss_plot.widget)

    def reset(self) -> None:
        """Empty bars (hidden until a job says how long it is) and an empty plot."""
        for bar in (self.epoch_bar, self.batch_bar):
            bar.setRange(0, 1)
            bar.setValue(0)
            bar.setVisible(False)
        if self.loss_plot is not None:
            self.loss_plot.clear()

    def set_status(self, text: str) -> None:
        self.status.setText(text)

    def show_event(self, event: Any) -> None:
        """Update the bars, the plot and the status line from one core event."""
        if isinstance(event, Started):
            self._epoch_text = None
            self.epoch_bar.setVisible(self._show_epochs)
            self.batch_bar.setVisible(True)
            self.epoch_bar.setRange(0, max(event.total_epochs, 1))
            self.epoch_bar.setValue(0)
            self.batch_bar.setRange(0, max(event.batches_per_epoch, 1))
            self.batch_bar.setValue(0)
            if self._message_stage != event.stage:  # keep the stage's own opening line
                self.set_status(f"{event.stage}: started")
        elif isinstance(event, Batch):
            self.batch_bar.setRange(0, max(event.total, 1))
            self.batch_bar.setValue(min(event.index + 1, max(event.total, 1)))
            self.epoch_bar.setValue(min(event.epoch, self.epoch_bar.maximum()))
            if event.loss is not None and self.loss_plot is not None:
                x = event.epoch + (event.index + 1) / max(event.total, 1)
                self.loss_plot.add_point(event.stage, "batch", x, event.loss)
        elif isinstance(event, Epoch):
            self.epoch_bar.setValue(min(event.epoch + 1, self.epoch_bar.maximum()))
            if self.loss_plot is not None:
                self.loss_plot.add_point(event.stage, "train", event.epoch + 1, event.train_loss)
                if event.val_loss is not None:
                    self.loss_plot.add_point(event.stage, "val", event.epoch + 1, event.val_loss)
            self._epoch_text = epoch_summary(event)
            self.set_status(self._epoch_text)
        elif isinstance(event, CheckpointSaved):
            if self._epoch_text is None:
                self.set_status(f"{event.stage}: checkpoint saved: {event.path}")
            elif event.best:
                self.set_status(f"{self._epoch_text} · best so far, saved")
        elif isinstance(event, Message):
            self.set_status(f"{event.stage}: {event.text}")
        elif isinstance(event, Done):
            if event.stopped:
                self.set_status(f"{event.stage}: stopped; the checkpoint is saved, press the "
                                "button again to resume")
            else:
                self.set_status(f"{event.stage}: finished")
        self._message_stage = event.stage if isinstance(event, Message) else None


def epoch_summary(event: Epoch) -> str:
    parts = [f"{event.stage}: epoch {event.epoch + 1}, loss {event.train_loss:.4f}"]
    if event.val_loss is not None:
        parts.append(f"val loss {event.val_loss:.4f}")
    for name, shown in (("miou", "mIoU"), ("fwiou", "FwIoU"), ("dice", "Dice")):
        if name in event.metrics:
            parts.append(f"val {shown} {100 * event.metrics[name]:.1f}")
    return ", ".join(parts)


class ActivityProgress:
    """The job's progress as a bar in napari's activity dock (bottom right of the window).

    One bar per stage: a ``Started`` event opens it with the stage's whole length (epochs x
    batches), ``Batch`` events move it to the batch's absolute position, so a resumed job
    continues from where it stopped; ``close`` removes it when the job ends. napari's bar
    repaints the window synchronously on every change (a frozen window while the canvas
    draws), so it moves at most every UPDATE_INTERVAL_S.
    """

    def __init__(self, description: str):
        self.description = description
        self.bar = None
        self._per_epoch = 1
        self._shown_at = 0.0

    def show_event(self, event: Any) -> None:
        from napari.utils import progress

        if isinstance(event, Started):
            self.close()
            self._shown_at = 0.0  # the first batch moves the new bar at once
            self._per_epoch = max(event.batches_per_epoch, 1)
            total = max(event.total_epochs, 1) * self._per_epoch
            self.bar = progress(total=total, desc=f"{self.description}: {event.stage}")
        elif isinstance(event, Batch) and self.bar is not None:
            if event.total != self._per_epoch and event.epoch == 0:
                self._per_epoch = max(event.total, 1)
                self.bar.total = self._per_epoch
            position = min(event.epoch * self._per_epoch + event.index + 1, self.bar.total)
            now = time.monotonic()
            if position != self.bar.n and (now - self._shown_at >= UPDATE_INTERVAL_S
                                           or position == self.bar.total):
                self._shown_at = now
                self.bar.update(position - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
