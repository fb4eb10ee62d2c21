"""Stage-2 training on the bundled real patches with pseudo-masks written here, and the companion
network a recipe trains beside the strategy's own (averaged by every predictor)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.presets import preset
from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
from napari_histo_wsss.core.corrections.finetune import inherit_companion, inherit_val_choices
from napari_histo_wsss.core.data.datasets import EvalSet, find_dataset, write_palette_mask
from napari_histo_wsss.core.errors import CheckpointError, ConfigError, DatasetError
from napari_histo_wsss.core.events import (
    Batch,
    CheckpointSaved,
    Done,
    Epoch,
    Started,
    StopToken,
)
from napari_histo_wsss.core.inference.predict import load_predictor
from napari_histo_wsss.core.models.classifier import build_classifier
from napari_histo_wsss.core.models.ensemble import COMPANION_FOLDER, SegmenterEnsemble
from napari_histo_wsss.core.models.segmenter import load_segmenter, normalise
from napari_histo_wsss.core.runs.checkpoints import load_checkpoint, save_checkpoint
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage2.losses import IGNORE_INDEX
from napari_histo_wsss.core.stage2.train_segmenter import (
    SEGMENTER_AUGMENTATIONS,
    SegmenterTrainer,
    around_painted,
    augment_sample,
    average_decay,
    input_side,
    make_batch,
    measured_input_statistics,
    train_segmenter,
)
from napari_histo_wsss.core.training.sampling import epoch_order

TARGETS = ("final", "layer-1", "layer-2", "layer-3")


@pytest.fixture(scope="module")
def layout(sample_dataset_dir):
    return find_dataset(sample_dataset_dir)


@pytest.fixture(scope="module")
def val(layout):
    """Three of the seven real validation images."""
    full = layout.eval_set("val")
    return EvalSet(full.image_paths[:3], full.mask_paths[:3], full.spec)


@pytest.fixture(scope="module")
def patches(layout):
    """Every third patch (14, all label combinations): two batches of 6 per epoch."""
    patches = layout.patches()
    return patches.subset(range(0, len(patches), 3))


def label_pseudo_mask(image: np.ndarray, label: np.ndarray, background: int,
                      shift: int = 0) -> np.ndarray:
    """A plausible pseudo-mask: the label's classes in horizontal bands, white -> background."""
    classes = np.flatnonzero(label)
    rows = np.arange(image.shape[0]) + shift
    mask = classes[(rows * len(classes) // image.shape[0]) % len(classes)]
    mask = np.repeat(mask[:, None], image.shape[1], axis=1).astype(np.uint8)
    mask[image.mean(axis=-1) > 220] = background
    return mask


def make_run(root, patches, layout, **segmenter) -> tuple[RunDirectory, RunConfig]:
    settings = SegmenterConfig(arch="pspnet", encoder_depth=3, loss="ce", epochs=2,
                               batch_size=6, input_size=None)
    config = RunConfig(dataset=layout.spec.to_dict(), data_dir=str(layout.root),
                       segmenter=dataclasses.replace(settings, **segmenter))
    run = RunDirectory(root)
    run.create(config)
    for shift, folder in enumerate(TARGETS):
        for index, path in enumerate(patches.paths):
            mask = label_pseudo_mask(patches.image(index), patches.labels[index],
                                     layout.spec.background_index, shift=7 * shift)
            write_palette_mask(run.pseudo_mask_dir(folder) / path.name, mask, layout.spec)
    return run, config


def test_training_again_drops_the_choices_made_on_val_for_the_old_model(tmp_path, patches,
                                                                        layout):
    run, config = make_run(tmp_path / "run", patches, layout, epochs=1)
    folder = run.segmenter_dir("ce")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("class_gate.json", "class_offsets.json"):
        (folder / name).write_text('{"use": true}')
    list(train_segmenter(run, config, patches, device="cpu", resume=False))
    assert (folder / "model.pt").is_file()
    assert not (folder / "class_gate.json").exists()
    assert not (folder / "class_offsets.json").exists()


def test_training_events_files_and_best_checkpoint(tmp_path, patches, layout, val):
    run, config = make_run(tmp_path / "run", patches, layout)
    events = list(train_segmenter(run, config, patches, device="cpu", val=val))
    started = events[0]
    assert isinstance(started, Started) and started.stage == "segmenter:ce"
    assert started.batches_per_epoch == len(patches) // 6
    batches = [e for e in events if isinstance(e, Batch)]
    assert len(batches) == 2 * started.batches_per_epoch
    assert all(np.isfinite(b.loss) for b in batches)
    epochs = [e for e in events if isinstance(e, Epoch)]
    assert [e.epoch for e in epochs] == [0, 1]
    assert set(epochs[0].metrics) == {"miou", "fwiou", "dice"} and epochs[0].lr > 0
    done = events[-1]
    assert isinstance(done, Done) and not done.stopped
    assert done.result == run.segmenter_checkpoint("ce")
    assert run.is_complete("segmenter:ce")

    folder = run.segmenter_dir("ce")
    metrics = json.loads((folder / "metrics.json").read_text())
    history = [entry["miou"] for entry in metrics["history"]]
    best_epoch = int(np.argmax(history)) + 1
    assert metrics["best_epoch"] == best_epoch
    assert metrics["best_val"]["miou"] == pytest.approx(max(history))
    assert set(metrics["best_val"]["per_class"]) == set(layout.spec.class_names)
    best_saves = [e for e in events if isinstance(e, CheckpointSaved) and e.best]
    assert best_saves[-1].epoch == best_epoch
    model, payload = load_segmenter(done.result)
    assert payload["training"]["best_epoch"] == best_epoch
    assert payload["config"]["input_size"] == 160  # the patches' own side
    assert len((folder / "losses.csv").read_text().splitlines()) == 3

    # Resuming a finished strategy returns at once.
    again = list(train_segmenter(run, config, patches, device="cpu", val=val))
    assert not any(isinstance(e, Batch) for e in again)
    assert again[-1].result == done.result


def test_stop_saves_a_usable_model_and_resume_continues(tmp_path, patches, layout):
    run, config = make_run(tmp_path / "run", patches, layout)
    stop = StopToken()
    first = []
    for event in train_segmenter(run, config, patches, device="cpu", stop=stop):
        first.append(event)
        if isinstance(event, Batch) and event.index == 0:
            stop.request()
    done = first[-1]
    assert isinstance(done, Done) and done.stopped
    assert not run.is_complete("segmenter:ce")
    load_segmenter(done.result)  # usable at once
    last = load_checkpoint(run.segmenter_dir("ce") / "last.pt", kind="segmenter")
    assert (last["training"]["epoch"], last["training"]["batch"]) == (0, 1)
    assert last["optimizer_state"] is not None

    second = list(train_segmenter(run, config, patches, device="cpu"))
    per_epoch = len(patches) // 6
    resumed = [(e.epoch, e.index) for e in second if isinstance(e, Batch)]
    assert resumed[0] == (0, 1)
    assert len(resumed) == 2 * per_epoch - 1
    assert not second[-1].stopped and run.is_complete("segmenter:ce")
    final = load_checkpoint(run.segmenter_dir("ce") / "last.pt", kind="segmenter")
    assert final["training"]["step"] == 2 * per_epoch


def test_missing_or_mismatched_pseudo_masks_are_explained(tmp_path, patches, layout):
    run, config = make_run(tmp_path / "run", patches, layout)
    shutil.rmtree(run.pseudo_mask_dir("final"))
    with pytest.raises(DatasetError, match="no pseudo-masks 'final'") as error:
        list(train_segmenter(run, config, patches, device="cpu"))
    assert str(run.pseudo_mask_dir("final")) in str(error.value)

    multi = dataclasses.replace(config, segmenter=dataclasses.replace(
        config.segmenter, loss="multilayer_ce", targets=("layer-1", "layer-2", "layer-3"),
        target_weights=(0.6, 0.2, 0.2)))
    (run.pseudo_mask_dir("layer-2") / patches.paths[5].name).unlink()
    with pytest.raises(DatasetError, match="no pseudo-mask for training patch"):
        list(train_segmenter(run, multi, patches, device="cpu"))

    write_palette_mask(run.pseudo_mask_dir("layer-2") / patches.paths[5].name,
                       np.zeros((32, 32), np.uint8), layout.spec)
    with pytest.raises(DatasetError, match="but patch"):
        list(train_segmenter(run, multi, patches, device="cpu"))


@pytest.mark.parametrize("changes", [
    {"loss": "ce"},
    {"loss": "multilayer_ce", "targets": ("layer-1", "layer-2", "layer-3"),
     "target_weights": (0.6, 0.2, 0.2)},
    {"loss": "onss", "aux_head": True, "augment": "onss", "normalise": "dataset",
     "min_lr": 1e-4},
    {"loss": "arml"},
    {"loss": "anm"},
    {"loss": "hisynseg", "cam_head": True, "optimizer": "adamw", "lr": 1e-4,
     "schedule": "constant", "normalise": "imagenet"},
], ids=lambda changes: changes["loss"])
def test_every_strategy_trains(tmp_path, patches, layout, changes):
    subset = patches.subset(range(8))
    run, config = make_run(tmp_path / "run", subset, layout, epochs=1, batch_size=4, **changes)
    events = list(train_segmenter(run, config, subset, device="cpu"))
    losses = [e.loss for e in events if isinstance(e, Batch)]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert events[-1].result.is_file()
    header = (run.segmenter_dir(changes["loss"]) / "losses.csv").read_text().splitlines()[0]
    if changes.get("aux_head"):
        assert "aux" in header.split(",")


def test_augmentation_keeps_masks_aligned_and_pads_with_ignore():
    rng = np.random.default_rng(0)
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 30:] = 1
    image = np.stack([mask * 200 + 20] * 3, axis=-1).astype(np.uint8)
    for _ in range(10):
        out_image, (out_mask,) = augment_sample(image, [mask], 96, "flip_blur", rng)
        assert out_image.shape == (96, 96, 3) and out_mask.shape == (96, 96)
        assert np.mean((out_image[..., 0] > 120) == (out_mask == 1)) > 0.97
    padded = 0
    for _ in range(20):
        out_image, (out_mask,) = augment_sample(image, [mask], 128, "onss", rng)
        assert out_image.shape == (128, 128, 3) and out_image.dtype == np.uint8
        padded += int((out_mask == IGNORE_INDEX).any())
    assert padded > 0  # rescales below 128 pixels are padded with the ignore label


def test_input_side_and_measured_statistics(patches):
    assert input_side(None, patches, 32) == 160
    assert input_side(224, patches, 16) == 224
    assert input_side(100, patches, 32) == 96
    mean, std = measured_input_statistics("dataset", patches)  # WSSS4LUAD publishes none
    assert all(100 < m < 250 for m in mean) and all(10 < s < 100 for s in std)
    known = measured_input_statistics("divide255", patches)
    assert known == ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))


