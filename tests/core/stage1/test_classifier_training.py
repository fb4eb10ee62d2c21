"""Real stage-1 training on the bundled WSSS4LUAD patches with the offline Lite0 weights."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.presets import preset
from napari_histo_wsss.core.data.classes import custom_spec
from napari_histo_wsss.core.data.datasets import PatchSet, find_dataset
from napari_histo_wsss.core.errors import CheckpointError, ConfigError, DatasetError
from napari_histo_wsss.core.events import (
    Batch,
    CheckpointSaved,
    Done,
    Epoch,
    Started,
    StopToken,
)
from napari_histo_wsss.core.models.classifier import build_classifier, load_classifier
from napari_histo_wsss.core.runs.checkpoints import load_checkpoint
from napari_histo_wsss.core.runs.run_dir import LossLog, RunDirectory
from napari_histo_wsss.core.stage1.train_classifier import (
    CLASSIFIER_AUGMENTATIONS,
    augment_batch,
    build_classifier_optimizer,
    classification_loss,
    fit_to_size,
    train_classifier,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def patches(sample_dataset_dir):
    patches = find_dataset(sample_dataset_dir).patches()
    patches.decode_all()
    return patches


@pytest.fixture(scope="module")
def config(patches):
    """MLPS with PDA from the 2nd epoch, 2 epochs of 5 steps on 64 px crops."""
    config = preset("mlps", "fast", num_patches=len(patches))
    config.dataset = patches.spec.to_dict()
    config.classifier = dataclasses.replace(
        config.classifier, epochs=2, batch_size=8, input_size=64, pda_start_epoch=1)
    return config


def _train(root, config, patches, stop_after=None, resume=True):
    run = RunDirectory(root)
    if not run.exists():
        run.create(config)
    stop = StopToken()
    events = []
    for event in train_classifier(run, config, patches, device=CPU, stop=stop, resume=resume):
        events.append(event)
        if isinstance(event, Batch) and stop_after is not None and event.index + 1 == stop_after:
            stop.request()
    return run, events


@pytest.fixture(scope="module")
def finished(tmp_path_factory, config, patches):
    return _train(tmp_path_factory.mktemp("cls-a"), config, patches)


def _state(run):
    return load_checkpoint(run.classifier_checkpoint, kind="classifier")["state_dict"]


def test_loss_decreases_on_a_fixed_batch(config, patches):
    torch.manual_seed(0)
    settings = config.classifier
    model = build_classifier(settings, 3, patches.spec).train()
    optimizer = build_classifier_optimizer(model, settings)
    generator = torch.Generator().manual_seed(0)
    chosen = [0, 5, 10, 15, 20, 25, 30, 35]
    x = model.normalise(torch.stack([fit_to_size(patches.image(i), 64, generator)
                                     for i in chosen]))
    y = torch.from_numpy(patches.labels[chosen].astype(np.float32))
    losses = []
    for _ in range(8):
        loss = classification_loss(model(x, epoch=0), y, settings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_events_checkpoint_and_loss_log(finished):
    run, events = finished
    assert isinstance(events[0], Started)
    assert (events[0].total_epochs, events[0].batches_per_epoch) == (2, 5)
    assert len([e for e in events if isinstance(e, Batch)]) == 10
    epochs = [e for e in events if isinstance(e, Epoch)]
    assert [e.epoch for e in epochs] == [0, 1] and all(e.lr is not None for e in epochs)
    assert any(isinstance(e, CheckpointSaved) for e in events)
    assert events[-1] == Done("classifier", run.classifier_checkpoint, stopped=False)
    assert run.is_complete("classifier")
    rows = LossLog(run.classifier_dir / "losses.csv", []).rows()
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(float(row["train_loss"]) > 0 for row in rows)
    model, payload = load_classifier(run.classifier_checkpoint, spec=custom_spec(
        "tumor,stroma,normal"))
    assert payload["training"]["finished"] and payload["training"]["step"] == 10
    assert not model.training


def test_stop_then_resume_ends_with_the_uninterrupted_weights(tmp_path, config, patches,
                                                               finished):
    run, events = _train(tmp_path / "b", config, patches, stop_after=3)
    assert events[-1].stopped and not run.is_complete("classifier")
    model, payload = load_classifier(run.classifier_checkpoint)
    assert payload["training"]["step"] == 3 and payload["training"]["stopped"]
    last = load_checkpoint(run.classifier_dir / "last.pt", kind="classifier")
    assert last["optimizer_state"]["state"]  # momentum buffers saved for resuming
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).logits.shape == (1, 3)

    run, events = _train(tmp_path / "b", config, patches)
    assert len([e for e in events if isinstance(e, Batch)]) == 7
    assert run.is_complete("classifier")
    reference = _state(finished[0])
    resumed = _state(run)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_a_checkpoint_written_before_training_state_resumes_bit_identically(
        tmp_path, config, patches, finished):
    """last.pt as the trainer wrote it before TrainingState: running sums, epoch_losses and
    optimiser groups with ``initial_lr``."""
    run, _ = _train(tmp_path / "old", config, patches, stop_after=3)
    path = run.classifier_dir / "last.pt"
    payload = torch.load(path, weights_only=True)
    new = payload["training"]
    payload["training"] = {
        "step": new["step"], "epoch_losses": [], "running_loss": new["loss_sum"],
        "running_batches": new["batch"], "seconds": new["seconds"],
        **{key: new[key] for key in ("total_steps", "steps_per_epoch", "batch_size",
                                     "input_size", "seed", "finished", "stopped")}}
    for group in payload["optimizer_state"]["param_groups"]:
        group["initial_lr"] = group.pop("base_lr")
    torch.save(payload, path)

    run, events = _train(tmp_path / "old", config, patches)
    assert [(e.epoch, e.index) for e in events if isinstance(e, Batch)][0] == (0, 3)
    reference, resumed = _state(finished[0]), _state(run)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, config, patches, finished):
    reference = _state(finished[0])
    again = _state(_train(tmp_path / "c", config, patches)[0])
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    other = dataclasses.replace(config, seed=1)
    different = _state(_train(tmp_path / "d", other, patches)[0])
    assert not torch.equal(reference["classifier.weight"], different["classifier.weight"])


def test_labels_that_do_not_fit_the_classes_are_rejected(tmp_path, config, patches):
    wide = PatchSet(patches.paths, np.zeros((len(patches), 4), np.uint8), patches.spec)
    run = RunDirectory(tmp_path)
    run.create(config)
    with pytest.raises(DatasetError, match="4 entries but the dataset has 3 classes"):
        next(train_classifier(run, config, wide, device=CPU))


def test_checkpoints_of_another_class_set_are_rejected(tmp_path, config, patches, finished):
    other = custom_spec("tumour,stroma,lymphocytes")
    with pytest.raises(CheckpointError, match="was trained on classes"):
        load_classifier(finished[0].classifier_checkpoint, spec=other)

    relabelled = PatchSet(patches.paths, patches.labels, other)
    other_config = dataclasses.replace(config, dataset=other.to_dict())
    run = RunDirectory(tmp_path)
    run.create(other_config)
    shutil.copytree(finished[0].classifier_dir, run.classifier_dir)
    with pytest.raises(CheckpointError, match="was trained on classes"):
        next(train_classifier(run, other_config, relabelled, device=CPU))


def test_resuming_with_other_settings_is_refused(tmp_path, config, patches, finished):
    changed = dataclasses.replace(
        config, classifier=dataclasses.replace(config.classifier, lr=0.05))
    run = RunDirectory(tmp_path)
    run.create(changed)
    shutil.copytree(finished[0].classifier_dir, run.classifier_dir)
    with pytest.raises(CheckpointError, match="other classifier settings"):
        next(train_classifier(run, changed, patches, device=CPU))


@pytest.mark.parametrize("name", CLASSIFIER_AUGMENTATIONS.names())
def test_every_classifier_augmentation_keeps_shape_and_range(name):
    x = torch.rand(4, 3, 32, 32) * 255
    out = augment_batch(x, name, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 255


def test_more_epochs_continue_a_finished_classifier(tmp_path, config, patches, finished):
    """One more epoch: the schedule's new tail, history and losses.csv appended, run.json's
    new total, a changed model.pt; the pseudo-masks are to be made again and the segmenters
    trained on the old ones are marked stale (still complete)."""
    run = RunDirectory(tmp_path / "run")
    run.create(config)
    shutil.copytree(finished[0].classifier_dir, run.classifier_dir)
    run.mark_complete("classifier", epochs=2)
    run.mark_complete("pseudo-masks")
    run.mark_complete("segmenter:ce", epochs=1)
    (run.segmenter_dir("ce")).mkdir(parents=True)
    shutil.copy(run.classifier_checkpoint, run.segmenter_checkpoint("ce"))  # a model.pt there
    before = _state(run)

    events = list(train_classifier(run, config, patches, device=CPU, more_epochs=1))
    assert events[0].total_epochs == 3
    assert [e.epoch for e in events if isinstance(e, Epoch)] == [2]
    assert len([e for e in events if isinstance(e, Batch)]) == 5
    assert events[-1] == Done("classifier", run.classifier_checkpoint, stopped=False)
    assert run.config().extended_epochs == {"classifier": 3}
    assert run.config().classifier.epochs == 2  # the original plan stays on record
    assert run.status()["classifier"]["epochs"] == 3
    assert not run.is_complete("pseudo-masks")
    assert run.is_complete("segmenter:ce") and "segmenter:ce" in run.stale_stages()
    rows = LossLog(run.classifier_dir / "losses.csv", []).rows()
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    payload = load_checkpoint(run.classifier_checkpoint, kind="classifier")
    assert payload["training"]["finished"] and payload["training"]["step"] == 15
    assert [h["epoch"] for h in payload["training"]["history"]] == [1, 2, 3]
    # The lr of the new epoch's last step is the 3-epoch plan's (the old plan had ended).
    assert float(rows[2]["lr"]) == pytest.approx(
        config.classifier.lr * (1 - 14 / 15) ** 0.9, rel=1e-4)
    after = _state(run)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])

    again = list(train_classifier(run, run.config(), patches, device=CPU))  # plain resume
    assert not any(isinstance(e, Batch) for e in again)


def test_a_stopped_classifier_is_resumed_not_extended(tmp_path, config, patches):
    run, events = _train(tmp_path / "s", config, patches, stop_after=2)
    with pytest.raises(ConfigError, match="has not finished"):
        next(train_classifier(run, config, patches, device=CPU, more_epochs=2))
    assert not run.config().extended_epochs


def test_warm_up_ramps_the_lr_over_its_epochs_then_follows_poly(tmp_path, config, patches):
    warm = dataclasses.replace(config, classifier=dataclasses.replace(
        config.classifier, warmup_epochs=2.0, train_modules=()))
    run, events = _train(tmp_path / "warm", warm, patches)
    assert isinstance(events[-1], Done)
    steps_per_epoch = sum(isinstance(e, Batch) and e.epoch == 0 for e in events)
    total = 2 * steps_per_epoch
    rows = LossLog(run.classifier_dir / "losses.csv", []).rows()
    # The lr logged is each epoch's last step's: the ramp over both epochs is half-way at
    # the end of the first and complete at the end of the second.
    for epoch, (row, ramp) in enumerate(zip(rows, (0.5, 1.0), strict=True)):
        last_step = (epoch + 1) * steps_per_epoch - 1
        poly = config.classifier.lr * (1 - last_step / total) ** 0.9
        assert float(row["lr"]) == pytest.approx(ramp * poly, rel=1e-4)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        dataclasses.replace(config.classifier, warmup_epochs=-1.0).validate()


def test_a_checkpoint_from_before_a_new_setting_still_resumes(config):
    from napari_histo_wsss.core.stage1.train_classifier import _same_settings

    older = config.to_dict()
    older["classifier"].pop("warmup_epochs")  # written before the setting existed
    unfinished = {"finished": False}
    assert _same_settings({"config": older, "training": unfinished}, config)
    changed = config.to_dict()
    changed["classifier"]["warmup_epochs"] = 1.0
    assert not _same_settings({"config": changed, "training": unfinished}, config)
