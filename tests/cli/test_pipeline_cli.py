"""`histo-wsss pipeline` end to end on the bundled real patches: every stage, scores, resuming."""

from __future__ import annotations

import json

import pytest

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.runs.stages import CLASSIFIER, PSEUDO_MASKS, segmenter_stage


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, sample_dataset_dir):
    """MLPS on the 42 bundled patches, one short epoch per stage."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    argv = ["pipeline", str(sample_dataset_dir), "--method", "mlps", "--out", str(out),
            "--epochs-cls", "1", "--epochs-seg", "1", "--batch-size", "8", "--mpp", "0.5",
            "--device", "cpu"]
    status = main(argv)
    return argv, out, status


def test_pipeline_runs_every_stage_and_scores_on_val(finished_run, capsys):
    _, out, status = finished_run
    assert status == 0
    run = RunDirectory(out)
    config = run.config()
    assert config.mpp == 0.5 and config.classifier.epochs == 1 and config.segmenter.epochs == 1
    for stage in (CLASSIFIER, PSEUDO_MASKS, segmenter_stage("multilayer_ce")):
        assert run.is_complete(stage), stage
    assert set(run.status()) == {CLASSIFIER, PSEUDO_MASKS, segmenter_stage("multilayer_ce")}
    summary = json.loads((out / "summary.json").read_text())
    scores = summary["val"]["multilayer_ce"]
    assert 0.0 <= scores["miou"] <= 1.0 and scores["images"] == 7
    # The MLPS class gate was judged on val, and the better of the two was reported.
    choice = json.loads((run.segmenter_dir("multilayer_ce") / "class_gate.json").read_text())
    assert scores["miou"] == pytest.approx(max(choice["miou_with_gate"],
                                               choice["miou_without_gate"]))
    assert summary["wall_seconds"] > 0


def test_running_again_reuses_the_run_and_another_method_is_refused(finished_run, capsys):
    argv, out, _ = finished_run
    run = RunDirectory(out)
    finished_at = {stage: info["finished_at"] for stage, info in run.status().items()}
    wall = json.loads((out / "summary.json").read_text())["wall_seconds"]
    capsys.readouterr()

    assert main(argv) == 0
    assert "continuing the existing run" in capsys.readouterr().err
    assert {stage: info["finished_at"] for stage, info in run.status().items()} == finished_at
    assert json.loads((out / "summary.json").read_text())["wall_seconds"] == wall

    other = [*argv[:3], "esfan", *argv[4:]]
    assert main(other) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--method mlps" in error and str(out) in error


def test_a_resolution_that_is_not_positive_is_refused(tmp_path, sample_dataset_dir, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:  # argparse's type check
        main(["pipeline", str(sample_dataset_dir), "--method", "mlps", "--out", str(out),
              "--mpp", "0"])
    assert exit_info.value.code == 2
    assert "argument --mpp: expected a number above 0" in capsys.readouterr().err
    assert not (out / "run.json").exists()


def test_compare_scores_writes_masks_and_refuses_unknown_strategies(finished_run,
                                                                    sample_dataset_dir,
                                                                    tmp_path, capsys):
    from napari_histo_wsss.core.data.classes import WSSS4LUAD
    from napari_histo_wsss.core.data.datasets import EvalSet, read_mask
    from napari_histo_wsss.core.inference.predict import evaluate, load_predictor

    _, out, _ = finished_run
    image = sample_dataset_dir / "val" / "img" / "02.png"
    mask = sample_dataset_dir / "val" / "mask" / "02.png"
    capsys.readouterr()
    assert main(["compare", str(out), str(image), "--mask", str(mask), "--out",
                 str(tmp_path / "masks"), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["strategies"]["multilayer_ce"]
    predictor = load_predictor(out, "cpu", "multilayer_ce")
    expected = evaluate(predictor, EvalSet([image], [mask], WSSS4LUAD))["miou"]
    assert entry["miou"] == pytest.approx(expected)
    written = read_mask(entry["mask"], WSSS4LUAD)
    assert written.shape == read_mask(mask, WSSS4LUAD).shape
    assert report["disagreement"] == 0.0  # one strategy agrees with itself

    assert main(["compare", str(out), str(image), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("multilayer_ce:") and "mIoU" not in text

    assert main(["compare", str(out), str(image), "--strategies", "onss"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "'onss'" in error and "trained: multilayer_ce" in error


def test_method_is_optional_and_defaults_to_the_recommended_recipe():
    from napari_histo_wsss.cli.main import build_parser
    from napari_histo_wsss.core.config.presets import DEFAULT_METHOD

    parser = build_parser()
    for argv in (["pipeline", "DATA", "--out", "RUN"], ["train-classifier", "DATA", "--out", "R"],
                 ["demo"]):
        assert parser.parse_args(argv).method == DEFAULT_METHOD
    assert parser.parse_args(["pipeline", "DATA", "--out", "R", "--method", "mlps",
                              "--schedule", "long"]).schedule == "long"


def test_classifiers_flag_sets_how_many_classifiers_compete():
    from napari_histo_wsss.cli.flags import stage_overrides
    from napari_histo_wsss.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["pipeline", "DATA", "--out", "R", "--classifiers", "3"])
    assert stage_overrides(args)["classifier"]["candidates"] == 3
    plain = parser.parse_args(["train-classifier", "DATA", "--out", "R"])
    assert "candidates" not in stage_overrides(plain)["classifier"]  # the method's own
    with pytest.raises(SystemExit):
        parser.parse_args(["pipeline", "DATA", "--out", "R", "--classifiers", "0"])


def test_more_epochs_train_finished_stages_longer(finished_run, tmp_path, capsys):
    """``--more-epochs`` on both training commands: the new totals in run.json and
    status.json, history appended; the extended classifier leaves its pseudo-masks to be
    made again and marks the segmenter stale; a restart with it is refused in one line."""
    import shutil

    argv, out, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    run = RunDirectory(copy)
    strategy = segmenter_stage("multilayer_ce")

    assert main(["train-segmenter", str(copy), "--more-epochs", "1", "--device", "cpu"]) == 0
    assert run.config().extended_epochs == {strategy: 2}
    assert run.status()[strategy]["epochs"] == 2
    metrics = json.loads((run.segmenter_dir("multilayer_ce") / "metrics.json").read_text())
    assert [entry["epoch"] for entry in metrics["history"]] == [1, 2]
    assert "best on val (epoch" in capsys.readouterr().err

    assert main(["train-classifier", argv[1], "--out", str(copy),  # the run's method
                 "--more-epochs", "1", "--device", "cpu"]) == 0
    assert run.config().extended_epochs == {strategy: 2, CLASSIFIER: 2}
    assert run.status()[CLASSIFIER]["epochs"] == 2
    assert not run.is_complete(PSEUDO_MASKS) and strategy in run.stale_stages()
    assert "histo-wsss pseudo-masks" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["train-segmenter", str(copy), "--more-epochs", "1", "--restart"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--more-epochs" in error


def test_self_train_flag_makes_a_run_with_a_teacher(tmp_path, sample_dataset_dir):
    from napari_histo_wsss.cli.main import build_parser
    from napari_histo_wsss.core.pipeline import prepare_run

    parser = build_parser()
    args = parser.parse_args(["pipeline", "DATA", "--out", "R", "--self-train"])
    assert args.self_train and not parser.parse_args(["pipeline", "D", "--out", "R"]).self_train
    run, config, _ = prepare_run(sample_dataset_dir, tmp_path / "run", "esfan",
                                 self_train=args.self_train)
    saved = run.config()
    assert saved.pseudo_masks.teacher == config.pseudo_masks.teacher != {}
    assert saved.segmenter.targets == ("refined",)


def test_self_train_on_a_run_made_without_the_teacher_is_refused(tmp_path, sample_dataset_dir):
    """Resuming would have kept the run's own recipe and ignored the flag without a word."""
    from napari_histo_wsss.core.pipeline import prepare_run

    prepare_run(sample_dataset_dir, tmp_path / "run", "esfan")
    with pytest.raises(ConfigError, match="without the self-training teacher"):
        prepare_run(sample_dataset_dir, tmp_path / "run", "esfan", self_train=True)
    _, config, _ = prepare_run(sample_dataset_dir, tmp_path / "run", "esfan")
    assert not config.pseudo_masks.teacher