def test_balanced_sampling_draws_rare_class_patches_as_often_as_common_ones():
    # 90 patches hold class 0 only, 10 hold class 1 (and class 0), none hold class 2.
    labels = np.zeros((100, 3), np.uint8)
    labels[:, 0] = 1
    labels[90:, 1] = 1
    uniform = epoch_order(labels, "uniform", seed=0, epoch=0)
    assert sorted(uniform) == list(range(100))
    assert np.array_equal(uniform, epoch_order(labels, "uniform", seed=0, epoch=0))
    draws = np.concatenate([epoch_order(labels, "balanced", seed=0, epoch=e) for e in range(50)])
    rare_share = np.mean(draws >= 90)
    assert 0.4 < rare_share < 0.6  # 10 % of the patches, half of the draws
    assert not np.array_equal(epoch_order(labels, "balanced", 0, 0),
                              epoch_order(labels, "balanced", 0, 1))


def test_sqrt_sampling_draws_the_rare_class_more_often_but_not_as_often_as_balanced():
    labels = np.zeros((100, 3), np.uint8)
    labels[:96, 0] = 1
    labels[96:, 2] = 1  # 4 rare patches of 100
    share = {}
    for sampling in ("uniform", "sqrt", "balanced"):
        draws = np.concatenate([epoch_order(labels, sampling, 0, e) for e in range(200)])
        share[sampling] = np.mean(draws >= 96)
    # Weights 1/sqrt(4) vs 1/sqrt(96): 4 x 0.5 / (4 x 0.5 + 96 x 0.102) = 17 % of the draws.
    assert abs(share["uniform"] - 0.04) < 0.01
    assert abs(share["sqrt"] - 0.17) < 0.02
    assert abs(share["balanced"] - 0.5) < 0.03


