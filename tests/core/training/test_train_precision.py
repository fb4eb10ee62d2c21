"""Training precision: bf16 autocast in the trainers where the CPU has bf16 kernels, recorded
in run.json, with one line saying what ran (or why it fell back to fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from napari_histo_wsss.core.devices import (
    cpu_has_bf16_instructions,
    cpu_has_native_bf16,
    training_autocast,
)
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.events import Done, Message, StopToken
from napari_histo_wsss.core.pipeline import prepare_run
from napari_histo_wsss.core.stage1.train_classifier import train_classifier

CPU = torch.device("cpu")
TINY = {"epochs": 1, "batch_size": 8, "input_size": 64}


def test_a_tiny_classifier_trains_in_bf16_and_run_json_says_so(sample_dataset_dir, tmp_path):
    run, config, layout = prepare_run(sample_dataset_dir, tmp_path / "run", "cam-ce",
                                      device="cpu", train_precision="bf16", classifier=TINY)
    assert json.loads(run.config_path.read_text())["train_precision"] == "bf16"
    conv_outputs: list[torch.dtype] = []

    def record_conv_dtype(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and torch.is_grad_enabled():
            conv_outputs.append(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record_conv_dtype)
    try:
        events = list(train_classifier(run, config, layout.patches(), device=CPU,
                                       stop=StopToken()))
    finally:
        hook.remove()
    assert isinstance(events[-1], Done) and not events[-1].stopped
    notes = [event.text for event in events if isinstance(event, Message)]
    if cpu_has_native_bf16():
        note = next(note for note in notes
                    if note.startswith("training with bf16 autocast on the CPU"))
        assert ("emulated" in note) == (not cpu_has_bf16_instructions())
        assert conv_outputs and set(conv_outputs) == {torch.bfloat16}
    else:
        assert any("no bf16 kernels: training in fp32" in note for note in notes)
        assert conv_outputs and set(conv_outputs) == {torch.float32}
    weights = torch.load(run.classifier_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.isfinite(value).all() for value in weights.values()
               if value.is_floating_point())


def test_the_default_trains_in_fp32_on_the_cpu_and_unknown_precisions_are_refused():
    assert training_autocast(CPU, "auto") == (None, "")
    assert training_autocast(CPU, "fp32") == (None, "")
    with pytest.raises(ConfigError, match="unknown training precision 'fp16'"):
        training_autocast(CPU, "fp16")


def test_a_run_json_with_an_unknown_precision_is_refused(sample_dataset_dir, tmp_path):
    with pytest.raises(ConfigError, match="run.train_precision must be one of auto, fp32, "
                                          "bf16, not 'half'"):
        prepare_run(sample_dataset_dir, tmp_path / "run", "cam-ce", train_precision="half")
