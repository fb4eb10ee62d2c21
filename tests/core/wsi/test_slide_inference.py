"""Whole-slide inference with a tiny real CNN: it matches a whole-image prediction, skips
glass, writes a valid OME-Zarr, survives interruption and out-of-memory, and runs cohorts."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_histo_wsss.core.data.classes import WSSS4LUAD, custom_spec
from napari_histo_wsss.core.errors import SlideError
from napari_histo_wsss.core.events import Batch, Done, Message, Started, StopToken
from napari_histo_wsss.core.wsi.ome_zarr_labels import open_segmentation, read_attrs
from napari_histo_wsss.core.wsi.slide_inference import segment_slide, segment_slides
from napari_histo_wsss.core.wsi.slides import open_slide

SPEC = custom_spec(["tumour", "stroma", "normal"], white_plane=False)
LEVEL, TILE, HALO = 2, 128, 16  # the bundled slide's 741 x 555 level: 48 tiles, fast on a CPU


class TinyPredictor:
    """Three seeded random conv layers: a real network (receptive radius 3 px), no training."""

    def __init__(self, spec=SPEC, seed=0, mpp=None):
        generator = torch.Generator().manual_seed(seed)
        layers = [torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Conv2d(6, 6, 3, padding=1),
                  torch.nn.Conv2d(6, spec.num_classes, 3, padding=1)]
        for layer in layers:
            torch.nn.init.normal_(layer.weight, std=0.3, generator=generator)
            torch.nn.init.normal_(layer.bias, std=0.1, generator=generator)
        self.net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(),
                                       layers[2]).eval()
        self.spec, self.mpp = spec, mpp
        self.config = {"model": "tiny-cnn", "seed": seed}

    @torch.inference_mode()
    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return torch.softmax(self.net(x), dim=1).numpy()


def run(predictor, slide, out, **options):
    options = {"level": LEVEL, "tile": TILE, "halo": HALO, "blend": "crop", "batch_size": 4,
               "tissue_mask": False, **options}
    return list(segment_slide(predictor, slide, out, **options))


def whole_image_prediction(predictor, slide_path, level=LEVEL):
    """The reference: one pass over the whole level, padded with white as the tiles are."""
    with open_slide(slide_path) as slide:
        image = slide.levels[level].compute()
    height, width = image.shape[:2]
    stride = TILE - 2 * HALO
    padded = np.full((-(-height // stride) * stride + 2 * HALO,
                      -(-width // stride) * stride + 2 * HALO, 3), 255, np.uint8)
    padded[:height, :width] = image
    return predictor.predict_batch(padded[None])[0][:, :height, :width]


@pytest.fixture(scope="module")
def reference(sample_slide_path):
    return whole_image_prediction(TinyPredictor(), sample_slide_path)


@pytest.fixture(scope="module")
def complete_run(sample_slide_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "crop.zarr"
    events = run(TinyPredictor(), sample_slide_path, out)
    return out, events


@pytest.fixture(scope="module")
def linear_run(sample_slide_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "linear.zarr"
    run(TinyPredictor(), sample_slide_path, out, blend="linear")
    return out


def test_label_map_equals_a_whole_image_prediction(complete_run, reference):
    out, events = complete_run
    assert isinstance(events[-1], Done) and events[-1].result == out and not events[-1].stopped
    started = next(e for e in events if isinstance(e, Started))
    batches = [e for e in events if isinstance(e, Batch)]
    assert started.batches_per_epoch == 48 and len(batches) == 48
    assert [b.index for b in batches] == list(range(48)) and batches[-1].total == 48
    segmentation = open_segmentation(out)
    labels = segmentation.labels[0].compute()
    assert labels.shape == reference.shape[1:]
    expected = reference.argmax(axis=0) + 1  # stored labels are class index + 1
    assert (labels == expected).mean() > 0.9999  # crop blending: identical but for float ties
    probabilities = segmentation.maps["probabilities"][0].compute().astype(float)
    assert np.abs(probabilities - reference * 255).max() <= 1.0


def test_smooth_blends_agree_with_the_whole_image_up_to_blending(
        sample_slide_path, tmp_path, reference, linear_run):
    run(TinyPredictor(), sample_slide_path, tmp_path / "gaussian.zarr", blend="gaussian")
    for out in (linear_run, tmp_path / "gaussian.zarr"):
        labels = open_segmentation(out).labels[0].compute()
        assert (labels == reference.argmax(axis=0) + 1).mean() > 0.99


def test_output_is_ngff_labels_with_colours_pyramid_and_provenance(
        complete_run, sample_slide_path):
    out, _ = complete_run
    root = zarr.open_group(str(out), mode="r")
    assert root["labels"].attrs["labels"] == ["tissue"]
    tissue = root["labels/tissue"]
    multiscales = tissue.attrs["multiscales"][0]
    assert multiscales["version"] == "0.4"
    assert [axis["name"] for axis in multiscales["axes"]] == ["y", "x"]
    assert multiscales["axes"][0]["unit"] == "micrometer"
    scale0 = multiscales["datasets"][0]["coordinateTransformations"][0]["scale"][0]
    assert scale0 == pytest.approx(0.499 * 4.002, rel=1e-3)  # level 2 of a 0.499 um/px slide
    colours = {c["label-value"]: c["rgba"] for c in tissue.attrs["image-label"]["colors"]}
    assert colours[1] == [*SPEC.colours[0], 255] and colours[0][3] == 0
    level0, level1 = tissue["0"][:], tissue["1"][:]
    np.testing.assert_array_equal(level1, level0[::2, ::2])  # nearest
    probabilities = root["probabilities"]
    assert probabilities.attrs["channel_names"] == ["tumour", "stroma", "normal"]
    mean = probabilities["0"][:, :4, :4].astype(float).reshape(3, 2, 2, 2, 2).mean(axis=(2, 4))
    np.testing.assert_array_equal(probabilities["1"][:, :2, :2], np.round(mean))
    attrs = read_attrs(out)
    assert attrs["complete"] is True
    assert attrs["slide"]["path"] == str(sample_slide_path)
    assert attrs["signature"]["slide"]["size"] == sample_slide_path.stat().st_size
    assert (attrs["tile"], attrs["halo"], attrs["blend"], attrs["level"]) == (TILE, HALO,
                                                                             "crop", LEVEL)
    assert attrs["predictor"]["config"] == {"model": "tiny-cnn", "seed": 0}
    assert attrs["package"]["version"]
    assert root["progress/done"][:].all()


def test_glass_tiles_are_skipped_and_left_as_background(
        sample_slide_path, tmp_path, complete_run):
    events = run(TinyPredictor(), sample_slide_path, tmp_path / "masked.zarr",
                 tissue_mask=True)
    started = next(e for e in events if isinstance(e, Started))
    assert 10 < started.batches_per_epoch < 48
    masked = open_segmentation(tmp_path / "masked.zarr").labels[0].compute()
    full = open_segmentation(complete_run[0]).labels[0].compute()
    predicted = masked > 0
    assert 0.3 < predicted.mean() < 0.9
    np.testing.assert_array_equal(masked[predicted], full[predicted])
    assert zarr.open_group(str(tmp_path / "masked.zarr"), mode="r")["tissue_mask"][:].any()


def test_white_plane_marks_glass_as_background(sample_slide_path, tmp_path):
    run(TinyPredictor(spec=WSSS4LUAD), sample_slide_path, tmp_path / "out.zarr")
    labels = open_segmentation(tmp_path / "out.zarr").labels[0].compute()
    with open_slide(sample_slide_path) as slide:
        grey = slide.levels[LEVEL].compute().mean(axis=-1)
    assert (labels[grey > WSSS4LUAD.white_threshold] == 0).all()
    assert (labels[grey <= WSSS4LUAD.white_threshold] > 0).all()


def test_a_stopped_run_is_incomplete_and_resumes_to_the_same_result(
        sample_slide_path, tmp_path, complete_run):
    out = tmp_path / "out.zarr"
    stop = StopToken()
    events = []
    for event in segment_slide(TinyPredictor(), sample_slide_path, out, level=LEVEL, tile=TILE,
                               halo=HALO, blend="crop", batch_size=4, tissue_mask=False,
                               stop=stop):
        events.append(event)
        if isinstance(event, Batch) and event.index == 20:
            stop.request()
    assert events[-1].stopped
    attrs = read_attrs(out)
    assert attrs["complete"] is False
    done = zarr.open_group(str(out), mode="r")["progress/done"][:]
    assert 0 < done.sum() < done.size

    resumed = run(TinyPredictor(), sample_slide_path, out)
    assert any(isinstance(e, Message) and "resuming" in e.text for e in resumed)
    started = next(e for e in resumed if isinstance(e, Started))
    assert started.batches_per_epoch == 48  # the progress bar spans the whole slide ...
    batches = [e for e in resumed if isinstance(e, Batch)]
    assert len(batches) < 48  # ... finished rows are not predicted again ...
    assert batches[0].index == 48 - len(batches) > 0  # ... and it starts at the tiles done
    assert [b.index for b in batches] == list(range(batches[0].index, 48))
    assert read_attrs(out)["complete"] is True
    np.testing.assert_array_equal(open_segmentation(out).labels[0].compute(),
                                  open_segmentation(complete_run[0]).labels[0].compute())
    again = run(TinyPredictor(), sample_slide_path, out)
    assert any(isinstance(e, Message) and "already complete" in e.text for e in again)


def test_a_killed_run_never_claims_to_be_complete(sample_slide_path, tmp_path):
    job = segment_slide(TinyPredictor(), sample_slide_path, tmp_path / "out.zarr", level=LEVEL,
                        tile=TILE, halo=HALO, tissue_mask=False)
    for event in job:
        if isinstance(event, Batch):
            break
    job.close()  # what a crash or a killed worker leaves
    assert read_attrs(tmp_path / "out.zarr")["complete"] is False


def test_resume_refuses_other_settings_and_foreign_folders(
        sample_slide_path, tmp_path, complete_run):
    out = tmp_path / "out.zarr"
    shutil.copytree(complete_run[0], out)
    with pytest.raises(SlideError, match=r"other settings \(tile\)"):
        run(TinyPredictor(), sample_slide_path, out, tile=96)
    with pytest.raises(SlideError, match="predictor_config_sha256"):
        run(TinyPredictor(seed=1), sample_slide_path, out)
    run(TinyPredictor(), sample_slide_path, out, tile=96, halo=8, resume=False)
    assert read_attrs(out)["tile"] == 96
    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SlideError, match="not a segmentation"):
        run(TinyPredictor(), sample_slide_path, foreign, resume=False)
    assert (foreign / "notes.txt").exists()


class OutOfMemoryOnce(TinyPredictor):
    """Raises CUDA's out-of-memory error on the first batch of more than two tiles."""

    failed = False

    def predict_batch(self, batch):
        if len(batch) > 2 and not self.failed:
            self.failed = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().predict_batch(batch)


