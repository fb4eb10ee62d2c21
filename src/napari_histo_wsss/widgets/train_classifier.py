"""Train classifier widget: stage 1, the multi-label CAM classifier, as a stoppable job.

Pick a dataset (its classes are detected and shown at once, problems are shown under the
field), a method preset and a run folder, and press Train. Stop finishes the batch and saves
the model; pressing Train again on the same run folder continues from that checkpoint. An
existing run folder brings its own settings (shown, and locked): resuming with other settings
would mix two schedules, so the core refuses it. A finished classifier can be trained longer
with "more epochs" (core/training/extension.py); its pseudo-masks then need making again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, LineEdit, SpinBox

from ..core.config.presets import DEFAULT_METHOD, PRESET_SCHEDULES, methods_with_classifier
from ._base import JobWidget, device_field, info_label, run_folder_field, set_info
from ._jobs import JobState
from ._runs import describe_dataset, describe_run, given_path
from ._shared_run import shared_run_folder
from ._tooltips import TOOLTIPS

if TYPE_CHECKING:
    import napari

STAGE = "classifier"
#: Methods with a CAM classifier (HisynSeg trains its segmenter from synthetic images).
CAM_METHODS = methods_with_classifier()
#: Shown in numeric fields left at 0: the preset decides.
PRESET_TEXT = "preset"
#: Shown in the "more epochs" field left at 0: train or resume as usual.
NO_MORE_TEXT = "none"


class PresetSpinBox(FloatSpinBox):
    """A whole-number field whose 0 reads "preset" (the method's preset decides).

    magicgui's integer spin box (superqt's QLargeIntSpinBox) ignores Qt's special value text
    and would show "0", which reads as "no epochs"; Qt's double spin box honours it, so this
    is one with no decimals whose value is an int.
    """

    @property
    def value(self) -> int:
        return int(round(FloatSpinBox.value.fget(self)))

    @value.setter
    def value(self, value) -> None:
        FloatSpinBox.value.fset(self, float(value or 0))


def preset_spin_box(label: str, tooltip: str, maximum: int, step: int = 1,
                    special: str = PRESET_TEXT) -> PresetSpinBox:
    """A whole-number field whose 0 shows ``special``."""
    box = PresetSpinBox(label=label, min=0, max=maximum, step=step, value=0, tooltip=tooltip)
    box.native.setDecimals(0)
    box.native.setSpecialValueText(special)
    return box


def more_epochs_field() -> PresetSpinBox:
    """"More epochs" for a finished model (0: none); enabled only where there is one."""
    return preset_spin_box("more epochs", TOOLTIPS["more_epochs"], 1000, special=NO_MORE_TEXT)


def start_text(more_epochs: int) -> str:
    """The Train button's text: it says when it trains a finished model longer."""
    if not more_epochs:
        return JobWidget.start_text
    return f"Train {more_epochs} more epoch{'s' if more_epochs > 1 else ''}"


