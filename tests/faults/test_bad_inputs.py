"""Bad inputs on the command line: corrupt, empty and renamed files, truncated checkpoints,
code-carrying pickles, damaged segmentations and unwritable outputs. Each gives exit code 2 and
one line naming the file (most behaved before issue #17; kept here so they stay that way)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_histo_wsss.cli import main


def _one_error_line(capsys) -> str:
    """The last stderr line, which must be the CLI's error (earlier lines are progress)."""
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("histo-wsss: error: "), error
    return error


@pytest.mark.parametrize("content", [b"", b"IJrEr1vVVJCw this is not a slide",
                                     b"II*\x00\x08\x00\x00\x00"],  # empty, renamed, truncated
                         ids=["empty", "renamed", "truncated tiff"])
def test_a_slide_that_is_not_one_is_named(trained_run, tmp_path, content, capsys):
    slide = tmp_path / "case-12.svs"
    slide.write_bytes(content)
    out = tmp_path / "case.zarr"
    assert main(["segment-slide", str(trained_run), str(slide), "--out", str(out),
                 "--device", "cpu"]) == 2
    assert str(slide) in _one_error_line(capsys)
    assert not out.exists()


def _copy_with_checkpoint(trained_run: Path, tmp_path: Path, data: bytes) -> Path:
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    for checkpoint in (run / "segmenter").glob("*/model.pt"):
        checkpoint.write_bytes(data)
    return run


class Payload:
    """Stands for an object whose unpickling would run code."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


@pytest.mark.parametrize("kind", ["truncated", "empty", "pickle with code"])
def test_a_bad_checkpoint_is_refused_in_one_line(trained_run, val_copy, tmp_path, kind,
                                                 capsys):
    model = next((trained_run / "segmenter").glob("*/model.pt"))
    if kind == "truncated":
        data = model.read_bytes()[: model.stat().st_size // 3]
    elif kind == "empty":
        data = b""
    else:
        evil = tmp_path / "evil.pt"
        torch.save({"kind": "segmenter", "state_dict": {}, "x": Payload()}, evil,
                   pickle_module=pickle)
        data = evil.read_bytes()
    run = _copy_with_checkpoint(trained_run, tmp_path, data)
    images, masks = val_copy
    assert main(["evaluate", str(run), str(images), str(masks), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert "model.pt" in error and "weights_only" not in error
    assert "this ran while loading" not in captured.out + captured.err


def test_a_damaged_segmentation_is_named_by_the_geojson_export(tmp_path, write_segmentation):
    from napari_histo_wsss.core.errors import SlideError
    from napari_histo_wsss.core.wsi.geojson_export import segmentation_to_geojson

    out = write_segmentation(tmp_path / "s.zarr", np.ones((64, 64), np.uint8))
    shutil.rmtree(out / "labels")
    with pytest.raises(SlideError, match="s.zarr: damaged segmentation"):
        segmentation_to_geojson(out, tmp_path / "s.geojson")
    assert not (tmp_path / "s.geojson").exists()


# ---------------------------------------------------------------- unwritable outputs, up front


def test_pipeline_into_a_read_only_place_is_refused_before_training(sample_dataset_dir,
                                                                    read_only_dir, capsys):
    out = read_only_dir / "run"
    assert main(["pipeline", str(sample_dataset_dir), "--method", "mlps", "--out", str(out),
                 "--device", "cpu"]) == 2
    assert str(out) in _one_error_line(capsys)
    assert not out.exists()


def test_save_masks_into_a_read_only_place_is_refused(trained_run, val_copy, read_only_dir,
                                                      capsys):
    images, masks = val_copy
    out = read_only_dir / "predicted"
    assert main(["evaluate", str(trained_run), str(images), str(masks), "--save-masks",
                 str(out), "--device", "cpu"]) == 2
    assert str(out) in _one_error_line(capsys)


def test_segment_slide_into_a_read_only_place_is_refused_before_segmenting(
        trained_run, slide_copy, read_only_dir, capsys):
    out = read_only_dir / "s.zarr"
    assert main(["segment-slide", str(trained_run), str(slide_copy), "--out", str(out),
                 "--device", "cpu"]) == 2
    assert str(out) in _one_error_line(capsys)


def test_geojson_that_is_a_folder_is_refused_before_segmenting(trained_run, slide_copy,
                                                               tmp_path, capsys):
    folder = tmp_path / "polygons"
    folder.mkdir()
    assert main(["segment-slide", str(trained_run), str(slide_copy), "--out",
                 str(tmp_path / "s.zarr"), "--geojson", str(folder), "--device", "cpu"]) == 2
    assert "is a folder" in _one_error_line(capsys)
    assert not (tmp_path / "s.zarr").exists()
