"""What every job widget shares: form fields, advanced settings, one Run/Stop button, progress.

A widget subclasses :class:`JobWidget`, adds its fields (plain magicgui widgets, with tooltips
from ``_tooltips``), lists the ones to remember between sessions, and implements
``build_job``, which reads the fields on the main thread and returns a job factory for the
worker. The base class wires the button to the :class:`JobRunner`, locks the fields while a
job runs, shows every event in the progress panel, and stops the job when the widget goes away.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox, Container, FileEdit, Label
from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QPushButton

from ._jobs import JobFactory, JobRunner, JobState
from ._progress import ActivityProgress, ProgressPanel
from ._settings import load_settings, save_settings
from ._tooltips import TOOLTIPS
from ._warmup import device_choices, when_ready


class JobWidget(Container):
    """Base of the dock widgets that run one core job at a time."""

    #: Section of the settings file for this widget.
    settings_key = ""
    start_text = "Train"
    stop_text = "Stop"

    def __init__(self, viewer, description: str, *, epochs: bool = True, plot: bool = True):
        super().__init__(labels=True)
        from qtpy.QtWidgets import QFrame, QScrollArea

        # napari docks ``native``: a scroll area, so that five docks fit a 1080-pixel screen
        # (each scrolls) instead of stretching the window to the sum of their heights.
        self._scroll_area = QScrollArea()
        self._scroll_area.setWidgetResizable(True)
        self._scroll_area.setFrameShape(QFrame.Shape.NoFrame)
        self._scroll_area.setWidget(self._widget._mgui_get_native_widget())
        self.viewer = viewer
        self.runner = JobRunner(description)
        self.runner.state_changed.connect(self._on_state_changed)
        self.runner.event.connect(self._on_job_event)
        self.advanced = Container(labels=True)
        self.toggle_button = QPushButton(self.start_text)
        self.toggle_button.clicked.connect(self.toggle)
        self.progress = ProgressPanel(epochs=epochs, plot=plot)
        self.activity = ActivityProgress(description)
        self._persisted: dict[str, Any] = {}
        self._locked: list[Any] = []
        self._runners = [self.runner]
        runners = self._runners  # not self: the callbacks must outlive the Qt widget
        # Closing the dock (napari takes the widget out of it) or the viewer (which deletes
        # it): stop the jobs the graceful way and stop reporting to the widget.
        activity = self.activity
        self._close_watcher = _CloseWatcher(self.native, lambda: _shut_down(runners, activity))
        self.native.destroyed.connect(lambda *_: _shut_down(runners, activity))

    @property
    def native(self):
        """The scroll area around the form (what napari puts in the dock)."""
        scroll_area = self.__dict__.get("_scroll_area")
        return scroll_area if scroll_area is not None else self._widget._mgui_get_native_widget()

    @property
    def form(self):
        """The widget holding the fields (inside the scroll area)."""
        return self._widget._mgui_get_native_widget()

    def add_runner(self, description: str) -> JobRunner:
        """Another job runner (browsing, exports) that also stops when the widget closes."""
        runner = JobRunner(description)
        self._runners.append(runner)
        return runner

    # -- layout ----------------------------------------------------------------------------------
    def finish_layout(self, *, below: tuple = ()) -> None:
        """Append the advanced section, the Run/Stop button, the progress panel and ``below``
        (Qt widgets such as result tables and export buttons).

        Call once, after every magicgui field is appended (raw Qt parts go last).
        """
        from superqt import QCollapsible

        layout = self.form.layout()
        if len(self.advanced):
            collapsible = QCollapsible("Advanced settings")
            collapsible.addWidget(self.advanced.native)
            collapsible.collapse(animate=False)
            layout.addWidget(collapsible)
        layout.addWidget(self.toggle_button)
        layout.addWidget(self.progress)
        for widget in below:
            layout.addWidget(widget)
        layout.addStretch(1)

    # -- settings between sessions ----------------------------------------------------------------
    def remember(self, **fields) -> None:
        """Persist these fields' values between sessions and lock them while a job runs."""
        self._persisted.update(fields)
        self._locked.extend(fields.values())

    def restore_settings(self) -> None:
        """Put back the values saved last time (values that no longer fit are skipped).

        Choices that need torch (devices, losses, architectures) arrive after a background
        import: their saved values are put back then, and ``on_models_ready`` runs.
        """
        self._apply_saved(self._persisted)
        for field in self._persisted.values():
            field.changed.connect(self.save_settings)
        when_ready(self._on_heavy_modules_ready)

    def _apply_saved(self, fields: dict[str, Any]) -> None:
        saved = load_settings(self.settings_key)
        for name, field in fields.items():
            if name not in saved or saved[name] is None:
                continue
            with contextlib.suppress(ValueError, TypeError, KeyError):
                if isinstance(field, ComboBox) and saved[name] not in field.choices:
                    continue
                field.value = saved[name]

    def _on_heavy_modules_ready(self) -> None:
        self.reset_choices()
        self.advanced.reset_choices()
        self._apply_saved({name: field for name, field in self._persisted.items()
                           if callable(getattr(field, "_default_choices", None))})
        self.on_models_ready()

    def on_models_ready(self) -> None:
        """Hook for subclasses: the lists that need torch are filled in."""

    def save_settings(self, *_: Any) -> None:
        values = {}
        for name, field in self._persisted.items():
            value = field.value
            values[name] = str(value) if isinstance(value, Path) else value
        save_settings(self.settings_key, values)

    # -- the job -----------------------------------------------------------------------------------
    def build_job(self) -> tuple[JobFactory, str | None]:
        """Read the fields (main thread) and return ``(make_job, device)`` for the worker."""
        raise NotImplementedError

    def toggle(self, *_: Any) -> None:
        """The Run/Stop button: start a job, or ask the running one to stop after its batch."""
        if self.runner.busy:
            self.runner.stop()
            return
        from napari.utils.notifications import show_error

        from ..core.errors import HistoWsssError

        try:
            make_job, device = self.build_job()
        except HistoWsssError as error:
            show_error(str(error))
            self.progress.set_status(str(error))
            return
        self.progress.reset()
        self.on_job_starting()
        self.runner.start(make_job, device)

    def on_job_starting(self) -> None:
        """Hook for subclasses: the job is about to start (the progress panel is reset)."""

    def on_job_event(self, event: Any) -> None:
        """Hook for subclasses: an event arrived (main thread); layers may be touched here."""

    def on_job_finished(self, state: JobState) -> None:
        """Hook for subclasses: the job ended with ``state`` (DONE, STOPPED or FAILED)."""

    def _on_job_event(self, event: Any) -> None:
        self.progress.show_event(event)
        self.activity.show_event(event)
        self.on_job_event(event)

    def _on_state_changed(self, state: JobState) -> None:
        running = state.busy
        for field in self._locked:
            field.enabled = not running
        if state is JobState.RUNNING:
            self.toggle_button.setText(self.stop_text)
            self.toggle_button.setEnabled(True)
        elif state is JobState.STOPPING:
            self.toggle_button.setText("Stopping after this batch...")
            self.toggle_button.setEnabled(False)
        else:
            self.toggle_button.setText(self.start_text)
            self.toggle_button.setEnabled(True)
            self.activity.close()
            if state is JobState.FAILED and self.runner.error:
                self.progress.set_status(f"failed: {self.runner.error}")
            self._notify_end(state)
            self.on_job_finished(state)

    def _notify_end(self, state: JobState) -> None:
        """A notification when a job ends, for a user looking elsewhere (a failure has its
        own error notification already)."""
        from napari.utils.notifications import show_info

        if state is JobState.DONE:
            show_info(f"{self.runner.description}: finished")
        elif state is JobState.STOPPED:
            show_info(f"{self.runner.description}: stopped; press "
                      f"'{self.start_text}' again to continue")


