"""Arguments checked at the boundary, run-directory names that cannot escape, and diverged
training that never leaves (or loads) a NaN model: real tiny training on the bundled patches."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_histo_wsss.cli import main
from napari_histo_wsss.cli.flags import non_negative_int, positive_float, positive_int
from napari_histo_wsss.core.config.presets import METHODS, PRESET_SCHEDULES, preset
from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
from napari_histo_wsss.core.data.datasets import write_palette_mask
from napari_histo_wsss.core.errors import CheckpointError, ConfigError
from napari_histo_wsss.core.events import StopToken
from napari_histo_wsss.core.hisynseg.discriminator import train_discriminator
from napari_histo_wsss.core.hisynseg.synthesis import SyntheticPool
from napari_histo_wsss.core.pipeline import prepare_run
from napari_histo_wsss.core.runs.checkpoints import load_checkpoint, save_checkpoint
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage1.train_classifier import train_classifier
from napari_histo_wsss.core.stage2.train_segmenter import train_segmenter

CPU = torch.device("cpu")
#: An lr and weight decay no float32 weight survives: one step makes the weights infinite while
#: the loss of that step is still finite, so only a check of the weights can catch it. (Each
#: stays below float32's largest value times the recipes' lr multipliers, which torch refuses.)
ABSURD = {"lr": 1e37, "weight_decay": 1e37}


@pytest.fixture(scope="module")
def layout(sample_layout):
    return sample_layout


@pytest.fixture(scope="module")
def patches(sample_patches):
    return sample_patches


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error and error.count("\n") == 0, error
    return error


# --------------------------------------------------------------------------------------------
# Numbers on the command line: argparse refuses them (exit 2, one usage line naming the flag)


@pytest.mark.parametrize("argv, flag", [
    (["train-classifier", "D", "--method", "mlps", "--out", "R", "--batch-size", "0"],
     "--batch-size"),
    (["train-classifier", "D", "--method", "mlps", "--out", "R", "--epochs-cls", "0"],
     "--epochs-cls"),
    (["train-classifier", "D", "--method", "mlps", "--out", "R", "--epochs-cls", "-3"],
     "--epochs-cls"),
    (["pipeline", "D", "--method", "mlps", "--out", "R", "--epochs-seg", "0"], "--epochs-seg"),
    (["pipeline", "D", "--method", "mlps", "--out", "R", "--mpp", "0"], "--mpp"),
    (["pipeline", "D", "--method", "mlps", "--out", "R", "--seed", "-1"], "--seed"),
    (["pipeline", "D", "--method", "mlps", "--out", "R", "--classes", "a,b",
      "--background", "-1"], "--background"),
    (["train-segmenter", "R", "--batch-size", "-2"], "--batch-size"),
    (["train-segmenter", "R", "--epochs-seg", "two"], "--epochs-seg"),
    (["segment-slide", "R", "S", "--out", "O", "--tile", "0"], "--tile"),
    (["segment-slide", "R", "S", "--out", "O", "--halo", "-1"], "--halo"),
    (["segment-slide", "R", "S", "--out", "O", "--level", "-1"], "--level"),
    (["segment-slide", "R", "S", "--out", "O", "--mpp", "nan"], "--mpp"),
    (["segment-slide", "R", "S", "--out", "O", "--batch-size", "0"], "--batch-size"),
])
def test_cli_refuses_impossible_numbers(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in last and "expected" in last


def test_cli_number_types_accept_the_valid_range():
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    assert positive_float("0.25") == 0.25
    for parse, text in ((positive_int, "0"), (non_negative_int, "-1"), (positive_float, "inf"),
                        (positive_float, "-0.5"), (positive_int, "1.5")):
        with pytest.raises(Exception, match="expected"):
            parse(text)


# --------------------------------------------------------------------------------------------
# The same numbers through the library: one ConfigError before anything is written


def test_every_preset_passes_its_own_validation():
    for method in METHODS.names():
        for schedule in PRESET_SCHEDULES.names():
            preset(method, schedule, num_patches=42).validate()


@pytest.mark.parametrize("section, setting, value", [
    ("classifier", "epochs", 0), ("classifier", "epochs", -3),
    ("classifier", "batch_size", 0), ("classifier", "lr", math.nan),
    ("segmenter", "batch_size", 0), ("segmenter", "input_size", -64),
    ("segmenter", "lr", -0.01), ("segmenter", "mosaic", 1.5),
])
def test_prepare_run_refuses_bad_settings_before_creating_the_run(
        tmp_path, sample_dataset_dir, section, setting, value):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=f"{section}.{setting} must be"):
        prepare_run(sample_dataset_dir, out, "mlps", **{section: {setting: value}})
    assert not out.exists()


def test_prepare_run_refuses_a_negative_seed(tmp_path, sample_dataset_dir):
    with pytest.raises(ConfigError, match="run.seed must be"):
        prepare_run(sample_dataset_dir, tmp_path / "run", "mlps", seed=-1)


def test_training_a_classifier_for_negative_epochs_is_refused(tmp_path, patches):
    """Once accepted: status said "steps -6, complete" for a classifier that never trained."""
    config = preset("mlps", "fast", num_patches=len(patches))
    config.dataset = patches.spec.to_dict()
    run = RunDirectory(tmp_path / "run")
    run.create(config)
    bad = dataclasses.replace(config, classifier=dataclasses.replace(config.classifier,
                                                                     epochs=-3))
    with pytest.raises(ConfigError, match="classifier.epochs must be a whole number of at "
                                          "least 1, not -3"):
        list(train_classifier(run, bad, patches, device=CPU))
    assert run.status() == {} and not run.classifier_dir.exists()


# --------------------------------------------------------------------------------------------
# Names that become folders cannot leave the run directory


@pytest.mark.parametrize("name", ["../../../x", "/tmp/elsewhere", "a/b", "..", ".hidden", "",
                                  "a\\b", "x" * 200])
def test_unsafe_strategy_names_are_refused(tmp_path, name):
    run = RunDirectory(tmp_path)
    with pytest.raises(ConfigError, match="cannot be a folder of the run"):
        run.segmenter_dir(name)
    with pytest.raises(ConfigError, match="cannot be a folder of the run"):
        run.pseudo_mask_dir(name)


def test_safe_names_keep_their_folders(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.segmenter_dir("onss-v2_1.b") == tmp_path / "segmenter" / "onss-v2_1.b"
    assert run.pseudo_mask_dir("layer-1") == tmp_path / "pseudo_masks" / "layer-1"


@pytest.mark.parametrize("outside", [False, True])
def test_train_segmenter_restart_never_deletes_outside_the_run(tmp_path, layout, capsys,
                                                               outside):
    """``--strategy /abs/path --restart`` once deleted model.pt, last.pt, ... in any folder."""
    victim = tmp_path / "victim"
    victim.mkdir()
    kept = ["last.pt", "model.pt", "losses.csv", "metrics.json", "class_gate.json",
            "class_offsets.json"]
    for name in kept:
        (victim / name).write_text(name)
    run = RunDirectory(tmp_path / "run")
    run.create(RunConfig(data_dir=str(layout.root), dataset=layout.spec.to_dict()))
    strategy = str(victim) if outside else "../../victim"
    status = main(["train-segmenter", str(run.root), "--strategy", strategy, "--restart",
                   "--device", "cpu"])
    assert status == 2
    assert "cannot be a folder of the run" in _one_line_error(capsys)
    assert sorted(p.name for p in victim.iterdir()) == sorted(kept)
    assert (victim / "model.pt").read_text() == "model.pt"


# --------------------------------------------------------------------------------------------
# Diverged training: stopped with the likely cause, nothing NaN saved or marked complete


def test_a_diverged_classifier_is_never_saved_nor_marked_complete(tmp_path, patches):
    """One step per epoch at an absurd lr: the step's loss is finite, the weights are not.
    Today's loss check alone saved that model and marked the stage complete."""
    config = preset("mlps", "fast", num_patches=len(patches))
    config.dataset = patches.spec.to_dict()
    config.classifier = dataclasses.replace(config.classifier, epochs=1, **ABSURD,
                                            batch_size=len(patches), input_size=32)
    run = RunDirectory(tmp_path / "run")
    run.create(config)
    with pytest.raises(ConfigError, match="became NaN or infinite at epoch 1: lower the "
                                          "learning rate"):
        list(train_classifier(run, config, patches, device=CPU))
    assert not run.classifier_checkpoint.exists()
    assert not (run.classifier_dir / "last.pt").exists()
    assert not run.is_complete("classifier")