def test_out_of_memory_halves_the_batch_and_carries_on(sample_slide_path, tmp_path,
                                                       complete_run):
    predictor = OutOfMemoryOnce()
    events = run(predictor, sample_slide_path, tmp_path / "out.zarr", batch_size=4)
    assert predictor.failed
    assert any(isinstance(e, Message) and "batch size lowered to 2" in e.text for e in events)
    assert isinstance(events[-1], Done) and not events[-1].stopped
    np.testing.assert_array_equal(open_segmentation(tmp_path / "out.zarr").labels[0].compute(),
                                  open_segmentation(complete_run[0]).labels[0].compute())


def test_narrow_column_bands_give_the_same_result(sample_slide_path, tmp_path, linear_run):
    """Memory-bounded bands (forced narrow here) blend across band edges without seams."""
    run(TinyPredictor(), sample_slide_path, tmp_path / "banded.zarr", blend="linear",
        band_budget_bytes=3 * 4 * TILE * (TILE - 2 * HALO) * 4)
    banded = open_segmentation(tmp_path / "banded.zarr")
    whole = open_segmentation(linear_run)
    np.testing.assert_array_equal(banded.labels[0].compute(), whole.labels[0].compute())
    difference = (banded.maps["probabilities"][0].compute().astype(int)
                  - whole.maps["probabilities"][0].compute())
    assert np.abs(difference).max() <= 1


