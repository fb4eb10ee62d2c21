"""Config round-trips, presets, run directories, devices and safe checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch

from napari_histo_wsss.core.config.presets import (
    DEFAULT_METHOD,
    METHODS,
    PRESET_SCHEDULES,
    preset,
)
from napari_histo_wsss.core.config.run_config import RunConfig
from napari_histo_wsss.core.data.classes import BCSS_WSSS, WSSS4LUAD
from napari_histo_wsss.core.devices import resolve_device
from napari_histo_wsss.core.errors import CheckpointError, ConfigError
from napari_histo_wsss.core.inference.predict import TTA_MODES
from napari_histo_wsss.core.models.feature_modules import FEATURE_MODULES
from napari_histo_wsss.core.models.segmenter import ARCHITECTURES
from napari_histo_wsss.core.runs.checkpoints import (
    check_same_classes,
    checkpoint_spec,
    load_checkpoint,
    save_checkpoint,
)
from napari_histo_wsss.core.runs.run_dir import LossLog, RunDirectory
from napari_histo_wsss.core.stage1.cams import CAM_METHODS
from napari_histo_wsss.core.stage1.pseudo_masks import GATINGS
from napari_histo_wsss.core.stage2.losses import LOSSES, build_loss


@pytest.mark.parametrize("schedule", PRESET_SCHEDULES.names())
@pytest.mark.parametrize("method", METHODS.names())
def test_every_preset_is_valid_and_round_trips_through_json(tmp_path, method, schedule):
    config = preset(method, schedule=schedule, num_patches=42)
    assert (config.method, config.schedule) == (method, schedule)
    # Every name in the recipe is one its registry knows.
    assert config.segmenter.arch in ARCHITECTURES and config.segmenter.loss in LOSSES
    assert config.segmenter.tta in TTA_MODES
    assert config.pseudo_masks.cam_method in CAM_METHODS
    assert config.pseudo_masks.gating in GATINGS
    assert all(module in FEATURE_MODULES for module in config.classifier.train_modules)
    assert build_loss(config.segmenter).name == config.segmenter.loss
    assert config.segmenter.epochs > 0
    config.save(tmp_path / "run.json")
    assert RunConfig.load(tmp_path / "run.json") == config


def test_paper_schedule_is_the_registered_paper_epochs():
    for name, method in METHODS.items():
        config = preset(name, "paper")
        assert (config.classifier.epochs, config.segmenter.epochs) == (
            method.classifier_epochs, method.segmenter_epochs)
    with pytest.raises(ConfigError,
                       match="unknown schedule 'slow': choose one of fast, long, paper"):
        preset("mlps", "slow")


def test_long_schedule_trains_longer_than_fast_but_never_beyond_the_paper():
    for name in METHODS.names():
        fast, long, paper = (preset(name, schedule, num_patches=557)
                             for schedule in ("fast", "long", "paper"))
        stages = ("classifier", "segmenter") if METHODS.get(name).has_classifier else (
            "segmenter",)
        for stage in stages:
            epochs = [getattr(config, stage).epochs for config in (fast, long, paper)]
            assert epochs[0] <= epochs[1] <= epochs[2], (name, stage, epochs)
        assert long.segmenter.epochs > fast.segmenter.epochs
    # The recommended recipe's 224-px crops with context get 9 epochs on 557 patches, and its
    # classifier twice the images of the other presets'.
    recommended = preset(DEFAULT_METHOD, "fast", num_patches=557)
    assert recommended.segmenter.epochs == 9
    assert recommended.classifier.epochs == 2 * preset("esfan", "fast", num_patches=557
                                                       ).classifier.epochs


def test_the_default_method_is_the_recommended_recipe():
    config = preset(DEFAULT_METHOD)
    assert DEFAULT_METHOD == "recommended" and config.method == "recommended"
    segmenter = config.segmenter
    assert (segmenter.arch, segmenter.loss, segmenter.augment) == ("deeplabv3plus", "ce",
                                                                   "histo")
    assert segmenter.weight_average and segmenter.tta == "none"
    masks = config.pseudo_masks
    assert masks.scales == (1.0, 2.0) and masks.scale_fusion == "mean"
    for schedule in ("fast", "long", "paper"):
        assert preset("esfan", schedule).classifier.candidates == 1
        assert preset(DEFAULT_METHOD, schedule).classifier.candidates == 2
    # The narrower decoder pays for the second classifier on fast; long and paper have the
    # time for the wide one. The companion keeps ESFAN's own PSPNet width.
    assert segmenter.decoder_channels == 128
    assert segmenter.companion_settings().decoder_channels is None
    for schedule in ("long", "paper"):
        assert preset(DEFAULT_METHOD, schedule).segmenter.decoder_channels is None
    assert preset("mlps", "fast").segmenter.decoder_channels is None


def test_fast_schedule_keeps_the_recipe_shape():
    paper = preset("mlps", "paper")
    fast = preset("mlps", "fast", num_patches=557)
    assert fast.classifier.epochs < paper.classifier.epochs
    assert 0 < fast.classifier.pda_start_epoch < fast.classifier.epochs
    # Gamma after the fast schedule's epochs equals gamma after the paper's 20 epochs.
    assert fast.classifier.pda_gamma_decay ** fast.classifier.epochs == pytest.approx(
        paper.classifier.pda_gamma_decay ** paper.classifier.epochs
    )
    assert fast.pseudo_masks == paper.pseudo_masks
    assert fast.segmenter.input_size is None  # the patches' own side


def test_fast_schedule_keeps_the_crop_side_of_a_recipe_with_context():
    recommended = preset(DEFAULT_METHOD, "fast", num_patches=557)
    assert recommended.pseudo_masks.fuse_overlaps
    assert (recommended.segmenter.context, recommended.segmenter.input_size) == (80, 224)


def test_unknown_method_and_settings_are_clear():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        preset("nope")
    data = preset("mlps").to_dict()
    data["classifier"]["bogus"] = 1
    with pytest.raises(ConfigError, match="unknown setting 'bogus'"):
        RunConfig.from_dict(data)


def test_run_directory_status(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.create(preset("esfan"))
    assert run.exists() and run.config().method == "esfan"
    assert not run.is_complete("classifier")
    run.mark_complete("classifier", epochs=3)
    assert run.is_complete("classifier")
    run.mark_incomplete("classifier")
    assert not run.is_complete("classifier")
    with pytest.raises(ConfigError, match="not a run directory"):
        RunDirectory(tmp_path / "empty").config()


def test_loss_log_appends(tmp_path):
    log = LossLog(tmp_path / "losses.csv", ["epoch", "loss"])
    log.append(epoch=0, loss=1.5)
    LossLog(tmp_path / "losses.csv", ["epoch", "loss"]).append(epoch=1, loss=1.0)
    assert [row["loss"] for row in log.rows()] == ["1.5", "1.0"]


def test_checkpoint_round_trip_and_checks(tmp_path):
    state = {"weight": torch.arange(6.0).reshape(2, 3)}
    path = save_checkpoint(
        tmp_path / "model.pt", kind="classifier", state_dict=state,
        config=preset("mlps").to_dict(), spec=WSSS4LUAD, training={"epoch": 2},
    )
    payload = load_checkpoint(path, kind="classifier")
    assert torch.equal(payload["state_dict"]["weight"], state["weight"])
    assert checkpoint_spec(payload) == WSSS4LUAD
    check_same_classes(payload, WSSS4LUAD, path)
    with pytest.raises(CheckpointError, match="trained on classes"):
        check_same_classes(payload, BCSS_WSSS, path)
    with pytest.raises(CheckpointError, match="holds a classifier model"):
        load_checkpoint(path, kind="segmenter")


class ArbitraryObject:
    """Anything that is not a tensor or plain value must not be unpickled from a checkpoint."""


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "classifier", "state_dict": {}, "x": ArbitraryObject()}, path,
               pickle_module=pickle)
    with pytest.raises(CheckpointError, match="evil.pt: holds Python objects") as refused:
        load_checkpoint(path)
    assert "weights_only" not in str(refused.value)  # no advice to run the file's code
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_device_resolution(monkeypatch):
    monkeypatch.delenv("HISTO_WSSS_DEVICE", raising=False)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")
    monkeypatch.setenv("HISTO_WSSS_DEVICE", "cpu")
    assert resolve_device("cuda").type == "cpu"
