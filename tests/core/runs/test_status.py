"""Run status: which stages a run directory has done, and older status files still read."""

from __future__ import annotations

import json

from napari_histo_wsss.core.config.presets import preset
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.runs.stages import CLASSIFIER, PSEUDO_MASKS, segmenter_stage
from napari_histo_wsss.core.runs.status import StageState, run_status


def test_a_folder_without_run_json_is_a_new_run(tmp_path):
    status = run_status(tmp_path / "nothing-yet")
    assert not status.exists and status.method is None and status.strategies == []


def test_classifier_state_follows_status_and_checkpoints(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.create(preset("mlps"))
    status = run_status(run.root)
    assert status.exists and status.uses_cams and status.method == "mlps"
    assert status.classifier is StageState.MISSING
    assert status.pseudo_masks is StageState.MISSING

    run.classifier_dir.mkdir()
    (run.classifier_dir / "last.pt").write_bytes(b"interrupted")
    assert run_status(run.root).classifier is StageState.STOPPED

    run.mark_complete(CLASSIFIER, epochs=1)
    run.mark_complete(PSEUDO_MASKS, patches=3)
    status = run_status(run.root)
    assert status.classifier is StageState.DONE and status.pseudo_masks is StageState.DONE


def test_hisynseg_has_no_cam_stages(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.create(preset("hisynseg"))
    assert not run_status(run.root).uses_cams


def test_an_older_status_file_saying_pseudo_masks_still_counts(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.create(preset("mlps"))
    run.status_path.write_text(json.dumps({"pseudo_masks": {"complete": True}}))
    assert run.is_complete(PSEUDO_MASKS)
    assert run_status(run.root).pseudo_masks is StageState.DONE
    # The next write keeps one spelling only.
    run.mark_complete(segmenter_stage("ce"))
    assert set(json.loads(run.status_path.read_text())) == {PSEUDO_MASKS, "segmenter:ce"}
    run.mark_incomplete(PSEUDO_MASKS)
    assert not run.is_complete(PSEUDO_MASKS)
