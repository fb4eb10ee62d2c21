"""Output paths that would destroy an input or someone's file, or cannot be written, are refused
up front: exit code 2, one line naming the path, the inputs byte-identical afterwards."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.errors import HistoWsssError
from napari_histo_wsss.core.runs.outputs import MARKER_NAME, atomic_write_text


def digests(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under ``paths``."""
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*")))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def assert_refused(argv: list[str], capsys, named: Path, *inputs: Path) -> str:
    """Run the CLI; it must exit 2 with one stderr line naming ``named`` and touch no input."""
    before = digests(*inputs)
    capsys.readouterr()
    assert main([str(arg) for arg in argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0, error
    assert str(named) in error
    assert digests(*inputs) == before
    return error


# ---------------------------------------------------------------- evaluate --save-masks


def test_save_masks_into_the_ground_truth_folder_is_refused(trained_run, val_copy, capsys):
    images, masks = val_copy
    error = assert_refused(["evaluate", trained_run, images, masks, "--save-masks", masks],
                           capsys, masks, images, masks)
    assert "input" in error


def test_save_masks_into_the_images_folder_is_refused(trained_run, val_copy, capsys):
    images, masks = val_copy
    assert_refused(["evaluate", trained_run, images, masks, "--save-masks", images],
                   capsys, images, images, masks)


def test_save_masks_into_a_folder_of_other_files_needs_overwrite(trained_run, val_copy,
                                                                tmp_path, capsys):
    images, masks = val_copy
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "02.png").write_bytes(b"a file that is not a mask of this tool")
    error = assert_refused(["evaluate", trained_run, images, masks, "--save-masks", mine],
                           capsys, mine, mine, images, masks)
    assert "--overwrite" in error


def test_save_masks_reuses_its_own_folder(trained_run, val_copy, tmp_path, capsys):
    images, masks = val_copy
    out = tmp_path / "predicted"
    argv = ["evaluate", str(trained_run), str(images), str(masks), "--save-masks", str(out)]
    assert main(argv) == 0
    assert (out / MARKER_NAME).is_file() and len(list(out.glob("*.png"))) == 7
    assert main(argv) == 0  # a previous output of the same command may be written again


# ---------------------------------------------------------------- segment-slide


def test_geojson_over_the_input_slide_is_refused(trained_run, slide_copy, tmp_path, capsys):
    assert_refused(["segment-slide", trained_run, slide_copy, "--out", tmp_path / "s.zarr",
                    "--geojson", slide_copy], capsys, slide_copy, slide_copy)
    assert not (tmp_path / "s.zarr").exists()


def test_geojson_over_a_foreign_file_needs_overwrite(trained_run, slide_copy, tmp_path,
                                                     capsys):
    notes = tmp_path / "notes.geojson"
    notes.write_text('{"type": "FeatureCollection", "features": []}')
    error = assert_refused(["segment-slide", trained_run, slide_copy, "--out",
                            tmp_path / "s.zarr", "--geojson", notes],
                           capsys, notes, notes, slide_copy)
    assert "--overwrite" in error


def test_out_that_is_an_existing_file_is_refused(trained_run, slide_copy, tmp_path, capsys):
    taken = tmp_path / "taken.zarr"
    taken.write_text("someone's file")
    assert_refused(["segment-slide", trained_run, slide_copy, "--out", taken],
                   capsys, taken, taken, slide_copy)


def test_out_below_a_file_is_refused(trained_run, slide_copy, tmp_path, capsys):
    below = tmp_path / "plain.txt" / "s.zarr"
    below.parent.write_text("a file, not a folder")
    assert_refused(["segment-slide", trained_run, slide_copy, "--out", below],
                   capsys, below, below.parent, slide_copy)


def test_geojson_in_a_read_only_place_is_refused_before_segmenting(trained_run, slide_copy,
                                                                   read_only_dir, tmp_path,
                                                                   capsys):
    geojson = read_only_dir / "s.geojson"
    assert_refused(["segment-slide", trained_run, slide_copy, "--out", tmp_path / "s.zarr",
                    "--geojson", geojson], capsys, geojson, slide_copy)
    assert not (tmp_path / "s.zarr").exists()


def test_several_slides_into_a_slide_file_are_refused(trained_run, slide_copy, tmp_path,
                                                      capsys):
    other = Path(shutil.copy(slide_copy, tmp_path / "other.tif"))
    assert_refused(["segment-slide", trained_run, slide_copy, other, "--out", other],
                   capsys, other, slide_copy, other)


def test_several_slides_with_geojson_folder_below_a_file_are_refused(trained_run, slide_copy,
                                                                    tmp_path, capsys):
    other = Path(shutil.copy(slide_copy, tmp_path / "other.tif"))
    geojson = slide_copy / "polygons"
    assert_refused(["segment-slide", trained_run, slide_copy, other, "--out", tmp_path / "out",
                    "--geojson", geojson], capsys, geojson, slide_copy, other)
    assert not (tmp_path / "out").exists()


def test_geojson_equal_to_out_names_both_flags(trained_run, slide_copy, tmp_path, capsys):
    """Was refused as "is an input of this command", which sent users looking for the input."""
    out = tmp_path / "s.zarr"
    error = assert_refused(["segment-slide", trained_run, slide_copy, "--out", out,
                            "--geojson", out], capsys, out, slide_copy)
    assert "both --out and --geojson" in error
    assert not out.exists()


# ---------------------------------------------------------------- outputs claimed only after
# the inputs loaded: a model that fails to load leaves no empty marked folder behind


def _truncated_model(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the run whose segmenter checkpoint lost its second half (an interrupted copy)."""
    run = Path(shutil.copytree(trained_run, tmp_path / "broken_run"))
    for checkpoint in (run / "segmenter").glob("*/model.pt"):
        data = checkpoint.read_bytes()
        checkpoint.write_bytes(data[: len(data) // 2])
    return run


def test_save_masks_folder_is_not_made_when_the_model_fails_to_load(trained_run, val_copy,
                                                                   tmp_path, capsys):
    images, masks = val_copy
    run, out = _truncated_model(trained_run, tmp_path), tmp_path / "predicted"
    assert main(["evaluate", str(run), str(images), str(masks), "--save-masks", str(out),
                 "--device", "cpu"]) == 2
    assert "model.pt" in capsys.readouterr().err
    assert not out.exists()


def test_compare_out_folder_is_not_made_when_a_model_fails_to_load(trained_run, val_copy,
                                                                  tmp_path, capsys):
    images, _ = val_copy
    run, out = _truncated_model(trained_run, tmp_path), tmp_path / "side_by_side"
    assert main(["compare", str(run), str(images / "02.png"), "--out", str(out),
                 "--device", "cpu"]) == 2
    assert "model.pt" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- compare, pipeline


def test_compare_out_that_is_the_image_is_refused(trained_run, val_copy, capsys):
    images, masks = val_copy
    image = images / "02.png"
    assert_refused(["compare", trained_run, image, "--mask", masks / "02.png", "--out", image],
                   capsys, image, images, masks)


def test_compare_out_inside_the_run_is_refused(trained_run, val_copy, capsys):
    images, _ = val_copy
    inside = trained_run / "segmenter"
    assert_refused(["compare", trained_run, images / "02.png", "--out", inside],
                   capsys, inside, trained_run)


@pytest.mark.parametrize("command", ["pipeline", "train-classifier"])
def test_run_out_that_is_a_file_is_refused(command, sample_dataset_dir, tmp_path, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("someone's notes")
    assert_refused([command, sample_dataset_dir, "--method", "mlps", "--out", taken],
                   capsys, taken, taken, sample_dataset_dir)


# ---------------------------------------------------------------- napari writer, atomic write


def test_writer_refuses_a_layer_name_that_leaves_the_store(tmp_path):
    from napari_histo_wsss._writer import write_labels

    out = tmp_path / "deep" / "er" / "annotations.zarr"
    with pytest.raises(HistoWsssError, match=r"\.\./\.\./victim"):
        write_labels(str(out), np.zeros((8, 8), np.uint8), {"name": "../../victim"})
    assert list(tmp_path.rglob("*victim*")) == []


def test_atomic_write_leaves_no_temporary_file_and_replaces_the_old_text(tmp_path):
    target = tmp_path / "a.geojson"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.geojson"]


def test_atomic_write_gives_a_new_file_the_mode_a_plain_write_would(tmp_path):
    """mkstemp makes its files 0600: a GeoJSON or status file others could not read."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    plain.chmod(0o640)
    atomic_write_text(plain, "y")
    assert plain.stat().st_mode & 0o777 == 0o640