class TrainClassifierWidget(JobWidget):
    """Stage 1 of the pipeline in a dock widget: train (or resume) a run's CAM classifier."""

    settings_key = "train_classifier"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer, "Train classifier")
        from ..core.config.run_config import ClassifierConfig

        self.dataset = FileEdit(mode="d", label="dataset", tooltip=TOOLTIPS["dataset"])
        self.dataset_info = info_label()
        self.method = ComboBox(label="method", choices=CAM_METHODS, value=DEFAULT_METHOD,
                               tooltip=TOOLTIPS["method"])
        self.backbone = LineEdit(label="backbone", value=ClassifierConfig().backbone,
                                 tooltip=TOOLTIPS["backbone"])
        self.weights = FileEdit(mode="r", label="weights file", nullable=True,
                                filter="*.pt *.pth *.bin *.safetensors *.npz",
                                tooltip=TOOLTIPS["weights"])
        self.device = device_field()
        self.epochs = preset_spin_box("epochs", TOOLTIPS["epochs"], 1000)
        self.more_epochs = more_epochs_field()
        self.batch_size = preset_spin_box("batch size", TOOLTIPS["batch_size"], 512)
        self.run_folder = run_folder_field()
        self.run_info = info_label()
        self.schedule = ComboBox(label="schedule", choices=PRESET_SCHEDULES.names(), value="fast",
                                 tooltip=TOOLTIPS["schedule"])
        self.self_train = CheckBox(label="self-train", value=False,
                                   tooltip=TOOLTIPS["self_train"])
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0, tooltip=TOOLTIPS["seed"])
        self.lr = FloatSpinBox(label="learning rate", min=0.0, max=1.0, step=0.001, value=0.0,
                               tooltip=TOOLTIPS["lr"])
        self.lr.native.setDecimals(5)
        self.lr.native.setSpecialValueText(PRESET_TEXT)
        self.input_size = preset_spin_box("input size", TOOLTIPS["input_size"], 2048, step=32)
        self.candidates = preset_spin_box("classifiers", TOOLTIPS["candidates"], 8)

        self.extend([self.dataset, self.dataset_info, self.method, self.backbone, self.weights,
                     self.device, self.epochs, self.more_epochs, self.batch_size,
                     self.run_folder, self.run_info])
        self.advanced.extend([self.schedule, self.self_train, self.seed, self.lr,
                              self.input_size, self.candidates])
        self.finish_layout()
        self.remember(dataset=self.dataset, method=self.method, backbone=self.backbone,
                      weights=self.weights, device=self.device, epochs=self.epochs,
                      batch_size=self.batch_size, run_folder=self.run_folder,
                      schedule=self.schedule, self_train=self.self_train, seed=self.seed,
                      lr=self.lr, input_size=self.input_size, candidates=self.candidates)
        self._settings_fields = [self.method, self.backbone, self.weights, self.epochs,
                                 self.batch_size, self.schedule, self.self_train, self.seed,
                                 self.lr, self.input_size, self.candidates]
        self._locked.append(self.more_epochs)
        self.dataset.changed.connect(self._show_dataset)
        self.run_folder.changed.connect(self._show_run)
        self.more_epochs.changed.connect(self._show_start_text)
        self.restore_settings()
        shared_run_folder(viewer).follow(self.run_folder)
        self._show_dataset()
        self._show_run()

    # -- inline feedback ---------------------------------------------------------------------
    def _show_dataset(self, *_: Any) -> None:
        from ..core.errors import HistoWsssError

        folder = given_path(self.dataset.value)
        if folder is None:
            set_info(self.dataset_info, "choose a dataset folder")
            return
        try:
            set_info(self.dataset_info, describe_dataset(folder))
        except HistoWsssError as error:
            set_info(self.dataset_info, str(error), error=True)

    def _show_run(self, *_: Any) -> None:
        """Describe the run folder; an existing run's settings replace (and lock) the fields,
        its epochs trained so far included; a finished one may be trained longer."""
        from ..core.errors import HistoWsssError
        from ..core.runs.run_dir import RunDirectory
        from ..core.runs.status import StageState, run_status

        folder = given_path(self.run_folder.value)
        existing, finished = None, False
        try:
            busy = " · training now" if self.runner.busy else ""
            set_info(self.run_info, describe_run(folder) + busy)
            if folder is not None and RunDirectory(folder).exists():
                existing = RunDirectory(folder).config()
                finished = run_status(folder).classifier is StageState.DONE
        except HistoWsssError as error:
            set_info(self.run_info, str(error), error=True)
        if existing is not None and existing.method in CAM_METHODS:
            settings = existing.classifier
            self.method.value = existing.method
            self.backbone.value = settings.backbone
            self.weights.value = settings.weights if settings.weights not in (None, "none") \
                else None
            self.epochs.value = existing.stage_epochs(STAGE, settings.epochs)
            self.batch_size.value = settings.batch_size
            self.schedule.value = existing.schedule
            self.self_train.value = bool(existing.pseudo_masks.teacher)
            self.seed.value = existing.seed
            self.lr.value = settings.lr
            self.input_size.value = settings.input_size or 0
            self.candidates.value = settings.candidates
        self._lock_run_settings(existing is not None)
        self.more_epochs.enabled = finished and not self.runner.busy
        if not finished:
            self.more_epochs.value = 0

    def _lock_run_settings(self, locked: bool) -> None:
        for field in self._settings_fields:
            field.enabled = not locked and not self.runner.busy

    def _show_start_text(self, *_: Any) -> None:
        self.start_text = start_text(self.more_epochs.value)
        if not self.runner.busy:
            self.toggle_button.setText(self.start_text)

    # -- the job -------------------------------------------------------------------------------
    def build_job(self):
        from ..core.errors import ConfigError

        data_dir = given_path(self.dataset.value)
        out = given_path(self.run_folder.value)
        if data_dir is None:
            raise ConfigError("choose a dataset folder")
        if out is None:
            raise ConfigError("choose a run folder (a new or an existing one)")
        overrides = {"backbone": self.backbone.value.strip() or None,
                     "weights": str(self.weights.value) if given_path(self.weights.value)
                     else None,
                     "epochs": self.epochs.value or None,
                     "batch_size": self.batch_size.value or None,
                     "lr": self.lr.value or None,
                     "input_size": self.input_size.value or None,
                     "candidates": self.candidates.value or None}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        method, schedule, seed = self.method.value, self.schedule.value, self.seed.value
        self_train = self.self_train.value
        device_name, more_epochs = self.device.value, self.more_epochs.value

        def make_job(stop):
            from ..core.devices import resolve_device
            from ..core.events import Message
            from ..core.pipeline import prepare_run
            from ..core.stage1.train_classifier import train_classifier

            run, config, layout = prepare_run(
                data_dir, out, method, schedule=schedule, seed=seed, device=device_name,
                self_train=self_train, classifier=overrides)
            yield Message(STAGE, f"{layout.describe()}; run folder {run.root}")
            yield from train_classifier(run, config, layout.patches(),
                                        device=resolve_device(device_name), stop=stop,
                                        resume=True, more_epochs=more_epochs,
                                        val=layout.eval_set("val"))

        return make_job, device_name

    def on_job_starting(self) -> None:
        """Put the epochs already trained (a resumed run) on the loss plot; "more epochs"
        apply once (a stop during them is resumed by a plain Train)."""
        from ..core.runs.run_dir import LossLog, RunDirectory

        self.more_epochs.value = 0
        folder = given_path(self.run_folder.value)
        losses = RunDirectory(folder).classifier_dir / "losses.csv" if folder else None
        if losses is None or not losses.is_file() or self.progress.loss_plot is None:
            return
        for row in LossLog(losses, []).rows():
            self.progress.loss_plot.add_point(STAGE, "train", float(row["epoch"]),
                                              float(row["train_loss"]))

    def on_job_event(self, event: Any) -> None:
        from ..core.events import Started

        if isinstance(event, Started):  # the run folder exists now
            self._show_run()

    def on_job_finished(self, state: JobState) -> None:
        self._show_run()
