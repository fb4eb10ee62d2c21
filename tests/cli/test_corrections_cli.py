"""`histo-wsss review`, `corrections import/export/list` and `train-segmenter --with-corrections`
on a tiny segmenter trained on the bundled real patches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.draw import disk

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.corrections.store import Correction, CorrectionStore
from napari_histo_wsss.core.data.datasets import read_rgb
from napari_histo_wsss.core.runs.run_dir import RunDirectory


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, train_tiny_segmenter):
    """(run, layout): one epoch of a tiny PSPNet on every third bundled patch."""
    run, _, _, layout = train_tiny_segmenter(tmp_path_factory.mktemp("cli") / "run")
    return run, layout


def qupath_file(path, image, name="stroma"):
    """What QuPath exports: a bare list of features, a classified polygon with a hole."""
    outer = [[20, 20], [120, 20], [120, 100], [20, 100], [20, 20]]
    hole = [[50, 40], [70, 40], [70, 60], [50, 60], [50, 40]]
    features = [{"type": "Feature", "id": "a1",
                 "geometry": {"type": "Polygon", "coordinates": [outer, hole]},
                 "properties": {"objectType": "annotation",
                                "classification": {"name": name, "color": [1, 2, 3]}}},
                {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outer]},
                 "properties": {"objectType": "annotation"}}]
    path.write_text(json.dumps(features))
    return path


def test_review_ranks_val_images_and_saves_qupath_rectangles(trained_run, tmp_path, capsys):
    run, layout = trained_run
    out = tmp_path / "queue.geojson"
    assert main(["review", str(run.root), "--top", "3", "--geojson", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # header + 3 items
    scores = [float(line.split()[1]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    features = json.loads(out.read_text())["features"]
    assert [f["properties"]["rank"] for f in features] == [1, 2, 3]
    assert all(f["properties"]["classification"]["name"] == "Review" for f in features)
    # Our own file may be replaced; someone else's is refused in one line.
    assert main(["review", str(run.root), "--top", "1", "--geojson", str(out)]) == 0
    foreign = tmp_path / "notes.geojson"
    foreign.write_text("{}")
    capsys.readouterr()
    assert main(["review", str(run.root), "--geojson", str(foreign)]) == 2
    assert "notes.geojson" in capsys.readouterr().err


def test_import_export_and_list_round_trip(trained_run, tmp_path, capsys):
    run, layout = trained_run
    image = layout.eval_set("val").image_paths[1]
    annotations = qupath_file(tmp_path / "qupath.geojson", image)
    assert main(["corrections", "import", str(run.root), str(annotations), "--image",
                 str(image), "--author", "dr-a"]) == 0
    assert "skipped 1" in capsys.readouterr().err
    labels = CorrectionStore.of_run(run).find(image).labels
    assert set(np.unique(labels)) == {0, 2}
    assert (labels == 2).sum() == 100 * 80 - 20 * 20  # centres inside, hole left unpainted

    assert main(["corrections", "list", str(run.root)]) == 0
    listed = capsys.readouterr().out
    assert "stroma" in listed and "dr-a" in listed and str(image.resolve()) in listed

    exported = tmp_path / "out.geojson"
    assert main(["corrections", "export", str(run.root), str(exported)]) == 0
    other = RunDirectory(tmp_path / "other")
    other.create(run.config())
    assert main(["corrections", "import", str(other.root), str(exported)]) == 0
    assert np.array_equal(CorrectionStore.of_run(other).find(image).labels, labels)

    capsys.readouterr()
    bad = qupath_file(tmp_path / "bad.geojson", image, name="Necrosis")
    assert main(["corrections", "import", str(run.root), str(bad), "--image", str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Necrosis" in err[0] and "bad.geojson" in err[0]


def test_train_segmenter_with_corrections_fine_tunes(trained_run, capsys):
    run, layout = trained_run
    image = layout.eval_set("val").image_paths[0]
    labels = np.zeros(read_rgb(image).shape[:2], np.uint8)
    labels[disk((50, 50), 10, shape=labels.shape)] = 3
    CorrectionStore.of_run(run).save(Correction(image, labels))
    assert main(["train-segmenter", str(run.root), "--with-corrections", "--epochs-seg", "1",
                 "--device", "cpu"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == str(run.segmenter_checkpoint("ce-corrections"))
    assert run.is_complete("segmenter:ce-corrections")


def test_apply_writes_each_corrected_images_mask_refined_by_its_strokes(trained_run, tmp_path,
                                                                      capsys):
    from napari_histo_wsss.core.data.datasets import read_mask

    run, layout = trained_run
    store = CorrectionStore.of_run(run)
    image = layout.eval_set("val").image_paths[2]
    labels = np.zeros(read_rgb(image).shape[:2], np.uint8)
    labels[disk((60, 60), 12, shape=labels.shape)] = 3  # normal
    labels[disk((120, 120), 12, shape=labels.shape)] = 1  # tumour
    store.save(Correction(image, labels))
    out = tmp_path / "corrected"
    assert main(["corrections", "apply", str(run.root), str(out), "--device", "cpu"]) == 0
    written = capsys.readouterr().out.strip().splitlines()
    assert len(written) == len([c for c in store.load_all() if c.kind == "image"])
    mask = read_mask(out / f"{image.stem}.png", layout.spec)
    assert mask.shape == labels.shape
    assert (mask[labels == 3] == 2).all() and (mask[labels == 1] == 0).all()
    # Its own folder may be written again; a folder of other files is refused in one line.
    assert main(["corrections", "apply", str(run.root), str(out), "--device", "cpu"]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["corrections", "apply", str(run.root), str(foreign), "--device", "cpu"]) == 2
    assert "mine" in capsys.readouterr().err
    store.remove(store.find(image))


def test_calibrate_refits_the_class_offsets_on_corrections_and_val(trained_run, capsys):
    run, layout = trained_run
    store = CorrectionStore.of_run(run)
    val = layout.eval_set("val")
    for path in val.image_paths[3:5]:
        labels = np.zeros(read_rgb(path).shape[:2], np.uint8)
        labels[disk((70, 70), 30, shape=labels.shape)] = 2  # stroma
        store.save(Correction(path, labels))
    corrected = len(store.load_all())
    assert main(["corrections", "calibrate", str(run.root), "--strategy", "ce", "--device",
                 "cpu"]) == 0
    out, err = capsys.readouterr()
    saved = run.segmenter_dir("ce") / "class_offsets.json"
    assert out.strip() == str(saved)
    record = json.loads(saved.read_text())
    assert (record["images"], record["corrected_images"]) == (len(val), corrected)
    assert f"{len(val)} val images and {corrected} corrected images" in err

    saved.unlink()
    assert main(["corrections", "calibrate", str(run.root), "--strategy", "ce", "--no-val",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seen in 8 images or more" in err[0]
    assert "nothing was changed" in err[0]
    assert not saved.exists()
    for path in val.image_paths[3:5]:
        store.remove(store.find(path))