def _segmenter_run(root, patches, layout, **settings) -> tuple[RunDirectory, RunConfig]:
    """A segmenter on 14 real patches (one batch of 14 by default), label-band pseudo-masks."""
    settings = {"batch_size": 14, **settings}
    segmenter = SegmenterConfig(arch="pspnet", encoder_depth=3, loss="ce", epochs=1,
                                input_size=32, **settings)
    config = RunConfig(dataset=layout.spec.to_dict(), data_dir=str(layout.root),
                       segmenter=segmenter)
    run = RunDirectory(root)
    run.create(config)
    for index, path in enumerate(patches.paths):
        image, label = patches.image(index), patches.labels[index]
        classes = np.flatnonzero(label)
        rows = classes[np.arange(image.shape[0]) * len(classes) // image.shape[0]]
        mask = np.repeat(rows[:, None], image.shape[1], axis=1).astype(np.uint8)
        write_palette_mask(run.pseudo_mask_dir("final") / path.name, mask, layout.spec)
    return run, config


@pytest.fixture(scope="module")
def fourteen(patches):
    return patches.subset(range(0, len(patches), 3))


def test_a_diverging_segmenter_keeps_its_last_good_checkpoints(tmp_path, fourteen, layout):
    """Resumed at an absurd lr (two steps an epoch): the second step's loss is not finite;
    the first epoch's checkpoints stay as they were and the stage is no longer complete."""
    run, config = _segmenter_run(tmp_path / "run", fourteen, layout, batch_size=7)
    list(train_segmenter(run, config, fourteen, device=CPU))
    folder = run.segmenter_dir("ce")
    good = {name: (folder / name).read_bytes() for name in ("model.pt", "last.pt")}
    assert run.is_complete("segmenter:ce")

    diverging = dataclasses.replace(config, segmenter=dataclasses.replace(
        config.segmenter, epochs=2, **ABSURD))
    with pytest.raises(ConfigError, match="at epoch 2: lower the learning rate or raise the "
                                          "batch size"):
        list(train_segmenter(run, diverging, fourteen, device=CPU))
    assert {name: (folder / name).read_bytes() for name in good} == good
    assert not run.is_complete("segmenter:ce")
    assert load_checkpoint(folder / "last.pt")["training"]["epoch"] == 1


def test_a_diverging_discriminator_stops_with_the_likely_cause(patches):
    """The HisynSeg filter (in memory, Adam) stops like the others: Adam's first step moves
    each weight by about the lr, so the second step's loss is the one that is not finite."""
    images = [patches.image(i) for i in range(8)]
    pool = SyntheticPool(np.stack([np.ascontiguousarray(image[:32, :32]) for image in images]),
                         np.zeros((8, 32, 32), np.uint8))
    job = train_discriminator(images, pool, arch="resnet10t", epochs=1, batch_size=4,
                              device=CPU, rng=np.random.default_rng(0), stop=StopToken(),
                              stage="test", lr=3e37)  # Adam: a step of ~3 lr
    with pytest.raises(ConfigError, match="discriminator loss became .*learning rate"):
        list(job)


# --------------------------------------------------------------------------------------------
# NaN checkpoints: never written, never loaded


def _payload_weights() -> dict[str, torch.Tensor]:
    return {"head.weight": torch.tensor([[1.0, math.nan]]), "head.bias": torch.zeros(1)}


def test_saving_nan_weights_is_refused_and_the_old_file_kept(tmp_path, layout):
    path = tmp_path / "model.pt"
    save_checkpoint(path, kind="segmenter", state_dict={"head.weight": torch.ones(1, 2)},
                    config={}, spec=layout.spec)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="'head.weight' is NaN or infinite"):
        save_checkpoint(path, kind="segmenter", state_dict=_payload_weights(), config={},
                        spec=layout.spec)
    assert path.read_bytes() == before


