"""One writer per output, and Ctrl-C honoured in every phase of a slide: real processes.

The slide runs are the real ``histo-wsss segment-slide`` in a subprocess on the bundled real
slide (level 2, 128 px tiles, so a run is a few small batches), interrupted by a real
SIGINT or SIGKILL at a phase recognised from its own output, then run again to the end.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_histo_wsss.cli import main
from napari_histo_wsss.core.runs.locks import (
    LockedError,
    hold_lock,
    read_holder,
    sibling_lock_path,
)
from napari_histo_wsss.core.wsi import ome_zarr_labels as store

#: Small work: the coarsest level of the sample (741 x 555 px) in tiles of 128 px, four per
#: batch: about 20 tissue tiles, so a run is a few batches.
SMALL = ["--level", "2", "--tile", "128", "--halo", "16", "--batch-size", "4", "--device", "cpu"]
#: A guard against hangs only (the machine may be busy): no run here takes a tenth of it.
HANG_GUARD_S = 300


class Process:
    """A subprocess whose stdout and stderr are collected as they come."""

    def __init__(self, argv: list[str]):
        env = {**os.environ, "HISTO_WSSS_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=self._collect, args=(stream, into), daemon=True)
                        for stream, into in ((self.popen.stdout, self.out),
                                             (self.popen.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _collect(stream, into: list[str]) -> None:
        for character in iter(lambda: stream.read(1), ""):
            into.append(character)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while not ready():
            assert self.popen.poll() is None, f"ended before {what}: {self.stderr[-2000:]}"
            assert time.monotonic() < deadline, f"never reached {what}"
            time.sleep(0.02)

    def tiles_done(self) -> int:
        """The progress bar's count of predicted tiles so far."""
        counts = re.findall(r"\|\s*(\d+)/\d+ \[", self.stderr)
        return int(counts[-1]) if counts else 0

    def finish(self) -> int:
        code = self.popen.wait(timeout=HANG_GUARD_S)
        for reader in self.readers:
            reader.join(timeout=10)
        return code


def _segment_slide(run: Path, slide: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "napari_histo_wsss.cli.main", "segment-slide", str(run),
            str(slide), "--out", str(out), *SMALL, *extra]


def _labels(out: Path) -> np.ndarray:
    import zarr

    root = zarr.open_group(str(out), mode="r")
    assert store.read_attrs(out).get("complete") is True
    return np.asarray(root[store.LABELS_PATH]["0"][:])


@pytest.fixture(scope="module")
def reference(trained_run, sample_slide_path, tmp_path_factory) -> np.ndarray:
    """The labels of an uninterrupted run with the same settings."""
    out = tmp_path_factory.mktemp("reference") / "slide.zarr"
    assert main(_segment_slide(trained_run, sample_slide_path, out)[3:]) == 0
    return _labels(out)


# ---------------------------------------------------------------- the lock itself


def _holder_process(lock: Path) -> Process:
    code = ("import sys; from napari_histo_wsss.core.runs.locks import hold_lock\n"
            f"with hold_lock({str(lock)!r}, 'the output'):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    process = Process([sys.executable, "-c", code])
    process.wait_for(lambda: "held" in process.stdout, "holding the lock")
    return process


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path):
    lock = tmp_path / ".out.lock"
    holder = _holder_process(lock)
    busy = f"is being written by process {holder.popen.pid} "
    with pytest.raises(LockedError, match=busy), hold_lock(lock, "out"):
        pass
    holder.popen.kill()  # SIGKILL: no chance to remove the lock
    holder.finish()
    assert lock.exists()
    said = []
    with hold_lock(lock, "out", said.append):
        assert read_holder(lock)["pid"] == os.getpid()
    assert said and f"left by process {holder.popen.pid}" in said[0]
    assert not lock.exists()


def test_the_same_process_may_nest_and_the_lock_goes_with_the_outermost(tmp_path):
    lock = tmp_path / ".run.lock"
    with hold_lock(lock, "run"):
        with hold_lock(lock, "run"):
            pass
        assert lock.exists()
    assert not lock.exists()