def test_balanced_sampling_weighs_unlabelled_patches_like_the_commonest_class():
    labels = np.zeros((100, 3), np.uint8)
    labels[:80, 0] = 1  # 80 patches of class 0, 20 without any label
    draws = np.concatenate([epoch_order(labels, "balanced", seed=0, epoch=e) for e in range(50)])
    assert 0.15 < np.mean(draws >= 80) < 0.25  # 20 % of the patches, 20 % of the draws
    nothing = np.zeros((10, 3), np.uint8)
    order = epoch_order(nothing, "balanced", 0, 0)  # no label anywhere: equal weights
    assert len(order) == 10 and set(order.tolist()) <= set(range(10))


@pytest.mark.parametrize("name", SEGMENTER_AUGMENTATIONS.names())
def test_every_segmenter_augmentation_keeps_image_and_mask_aligned(name):
    rng = np.random.default_rng(1)
    mask = np.zeros((120, 120), np.uint8)
    mask[:, 60:] = 1
    image = np.stack([mask * 200 + 20] * 3, axis=-1).astype(np.uint8)
    for _ in range(5):
        out_image, (out_mask,) = augment_sample(image, [mask], 96, name, rng)
        assert out_image.shape == (96, 96, 3) and out_image.dtype == np.uint8
        scored = out_mask != IGNORE_INDEX
        # Photometric jitter moves intensities but keeps the two halves apart.
        values = out_image[..., 1][scored].astype(float)
        bright = out_image[..., 1] > (values.min() + values.max()) / 2
        agreement = np.mean(bright[scored] == (out_mask[scored] == 1))
        assert agreement > 0.9 or np.unique(out_mask[scored]).size == 1