def test_a_checkpoint_with_nan_weights_is_refused_on_the_command_line(
        tmp_path, fourteen, layout, capsys):
    """A NaN model written by an older version: ``evaluate`` (like pseudo-masks, predict
    and slides, which load through the same function) refuses it in one line."""
    run, _ = _segmenter_run(tmp_path / "run", fourteen, layout)
    path = run.segmenter_checkpoint("ce")
    path.parent.mkdir(parents=True)
    torch.save({"kind": "segmenter", "state_dict": _payload_weights(), "config": {},
                "dataset": layout.spec.to_dict()}, path)
    status = main(["evaluate", str(run.root), str(layout.root / "val" / "img"),
                   str(layout.root / "val" / "mask"), "--device", "cpu"])
    assert status == 2
    error = _one_line_error(capsys)
    assert str(path) in error and "'head.weight' is NaN or infinite" in error


def _classifier_run(tmp_path, patches, **settings) -> tuple[RunDirectory, RunConfig]:
    config = preset("mlps", "fast", num_patches=len(patches))
    config.dataset = patches.spec.to_dict()
    config.classifier = dataclasses.replace(config.classifier, batch_size=8, input_size=32,
                                            **settings)
    run = RunDirectory(tmp_path / "run")
    run.create(config)
    return run, config