def test_target_mpp_reads_the_right_level_and_resamples(sample_slide_path, tmp_path):
    events = list(segment_slide(TinyPredictor(), sample_slide_path, tmp_path / "out.zarr",
                                target_mpp=3.0, tile=TILE, halo=HALO, tissue_mask=False))
    assert isinstance(events[-1], Done)
    attrs = read_attrs(tmp_path / "out.zarr")
    assert attrs["level"] == 2 and attrs["factor"] == pytest.approx(3.0 / (0.499 * 4.002),
                                                                    rel=1e-3)
    assert attrs["mpp"] == pytest.approx(3.0, rel=1e-3)
    labels = open_segmentation(tmp_path / "out.zarr").labels[0]
    assert labels.shape == (round(741 / attrs["factor"]), round(555 / attrs["factor"]))


class WithCams(TinyPredictor):
    def predict_cams(self, batch):
        return self.predict_batch(batch)[:, :2] ** 2


def test_class_activation_maps_are_stored_when_the_model_has_them(sample_slide_path, tmp_path):
    run(WithCams(), sample_slide_path, tmp_path / "out.zarr")
    segmentation = open_segmentation(tmp_path / "out.zarr")
    assert set(segmentation.maps) == {"probabilities", "cams"}
    assert segmentation.maps["cams"][0].shape == (2, 741, 555)
    assert len(segmentation.maps["cams"]) == len(segmentation.labels)