def test_a_crop_of_a_corrected_image_always_holds_a_painted_pixel():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
    pseudo = np.zeros((300, 420), np.uint8)
    painted = np.full((300, 420), IGNORE_INDEX, np.uint8)
    painted[250:254, 10:40] = 2  # one short stroke near a corner
    corners = set()
    for _ in range(50):
        window, (window_pseudo, window_painted) = around_painted(image, [pseudo, painted], 96,
                                                                 rng)
        assert window.shape == (96, 96, 3) and window_painted.shape == (96, 96)
        assert (window_painted == 2).any()
        corners.add(tuple(np.argwhere(window_painted == 2)[0]))
    assert len(corners) > 10  # the stroke lands at varied places in the window
    unpainted = np.full((300, 420), IGNORE_INDEX, np.uint8)
    same, masks = around_painted(image, [pseudo, unpainted], 96, rng)
    assert same is image and masks[1] is unpainted


def test_a_mosaic_sample_tiles_four_patches_with_their_own_masks(patches):
    # Each patch's "mask" is its own index, so every quarter of a mosaic says where it came
    # from; the top-left quarter is the sample's own patch.
    own = [[np.full(patches.image(i).shape[:2], i, np.uint8) for i in range(len(patches))]]
    indices = list(range(len(patches)))
    rngs = [np.random.default_rng([3, i]) for i in indices]
    images, (masks,) = make_batch(patches, own, indices, 96, "histo", rngs, mosaic=1.0)
    assert images.shape == (len(patches), 96, 96, 3) and masks.shape == (len(patches), 96, 96)
    sources = set()
    for index, mask in zip(indices, masks, strict=True):
        quarters = [mask[:48, :48], mask[:48, 48:], mask[48:, :48], mask[48:, 48:]]
        scored = [q[q != IGNORE_INDEX] for q in quarters]
        assert all(np.unique(q).size == 1 for q in scored)  # one source per quarter
        assert scored[0][0] == index
        sources.update(int(q[0]) for q in scored[1:])
    assert len(sources) > 5  # the other three quarters come from many patches
    # Without mosaic (the default) each input is one patch, as before.
    rngs = [np.random.default_rng([3, i]) for i in indices]
    _, (plain,) = make_batch(patches, own, indices, 96, "histo", rngs)
    assert all(set(np.unique(m[m != IGNORE_INDEX])) == {i} for i, m in zip(indices, plain,
                                                                           strict=True))


def test_weight_average_is_what_is_kept_and_survives_a_stop(tmp_path, patches, layout):
    """With a weight average, model.pt holds the average (not last.pt's raw weights), and a
    run stopped mid-epoch and resumed ends with the same average as one that never stopped."""
    run, config = make_run(tmp_path / "straight", patches, layout, weight_average=0.5)
    list(train_segmenter(run, config, patches, device="cpu"))
    kept = load_checkpoint(run.segmenter_checkpoint("ce"), kind="segmenter")["state_dict"]
    raw = load_checkpoint(run.segmenter_dir("ce") / "last.pt", kind="segmenter")
    name = next(k for k, v in kept.items() if v.is_floating_point() and v.ndim == 4)
    assert not np.allclose(kept[name].numpy(), raw["state_dict"][name].numpy())
    assert raw["average_state"] is not None

    stopped, config = make_run(tmp_path / "stopped", patches, layout, weight_average=0.5)
    stop = StopToken()
    for event in train_segmenter(stopped, config, patches, device="cpu", stop=stop):
        if isinstance(event, Batch) and (event.epoch, event.index) == (1, 0):
            stop.request()
    list(train_segmenter(stopped, config, patches, device="cpu"))
    resumed = load_checkpoint(stopped.segmenter_checkpoint("ce"), kind="segmenter")
    np.testing.assert_allclose(resumed["state_dict"][name].numpy(), kept[name].numpy(),
                               atol=1e-4)  # float noise; average vs raw differ by far more