def _shut_down(runners: list[JobRunner], activity: ActivityProgress) -> None:
    for runner in runners:
        runner.shutdown()
    activity.close()


class _CloseWatcher(QObject):
    """Calls ``on_close`` when napari takes the widget out of its dock (the dock's close
    button leaves the widget alive but without a parent)."""

    def __init__(self, widget, on_close):
        super().__init__(widget)
        self._on_close = on_close
        widget.installEventFilter(self)

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.ParentChange and watched.parent() is None:
            self._on_close()
        return False


def device_field(label: str = "device") -> ComboBox:
    """A combo of the devices this machine has, "auto" first (filled in once torch is
    imported in the background, see ``_warmup``)."""
    return ComboBox(label=label, choices=device_choices, value="auto",
                    tooltip=TOOLTIPS["device"])


#: The precision field's choice that lets the engine decide (``precision=None`` in core).
ENGINE_DECIDES = "auto"


def engine_fields() -> tuple[ComboBox, ComboBox]:
    """The inference engine and precision of widgets that only predict (like the CLI's
    ``--engine`` / ``--precision``); the names come from a module that needs no torch."""
    from ..core.inference.engine_names import ENGINE_CHOICES, PRECISIONS

    engine = ComboBox(label="engine", choices=ENGINE_CHOICES, value="auto",
                      tooltip=TOOLTIPS["engine"])
    precision = ComboBox(label="precision", choices=(ENGINE_DECIDES, *PRECISIONS),
                         value=ENGINE_DECIDES, tooltip=TOOLTIPS["precision"])
    return engine, precision


def engine_options(engine: ComboBox, precision: ComboBox) -> dict[str, str | None]:
    """The fields' values as ``load_predictor``'s ``engine`` and ``precision`` arguments."""
    chosen = precision.value
    return {"engine": engine.value, "precision": None if chosen == ENGINE_DECIDES else chosen}


def engine_message(stage: str, engine: dict[str, str], about: str = ""):
    """A progress line naming the engine that runs (``Engine.record``), and why when
    ``auto`` chose it or a fallback happened."""
    from ..core.events import Message

    text = engine["note"] or f"engine {engine['name']} {engine['precision']}"
    return Message(stage, f"{about}: {text}" if about else text)


def run_folder_field() -> FileEdit:
    """The folder of a run (its run.json and everything it produced)."""
    return FileEdit(mode="d", label="run folder", tooltip=TOOLTIPS["run_folder"])


def moved_dataset_field() -> FileEdit:
    """The dataset's folder, for a run whose dataset is no longer where run.json says."""
    return FileEdit(mode="d", label="dataset (if moved)", nullable=True,
                    tooltip=TOOLTIPS["dataset"])


def info_label(text: str = "") -> Label:
    """A read-only line under a field (detected classes, run status, inline errors)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QSizePolicy

    label = Label(value=text)
    label.native.setWordWrap(True)
    label.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
    label.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
    return label


def set_info(label: Label, text: str, *, error: bool = False) -> None:
    label.value = text
    label.native.setStyleSheet("color: #e57373;" if error else "")