def write_small_slide(path, sample_slide_path):
    with tifffile.TiffFile(sample_slide_path) as tiff:
        image = tiff.series[0].levels[2].asarray()[:300, :400]
    with tifffile.TiffWriter(path) as writer:
        writer.write(image, subifds=1, tile=(64, 64), photometric="rgb")
        writer.write(image[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
    return path


def test_cohort_runs_every_slide_and_reports_the_bad_one(sample_slide_path, tmp_path):
    first = write_small_slide(tmp_path / "first.tif", sample_slide_path)
    second = write_small_slide(tmp_path / "second.ome.tif", sample_slide_path)
    broken = tmp_path / "broken.svs"
    broken.write_text("not a slide")
    events = list(segment_slides(TinyPredictor(), [first, broken, second], tmp_path / "out",
                                 level=0, tile=TILE, halo=HALO))
    result = events[-1].result
    assert [p.name for p in result.outputs] == ["first.zarr", "second.zarr"]
    assert list(result.failures) == [str(broken)]
    assert "broken.svs" in result.failures[str(broken)]
    assert all(read_attrs(path)["complete"] for path in result.outputs)


class CountingFactory:
    """A picklable predictor factory that counts the models it builds."""

    built = 0
    lock = threading.Lock()

    def __call__(self):
        with self.lock:
            CountingFactory.built += 1
        return TinyPredictor()


def test_cohort_on_a_dask_cluster_builds_one_model_per_worker(sample_slide_path, tmp_path):
    from distributed import LocalCluster

    slides = [write_small_slide(tmp_path / f"slide-{i}.tif", sample_slide_path)
              for i in range(3)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        events = list(segment_slides(CountingFactory(), slides, tmp_path / "out",
                                     scheduler=cluster.scheduler_address, level=0, tile=TILE,
                                     halo=HALO))
    result = events[-1].result
    assert sorted(p.name for p in result.outputs) == ["slide-0.zarr", "slide-1.zarr",
                                                      "slide-2.zarr"]
    assert not result.failures
    assert 1 <= CountingFactory.built <= 2
    assert all(read_attrs(path)["complete"] for path in result.outputs)


def test_command_line_writes_zarr_and_geojson(sample_slide_path, tmp_path, monkeypatch, capsys):
    import argparse

    from napari_histo_wsss.cli.slides import add_slides_parsers
    from napari_histo_wsss.core.inference import predict

    monkeypatch.setattr(predict, "load_predictor",
                        lambda run_dir, device, **engine: TinyPredictor())
    parser = argparse.ArgumentParser()
    add_slides_parsers(parser.add_subparsers(dest="command"))
    out, geojson = tmp_path / "slide.zarr", tmp_path / "slide.geojson"
    args = parser.parse_args(["segment-slide", "RUN", str(sample_slide_path), "--out", str(out),
                              "--geojson", str(geojson), "--level", "2", "--tile", "128",
                              "--halo", "16", "--blend", "linear", "--batch-size", "4"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [str(out), str(geojson)]
    assert read_attrs(out)["complete"] and geojson.stat().st_size > 0

    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    args = parser.parse_args(["segment-slide", "RUN", str(broken), "--out", str(tmp_path / "b")])
    assert args.func(args) == 2
    assert "broken.svs: not a readable slide" in capsys.readouterr().err


class StopDuringACall(TinyPredictor):
    """Requests a stop while its ``calls``-th predictor call runs (as a user's click lands
    while the model computes), then keeps that call running until the test releases it."""

    def __init__(self, stop: StopToken, calls: int):
        super().__init__()
        self.stop, self.calls, self.tiles = stop, calls, []
        self.release, self.finished = threading.Event(), threading.Event()

    def predict_batch(self, batch):
        self.tiles.append(len(batch))
        if len(self.tiles) == self.calls:
            self.stop.request()
            self.release.wait(timeout=60)
            self.finished.set()
        return super().predict_batch(batch)


def test_a_stop_ends_the_job_while_the_model_still_runs(sample_slide_path, tmp_path):
    """A stop during a batch's model call ends the job without waiting for the call (the
    call is the slow part: a whole batch on a CPU); the left call finishes on its own, a
    restarted run waits for it (one call per predictor at once) and completes the output."""
    stop = StopToken()
    predictor = StopDuringACall(stop, calls=3)  # the 1st call probes the model's channels
    events = run(predictor, sample_slide_path, tmp_path / "out.zarr", batch_size=16, stop=stop)
    assert events[-1].stopped and not predictor.finished.is_set()  # the call still runs
    assert len(predictor.tiles) == 3
    assert read_attrs(tmp_path / "out.zarr")["complete"] is False
    threading.Timer(0.5, predictor.release.set).start()
    resumed = run(predictor, sample_slide_path, tmp_path / "out.zarr", batch_size=16)
    assert predictor.finished.is_set()
    assert isinstance(resumed[-1], Done) and not resumed[-1].stopped
    assert read_attrs(tmp_path / "out.zarr")["complete"] is True