def test_weight_average_spans_at_most_a_quarter_of_a_short_run():
    assert average_decay(None, 400) is None
    assert average_decay(0.99, 408) == 0.99  # the fast schedule on 557 patches keeps it
    assert average_decay(0.99, 40) == pytest.approx(0.9)  # the demo: 0.9 ** 40 of the start
    assert average_decay(0.99, 2) == pytest.approx(0.5)


def test_more_epochs_continue_a_finished_segmenter(tmp_path, patches, layout):
    """N more epochs on a finished strategy: run.json and the status record the new total,
    history and losses.csv grow, the lr takes the longer plan's tail (not ~0, not the base),
    the weight average continues (its count grows), model.pt changes; a stop during the
    extension resumes to the new total with a plain resume."""
    run, config = make_run(tmp_path / "run", patches, layout, weight_average=0.9)
    list(train_segmenter(run, config, patches, device="cpu"))
    folder = run.segmenter_dir("ce")
    before = load_checkpoint(run.segmenter_checkpoint("ce"), kind="segmenter")
    average_before = load_checkpoint(folder / "last.pt", kind="segmenter")["average_state"]
    history_before = json.loads((folder / "metrics.json").read_text())["history"]

    stop = StopToken()
    events = []
    for event in train_segmenter(run, config, patches, device="cpu", stop=stop, more_epochs=2):
        events.append(event)
        if isinstance(event, Batch) and (event.epoch, event.index) == (2, 0):
            stop.request()
    assert events[0].total_epochs == 4 and events[-1].stopped
    assert RunDirectory(run.root).config().extended_epochs == {"segmenter:ce": 4}
    assert not run.is_complete("segmenter:ce")

    resumed = list(train_segmenter(run, RunDirectory(run.root).config(), patches,
                                   device="cpu"))
    batches = [(e.epoch, e.index) for e in resumed if isinstance(e, Batch)]
    per_epoch = len(patches) // 6
    assert batches[0] == (2, 1) and batches[-1] == (3, per_epoch - 1)
    assert run.status()["segmenter:ce"]["epochs"] == 4
    history = json.loads((folder / "metrics.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3, 4]
    assert history[:2] == history_before
    lr_first_new = history[2]["lr"]  # the lr of epoch 3's last step under a 4-epoch plan
    expected = 0.01 * (1 - (3 * per_epoch - 1) / (4 * per_epoch)) ** 0.9
    assert lr_first_new == pytest.approx(expected, rel=1e-4)
    assert lr_first_new > history[1]["lr"]  # the first plan ended lower
    assert len((folder / "losses.csv").read_text().splitlines()) == 5
    after = load_checkpoint(run.segmenter_checkpoint("ce"), kind="segmenter")
    assert after["training"]["epoch"] == 4
    assert after["config"]["run"]["extended_epochs"] == {"segmenter:ce": 4}
    name = next(k for k, v in before["state_dict"].items() if v.is_floating_point()
                and v.ndim == 4)
    assert not torch.equal(before["state_dict"][name], after["state_dict"][name])
    average_after = load_checkpoint(folder / "last.pt", kind="segmenter")["average_state"]
    assert int(average_after["n_averaged"]) == int(average_before["n_averaged"]) + 2 * per_epoch


def test_more_epochs_need_a_finished_stage_and_no_restart(tmp_path, patches, layout):
    run, config = make_run(tmp_path / "run", patches, layout, epochs=1)
    with pytest.raises(ConfigError, match="has not finished"):
        next(train_segmenter(run, config, patches, device="cpu", more_epochs=1))
    list(train_segmenter(run, config, patches, device="cpu"))
    with pytest.raises(ConfigError, match="cannot be combined with a restart"):
        next(train_segmenter(run, config, patches, device="cpu", more_epochs=1, resume=False))
    with pytest.raises(ConfigError, match="at least 1"):
        next(train_segmenter(run, config, patches, device="cpu", more_epochs=-1))
    assert run.is_complete("segmenter:ce") and not run.config().extended_epochs


def test_encoder_can_start_from_the_runs_classifier(tmp_path, patches, layout):
    run, config = make_run(tmp_path / "run", patches, layout, encoder_init="classifier")
    with pytest.raises(DatasetError, match="needs the run's trained classifier") as error:
        SegmenterTrainer(run, config, patches, "ce", torch.device("cpu"), True, None)
    assert error.value.path == run.classifier_checkpoint

    classifier = build_classifier(config.classifier, layout.spec.num_classes - 1, layout.spec)
    with torch.no_grad():
        classifier.backbone.body.conv_stem.weight.add_(1.0)  # not ImageNet's any more
    save_checkpoint(run.classifier_checkpoint, kind="classifier",
                    state_dict=classifier.state_dict(), config=config.to_dict(),
                    spec=layout.spec)
    trainer = SegmenterTrainer(run, config, patches, "ce", torch.device("cpu"), True, None)
    encoder = trainer.model.net.encoder.model.state_dict()
    trained = classifier.backbone.body.state_dict()
    assert encoder.keys() <= trained.keys()
    assert all(torch.equal(tensor, trained[name]) for name, tensor in encoder.items())

    imagenet = SegmenterTrainer(run, dataclasses.replace(
        config, segmenter=dataclasses.replace(config.segmenter, encoder_init="weights")),
        patches, "ce", torch.device("cpu"), True, None)
    assert not torch.equal(imagenet.model.net.encoder.model.conv_stem.weight,
                           trained["conv_stem.weight"])


def test_unknown_encoder_init_is_refused():
    with pytest.raises(ConfigError, match="encoder_init"):
        SegmenterConfig(encoder_init="imagenet21k").validate()


def context_trainer(root, layout):
    """(patches, run, config, trainer): context 40 on the sample's patches of three source
    images whose crops overlap."""
    every = layout.patches()
    overlapping = every.subset(i for i, p in enumerate(every.paths)
                               if p.name.startswith(("test03-", "test15-", "test39-")))
    run, config = make_run(root, overlapping, layout, epochs=1, context=40, input_size=192)
    trainer = SegmenterTrainer(run, config, overlapping, "ce", torch.device("cpu"), False, None)
    return overlapping, run, config, trainer


def test_context_trains_on_windows_cut_from_the_stitched_source_images(tmp_path, layout):
    overlapping, run, config, trainer = context_trainer(tmp_path / "run", layout)
    grown = [i for i in range(len(overlapping))
             if trainer.patches.image(i).shape != overlapping.image(i).shape]
    assert grown
    for index in grown:
        window = trainer.patches.image(index)
        assert trainer.targets[0][index].shape == window.shape[:2]
        assert max(window.shape[:2]) == 200
    # These windows are 160 x 200 (the sample's crops are sparse): a 192 crop would enlarge them.
    assert trainer.side == 160
    # A sample of the patches (a fine-tune's replay) keeps the windows cut from all of them,
    # though the sample alone has no overlapping neighbours.
    sample = trainer.__class__(run, config, overlapping, "ce", torch.device("cpu"), False,
                               None, only=grown[:2])
    assert len(sample.patches) == 2 and sample.batch_size == 2
    for position, index in enumerate(grown[:2]):
        assert np.array_equal(sample.patches.image(position), trainer.patches.image(index))
        assert np.array_equal(sample.targets[0][position], trainer.targets[0][index])
    assert sample.side == 160
    list(train_segmenter(run, config, overlapping, device="cpu"))
    _, payload = load_segmenter(run.segmenter_checkpoint("ce"))
    assert payload["config"]["input_size"] == 160
    assert RunConfig.load(run.config_path).segmenter.context == 40
    # Without overlapping neighbours the windows are the patches: crops keep their side.
    every = layout.patches()
    alone = every.subset(i for i, p in enumerate(every.paths)
                         if p.name.startswith(("test24-80-0-", "test24-283-0-")))
    run, config = make_run(tmp_path / "alone", alone, layout, epochs=1, context=40,
                           input_size=192, batch_size=2)
    trainer = SegmenterTrainer(run, config, alone, "ce", torch.device("cpu"), False, None)
    assert trainer.side == 160


def test_a_corrected_patch_is_corrected_in_every_context_window_that_shows_it(tmp_path,
                                                                              layout):
    """Strokes on a training patch land in its own window and in its stitched neighbours'
    (which show those pixels too), overriding the pseudo-masks there; a val image's stroke
    becomes one more sample."""
    from napari_histo_wsss.core.data.stitching import stitch_patches
    from napari_histo_wsss.core.stage2.sparse_labels import SparseLabels

    overlapping, _, _, trainer = context_trainer(tmp_path / "run", layout)
    stitched, first, second = next(
        (image, a, b) for image in stitch_patches(overlapping) for a in image.placements
        for b in image.placements if a is not b and a.overlaps(*b.box))
    # Paint the pixels the two patches share, as seen from the first patch.
    rows = slice(max(first.top, second.top), min(first.top + first.height,
                                                 second.top + second.height))
    columns = slice(max(first.left, second.left), min(first.left + first.width,
                                                      second.left + second.width))
    painted = np.full((first.height, first.width), IGNORE_INDEX, np.uint8)
    painted[rows.start - first.top:rows.stop - first.top,
            columns.start - first.left:columns.stop - first.left] = 2  # "normal"
    val_image, _ = layout.eval_set("val").pair(0)
    val_painted = np.full(val_image.shape[:2], IGNORE_INDEX, np.uint8)
    val_painted[:5, :5] = 1
    samples_before = len(trainer.patches)
    trainer.add_corrections([
        SparseLabels(overlapping.paths[first.index], overlapping.image(first.index), painted),
        SparseLabels(Path("val-0.png"), val_image, val_painted)], None, None)
    assert len(trainer.patches) == samples_before + 1  # only the val image is new
    assert trainer.painted[-1] is val_painted
    assert trainer.patches.image(len(trainer.patches) - 1) is val_image
    for placement in (first, second):
        window_rows, window_columns = stitched.window(placement, 40)
        expected = np.zeros(stitched.covered.shape, bool)
        expected[rows, columns] = True
        expected = expected[window_rows, window_columns]
        window_painted = trainer.painted[placement.index]
        assert window_painted.shape == trainer.patches.image(placement.index).shape[:2]
        assert np.array_equal(window_painted != IGNORE_INDEX, expected)
        assert (window_painted[expected] == 2).all()
        assert (trainer.targets[0][placement.index][expected] == 2).all()


def test_a_negative_context_is_refused():
    with pytest.raises(ConfigError, match="context"):
        SegmenterConfig(context=-1).validate()


# --------------------------------------------------------------------------------------------
# The companion network (SegmenterConfig.companion)

#: The recipe's pair, small: a DeepLabV3+ (which exports at any size) with a PSPNet companion.
PAIR = {"arch": "deeplabv3plus", "encoder_depth": None, "epochs": 1,
        "companion": {"arch": "pspnet", "encoder_depth": 3}}


def test_the_companion_trains_first_and_the_predictor_averages_both(tmp_path, patches,
                                                                     layout, monkeypatch):
    run, config = make_run(tmp_path / "run", patches, layout, **PAIR)
    events = list(train_segmenter(run, config, patches, device="cpu"))
    started = [e.stage for e in events if isinstance(e, Started)]
    assert started == ["segmenter:ce companion", "segmenter:ce"]
    dones = [e for e in events if isinstance(e, Done)]
    assert len(dones) == 1 and dones[0] is events[-1] and dones[0].stage == "segmenter:ce"
    assert run.is_complete("segmenter:ce")
    assert run.segmenter_strategies() == ["ce"]  # the companion is no strategy of its own

    companion_path = run.segmenter_dir("ce") / COMPANION_FOLDER / "model.pt"
    partner, payload = load_segmenter(companion_path)
    assert payload["config"]["run"]["segmenter"]["arch"] == "pspnet"
    own, _ = load_segmenter(run.segmenter_checkpoint("ce"))
    predictor = load_predictor(run.root, "cpu", "ce", use_class_gate=False)
    assert isinstance(predictor.model, SegmenterEnsemble)
    assert predictor.config["companion"] == str(companion_path)

    image = patches.image(0)[:150, :140]  # a side no encoder stride divides
    probabilities = predictor.predict_batch(image[None])[0]
    x = normalise(torch.from_numpy(image[None].copy()), predictor.mean, predictor.std)
    x = torch.nn.functional.pad(x, (0, 4, 0, 10), mode="reflect")  # to 16's multiples
    with torch.no_grad():
        expected = (torch.softmax(own(x).logits, 1) + torch.softmax(partner(x).logits, 1)) / 2
    np.testing.assert_allclose(probabilities, expected[0, :, :150, :140].numpy(), atol=1e-5)

    # An exported engine runs the strategy's network; the companion joins it in torch.
    monkeypatch.delenv("HISTO_WSSS_ENGINE", raising=False)  # the suite forces torch
    exported = load_predictor(run.root, "cpu", "ce", use_class_gate=False,
                              engine="onnxruntime")
    assert exported.engine.name == "onnxruntime" and "companion" in exported.engine.note
    np.testing.assert_allclose(exported.predict_batch(image[None])[0], probabilities,
                               atol=1e-4)


def test_a_damaged_companion_is_named_when_the_predictor_loads(tmp_path, patches, layout):
    run, config = make_run(tmp_path / "run", patches, layout, **PAIR)
    list(train_segmenter(run, config, patches, device="cpu"))
    companion = run.segmenter_dir("ce") / COMPANION_FOLDER / "model.pt"
    companion.write_bytes(companion.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(CheckpointError) as error:
        load_predictor(run.root, "cpu", "ce")
    assert str(companion) in str(error.value)


def test_a_stop_in_the_companion_stops_the_job_and_resume_finishes_both(tmp_path, patches,
                                                                        layout):
    run, config = make_run(tmp_path / "run", patches, layout, **PAIR)
    stop = StopToken()
    first = []
    for event in train_segmenter(run, config, patches, device="cpu", stop=stop):
        first.append(event)
        if isinstance(event, Batch):
            stop.request()
    assert isinstance(first[-1], Done) and first[-1].stopped
    assert first[-1].stage == "segmenter:ce"
    assert not run.segmenter_checkpoint("ce").exists() and not run.is_complete("segmenter:ce")

    second = list(train_segmenter(run, config, patches, device="cpu"))
    resumed = [(e.stage, e.epoch, e.index) for e in second if isinstance(e, Batch)]
    assert resumed[0] == ("segmenter:ce companion", 0, 1)
    assert not second[-1].stopped and run.is_complete("segmenter:ce")
    assert isinstance(load_predictor(run.root, "cpu", "ce").model, SegmenterEnsemble)


def test_companion_settings_are_checked():
    assert SegmenterConfig().companion_settings() is None
    settings = SegmenterConfig(companion={"arch": "pspnet", "encoder_depth": 3,
                                          "targets": ["final"]}).companion_settings()
    assert (settings.arch, settings.encoder_depth, settings.targets) == ("pspnet", 3, ("final",))
    assert settings.companion == {}
    with pytest.raises(ConfigError, match="cannot change tta"):
        SegmenterConfig(companion={"tta": "d4"}).validate()
    with pytest.raises(ConfigError, match="unknown settings \\['depth'\\]"):
        SegmenterConfig(companion={"depth": 3}).validate()
    with pytest.raises(ConfigError, match="epochs"):
        SegmenterConfig(companion={"epochs": 0}).validate()


def test_the_recipe_companion_gets_esfans_image_budget():
    for schedule, epochs in (("fast", 4), ("long", 9), ("paper", 20)):
        companion = preset("recommended", schedule, num_patches=557).segmenter.companion
        assert companion["arch"] == "pspnet" and companion["epochs"] == epochs
    assert not preset("esfan", "fast", num_patches=557).segmenter.companion


def test_a_fine_tune_keeps_the_companion_and_the_val_choices(tmp_path):
    folder = tmp_path / "segmenter" / "ce"
    (folder / COMPANION_FOLDER).mkdir(parents=True)
    (folder / COMPANION_FOLDER / "model.pt").write_bytes(b"companion weights")
    (folder / "class_gate.json").write_text('{"use": false}')  # val dropped the gate
    (folder / "class_offsets.json").write_text('{"offsets": [0.5, -0.5, 0], "use": true}')
    corrected = tmp_path / "segmenter" / "ce-corrections"
    inherit_companion(folder / "model.pt", corrected)
    inherit_val_choices(folder / "model.pt", corrected)
    assert (corrected / COMPANION_FOLDER / "model.pt").read_bytes() == b"companion weights"
    for choice in ("class_gate.json", "class_offsets.json"):
        assert (corrected / choice).read_text() == (folder / choice).read_text()
    inherit_companion(tmp_path / "bare" / "model.pt", tmp_path / "nothing")  # none to copy
    inherit_val_choices(tmp_path / "bare" / "model.pt", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