def test_a_training_run_is_refused_while_another_process_holds_it(tmp_path, sample_dataset_dir,
                                                                 capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = _holder_process(run / ".histo-wsss.lock")
    try:
        status = main(["train-classifier", str(sample_dataset_dir), "--method", "mlps",
                       "--out", str(run), "--epochs-cls", "1", "--device", "cpu"])
    finally:
        holder.popen.stdin.close()  # the holder ends and lets go
        assert holder.finish() == 0
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("histo-wsss: error:") and f"process {holder.popen.pid}" in error
    assert not (run / "classifier").exists()


# ---------------------------------------------------------------- two writers on one slide output


def test_no_resume_never_deletes_an_output_another_run_is_writing(
        trained_run, sample_slide_path, tmp_path, reference, capsys):
    out = tmp_path / "slide.zarr"
    first = Process(_segment_slide(trained_run, sample_slide_path, out))
    first.wait_for(lambda: first.tiles_done() >= 1, "its first batch")
    # Paused mid-slide, so it is still writing however fast this machine would finish it.
    first.popen.send_signal(signal.SIGSTOP)
    second = main(_segment_slide(trained_run, sample_slide_path, out, "--no-resume")[3:])
    assert second == 2
    error = capsys.readouterr().err.strip()
    assert f"being written by process {first.popen.pid}" in error
    assert str(sibling_lock_path(out)) in error
    first.popen.send_signal(signal.SIGCONT)
    first.popen.send_signal(signal.SIGINT)
    assert first.finish() == 1
    assert out.exists() and not sibling_lock_path(out).exists()
    assert main(_segment_slide(trained_run, sample_slide_path, out)[3:]) == 0
    assert np.array_equal(_labels(out), reference)


# ---------------------------------------------------------------- Ctrl-C in each phase


def _interrupt_then_resume(trained_run, slide, out, reference, ready, what,
                           sig=signal.SIGINT) -> Process:
    process = Process(_segment_slide(trained_run, slide, out))
    process.wait_for(lambda: ready(process), what)
    process.popen.send_signal(sig)
    code = process.finish()
    if sig == signal.SIGINT:
        assert code == 1, process.stderr[-2000:]
        assert "stopped; run the same command again to resume" in process.stderr
        assert not sibling_lock_path(out).exists()
    else:
        assert code == -signal.SIGKILL
    assert not (out.exists() and store.read_attrs(out).get("complete"))
    assert main(_segment_slide(trained_run, slide, out)[3:]) == 0
    assert np.array_equal(_labels(out), reference)
    return process


def test_ctrl_c_as_the_run_starts_its_tissue_mask(trained_run, sample_slide_path, tmp_path,
                                                  reference):
    """The lock is taken just before the tissue mask: the signal lands in it (or right after);
    nothing is marked complete and the next run starts and finishes."""
    out = tmp_path / "slide.zarr"
    _interrupt_then_resume(trained_run, sample_slide_path, out, reference,
                           lambda p: sibling_lock_path(out).exists(), "the lock")


def test_ctrl_c_while_tiles_are_predicted_and_written(trained_run, sample_slide_path, tmp_path,
                                                     reference):
    out = tmp_path / "slide.zarr"
    _interrupt_then_resume(trained_run, sample_slide_path, out, reference,
                           lambda p: p.tiles_done() >= 1, "its first batch")


def test_sigkill_leaves_a_stale_lock_that_the_next_run_takes_over(
        trained_run, sample_slide_path, tmp_path, reference, capsys):
    out = tmp_path / "slide.zarr"
    capsys.readouterr()
    _interrupt_then_resume(trained_run, sample_slide_path, out, reference,
                           lambda p: p.tiles_done() >= 1, "its first batch", sig=signal.SIGKILL)
    said = capsys.readouterr()
    assert "took over the lock" in said.out + said.err


def test_ctrl_c_during_the_geojson_export_leaves_no_partial_file(
        trained_run, sample_slide_path, tmp_path):
    """The export starts when the store's path is printed. The sample's export is short, so
    the signal may come after it: either way no half file exists, and a stopped export is
    finished by running the command again (the segmentation is not computed again)."""
    out, geojson = tmp_path / "slide.zarr", tmp_path / "slide.geojson"
    argv = _segment_slide(trained_run, sample_slide_path, out, "--geojson", str(geojson))
    process = Process(argv)
    process.wait_for(lambda: str(out) in process.stdout, "the export")
    process.popen.send_signal(signal.SIGINT)
    code = process.finish()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    if code == 1:
        assert "stopped while exporting GeoJSON" in process.stderr
        assert not geojson.exists()
        assert main(argv[3:]) == 0
    else:
        assert code == 0
    assert geojson.read_text().startswith('{"type":"FeatureCollection"')
