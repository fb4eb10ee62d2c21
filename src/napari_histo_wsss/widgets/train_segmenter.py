"""Train segmenter widget: stage 2 with one or several noise-suppression strategies.

Each selected strategy trains its own segmenter on the same pseudo-masks, one after another
(``segmenter/<strategy>/`` in the run folder), so the Compare widget can put them side by side.
The job is the core pipeline: stages that are not done yet (classifier, pseudo-masks) run
first, finished ones are skipped, a stopped one resumes; at the end every strategy is scored on
the validation images. A new run needs a dataset and a method; an existing run keeps its own.
Selected strategies that are finished can be trained longer with "more epochs"
(core/training/extension.py).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, FileEdit, FloatSpinBox, LineEdit, Select, SpinBox

from . import _warmup as warmup
from ._base import JobWidget, device_field, info_label, run_folder_field, set_info
from ._jobs import JobState
from ._runs import describe_dataset, describe_run, given_path
from ._shared_run import shared_run_folder
from ._tooltips import TOOLTIPS
from .train_classifier import PRESET_TEXT, more_epochs_field, preset_spin_box, start_text

if TYPE_CHECKING:
    import napari

HISYNSEG = "hisynseg"
LOSSES_MODULE = "napari_histo_wsss.core.stage2.losses"
SEGMENTER_MODULE = "napari_histo_wsss.core.models.segmenter"


def strategy_names() -> list[str]:
    """The noise-suppression losses for pseudo-masks (HisynSeg trains from synthetic images);
    empty until torch is imported in the background (``_warmup``)."""
    if not warmup.ready_without_waiting(LOSSES_MODULE):
        return []
    from ..core.stage2.losses import LOSSES

    return [name for name in LOSSES.names() if name != HISYNSEG]


def architecture_choices(*_) -> list[str]:
    """"preset" and the registered architectures (those once torch is imported)."""
    if not warmup.ready_without_waiting(SEGMENTER_MODULE):
        return ["preset"]
    from ..core.models.segmenter import ARCHITECTURES

    return ["preset", *ARCHITECTURES.names()]


class TrainSegmenterWidget(JobWidget):
    """Stage 2 of the pipeline in a dock widget: segmenters trained on a run's pseudo-masks."""

    settings_key = "train_segmenter"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer, "Train segmenter")
        from ..core.config.presets import DEFAULT_METHOD, METHODS, PRESET_SCHEDULES

        self.run_folder = run_folder_field()
        self.run_info = info_label()
        self.dataset = FileEdit(mode="d", label="dataset (new run)", nullable=True,
                                tooltip=TOOLTIPS["dataset"])
        self.method = ComboBox(label="method (new run)", choices=METHODS.names(),
                               value=DEFAULT_METHOD, tooltip=TOOLTIPS["method"])
        self.strategies = Select(label="strategies", choices=self._strategy_choices,
                                 tooltip=TOOLTIPS["strategies"])
        self.strategies.native.setMaximumHeight(110)
        self.encoder = LineEdit(label="encoder", value="", tooltip=TOOLTIPS["encoder"])
        self.encoder.native.setPlaceholderText(PRESET_TEXT)
        self.weights = FileEdit(mode="r", label="weights file", nullable=True,
                                filter="*.pt *.pth *.bin *.safetensors *.npz",
                                tooltip=TOOLTIPS["weights"])
        self.device = device_field()
        self.epochs = preset_spin_box("epochs", TOOLTIPS["segmenter_epochs"], 1000)
        self.more_epochs = more_epochs_field()
        self.batch_size = preset_spin_box("batch size", TOOLTIPS["batch_size"], 512)
        self.schedule = ComboBox(label="schedule", choices=PRESET_SCHEDULES.names(), value="fast",
                                 tooltip=TOOLTIPS["schedule"])
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0, tooltip=TOOLTIPS["seed"])
        self.arch = ComboBox(label="architecture", choices=architecture_choices,
                             value="preset", tooltip=TOOLTIPS["arch"])
        self.lr = FloatSpinBox(label="learning rate", min=0.0, max=1.0, step=0.001, value=0.0,
                               tooltip=TOOLTIPS["lr"])
        self.lr.native.setDecimals(5)
        self.lr.native.setSpecialValueText(PRESET_TEXT)
        self.input_size = preset_spin_box("input size", TOOLTIPS["input_size"], 2048, step=32)

        self.extend([self.run_folder, self.run_info, self.dataset, self.method, self.strategies,
                     self.encoder, self.weights, self.device, self.epochs, self.more_epochs,
                     self.batch_size])
        self.advanced.extend([self.schedule, self.seed, self.arch, self.lr, self.input_size])
        self.finish_layout()
        self.remember(run_folder=self.run_folder, dataset=self.dataset, method=self.method,
                      strategies=self.strategies, encoder=self.encoder, weights=self.weights,
                      device=self.device, epochs=self.epochs,
                      batch_size=self.batch_size, schedule=self.schedule, seed=self.seed,
                      arch=self.arch, lr=self.lr, input_size=self.input_size)
        self.run_folder.changed.connect(self._show_run)
        self.dataset.changed.connect(self._show_run)
        self.method.changed.connect(self._show_run)
        self._locked.append(self.more_epochs)
        self.strategies.changed.connect(self._offer_more_epochs)
        self.more_epochs.changed.connect(self._show_start_text)
        self.restore_settings()
        shared_run_folder(viewer).follow(self.run_folder)
        self._show_run()

    def _show_run(self, *_: Any) -> None:
        """Describe the run; an existing run fixes the dataset, method and strategy choices."""
        from ..core.errors import HistoWsssError
        from ..core.runs.run_dir import RunDirectory

        folder = given_path(self.run_folder.value)
        existing = None
        try:
            if folder is not None and RunDirectory(folder).exists():
                existing = RunDirectory(folder).config()
                busy = " · training now" if self.runner.busy else ""
                set_info(self.run_info, describe_run(folder) + busy)
            elif given_path(self.dataset.value) is not None:
                set_info(self.run_info, "new run · " + describe_dataset(self.dataset.value))
            else:
                set_info(self.run_info, describe_run(folder) + "; a new run needs a dataset")
        except HistoWsssError as error:
            set_info(self.run_info, str(error), error=True)
        new_run = existing is None
        for field in (self.dataset, self.method, self.schedule, self.seed):
            field.enabled = new_run and not self.runner.busy
        if existing is not None:
            self.method.value = existing.method
            self.schedule.value = existing.schedule
            self.seed.value = existing.seed
        previous = list(self.strategies.value)
        self.strategies.reset_choices()
        choices = list(self.strategies.choices)
        selected = [name for name in previous if name in choices]
        if existing is not None and not selected:
            selected = [HISYNSEG if existing.method == HISYNSEG else existing.segmenter.loss]
        self.strategies.value = [name for name in selected if name in choices] or choices[:1]
        self._offer_more_epochs()

    def _offer_more_epochs(self, *_: Any) -> None:
        """"More epochs" only when every selected strategy is a finished one."""
        from ..core.runs.run_dir import RunDirectory
        from ..core.runs.stages import segmenter_stage

        folder = given_path(self.run_folder.value)
        run = RunDirectory(folder) if folder is not None else None
        selected = list(self.strategies.value)
        finished = run is not None and run.exists() and bool(selected) and \
            self.method.value != HISYNSEG and \
            all(run.is_complete(segmenter_stage(name)) for name in selected)
        self.more_epochs.enabled = finished and not self.runner.busy
        if not finished:
            self.more_epochs.value = 0

    def _show_start_text(self, *_: Any) -> None:
        self.start_text = start_text(self.more_epochs.value)
        if not self.runner.busy:
            self.toggle_button.setText(self.start_text)

    def on_models_ready(self) -> None:
        self._show_run()

    def _strategy_choices(self, *_: Any) -> list[str]:
        """HisynSeg runs have one strategy; CAM methods every pseudo-mask loss."""
        method = self.method.value if hasattr(self, "method") else None
        return [HISYNSEG] if method == HISYNSEG else strategy_names()

    def build_job(self):
        from ..core.errors import ConfigError
        from ..core.runs.run_dir import RunDirectory

        out = given_path(self.run_folder.value)
        if out is None:
            raise ConfigError("choose a run folder")
        strategies = list(self.strategies.value)
        if not strategies:
            raise ConfigError("select at least one strategy")
        existing = RunDirectory(out).config() if RunDirectory(out).exists() else None
        data_dir = existing.data_dir if existing is not None else given_path(self.dataset.value)
        if data_dir is None:
            raise ConfigError("a new run needs a dataset folder")
        overrides = {"encoder": self.encoder.value.strip() or None,
                     "weights": str(self.weights.value) if given_path(self.weights.value)
                     else None,
                     "epochs": self.epochs.value or None,
                     "batch_size": self.batch_size.value or None,
                     "lr": self.lr.value or None,
                     "input_size": self.input_size.value or None,
                     "arch": None if self.arch.value == "preset" else self.arch.value}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        method = existing.method if existing is not None else self.method.value
        schedule, seed, device_name = self.schedule.value, self.seed.value, self.device.value
        more_epochs = self.more_epochs.value

        def make_job(stop):
            from ..core.pipeline import prepare_run, run_pipeline

            # A new run records the settings in run.json; an existing run keeps its own and
            # these apply to the strategies trained now (their checkpoints record them).
            run, config, layout = prepare_run(data_dir, out, method, schedule=schedule,
                                              seed=seed, device=device_name, segmenter=overrides)
            config = dataclasses.replace(
                config, device=device_name,
                segmenter=dataclasses.replace(config.segmenter, **overrides))
            yield from run_pipeline(run, config, layout, stop=stop,
                                    strategies=None if method == HISYNSEG else strategies,
                                    more_epochs=more_epochs)

        return make_job, device_name

    def on_job_starting(self) -> None:
        """"More epochs" apply once (a stop during them is resumed by a plain Train)."""
        self.more_epochs.value = 0

    def on_job_event(self, event: Any) -> None:
        from ..core.events import Done, Started

        if isinstance(event, Started):  # a new run exists now; a new strategy has started
            self._show_run()
        if isinstance(event, Done) and event.stage == "pipeline" and not event.stopped:
            scores = event.result.get("val", {})
            if scores:
                lines = [f"{name}: val mIoU {100 * result['miou']:.1f}"
                         for name, result in scores.items()]
                self.progress.set_status("finished · " + " · ".join(lines))

    def on_job_finished(self, state: JobState) -> None:
        self._show_run()