def test_a_finite_loss_explosion_stops_training(tmp_path, patches):
    """lr 200: the loss goes 0.9 -> 4.7e7 -> 5e16 ... and only turns NaN steps later; the
    first step past 1000 times the early loss stops it, nothing is saved."""
    run, config = _classifier_run(tmp_path, patches, epochs=1, lr=200.0)
    with pytest.raises(ConfigError, match=r"grew to .* over 1000 times its early value .*: "
                                          "lower the learning rate"):
        list(train_classifier(run, config, patches, device=CPU))
    assert not run.classifier_checkpoint.exists()
    assert not run.is_complete("classifier")


def test_a_noisy_but_healthy_loss_is_not_taken_for_divergence(tmp_path, patches):
    """The same crops at lr 0.01 swing up to ~55 times the first loss: training goes on."""
    run, config = _classifier_run(tmp_path, patches, epochs=3, lr=0.01)
    list(train_classifier(run, config, patches, device=CPU))
    assert run.is_complete("classifier")


# --------------------------------------------------------------------------------------------
# Val masks checked before the first stage; a broken last.pt names the way out (--restart)


def _break_mask(mask: Path, how: str) -> None:
    from PIL import Image

    if how == "truncated":
        mask.write_bytes(mask.read_bytes()[:100])
        return
    with Image.open(mask) as image:
        palette, size = image.getpalette(), image.size
    values = np.zeros(size[::-1], np.uint8)
    if how == "wrong size":
        values = values[: size[1] // 2]
    else:  # a value past the classes and the background
        values[0, 0] = 9
    broken = Image.fromarray(values, mode="P")
    broken.putpalette(palette)
    broken.save(mask)


@pytest.mark.parametrize("command", ["pipeline", "train-classifier"])
@pytest.mark.parametrize("how, problem", [("wrong size", "but its image"),
                                          ("out of range", "outside the classes"),
                                          ("truncated", "cannot read mask")])
def test_a_bad_val_mask_is_refused_before_the_first_stage(command, how, problem, tmp_path,
                                                          sample_dataset_dir, capsys):
    data = Path(shutil.copytree(sample_dataset_dir, tmp_path / "data"))
    mask = sorted((data / "val" / "mask").iterdir())[0]
    _break_mask(mask, how)
    run = tmp_path / "run"
    status = main([command, str(data), "--method", "mlps", "--out", str(run),
                   "--epochs-cls", "1", "--epochs-seg", "1", "--device", "cpu"]
                  if command == "pipeline" else
                  [command, str(data), "--method", "mlps", "--out", str(run), "--epochs-cls",
                   "1", "--device", "cpu"])
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(mask) in error and problem in error
    assert not (run / "classifier").exists()


def test_a_truncated_last_pt_names_restart_which_starts_the_stage_over(
        tmp_path, sample_dataset_dir, capsys):
    run = tmp_path / "run"
    last = run / "classifier" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 half of a checkpoint")
    argv = ["train-classifier", str(sample_dataset_dir), "--method", "mlps", "--out", str(run),
            "--epochs-cls", "1", "--batch-size", "21", "--device", "cpu"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(last) in error and "run again with --restart to start this stage over" in error
    assert main([*argv, "--restart"]) == 0
    assert RunDirectory(run).is_complete("classifier")
    assert load_checkpoint(last, kind="classifier")["training"]["finished"]
