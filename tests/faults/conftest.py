"""Fixtures of the fault tests: one tiny trained run shared by the module, real input copies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from napari_histo_wsss.cli import main


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_dataset_dir) -> Path:
    """MLPS on the 42 bundled patches, one short epoch per stage (as tests/cli does); shared
    by every fault module, which only read it (tests that damage a run copy it first)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    status = main(["pipeline", str(sample_dataset_dir), "--method", "mlps", "--out", str(out),
                   "--epochs-cls", "1", "--epochs-seg", "1", "--batch-size", "8",
                   "--mpp", "0.5", "--device", "cpu"])
    assert status == 0
    return out


@pytest.fixture
def val_copy(tmp_path, sample_dataset_dir) -> tuple[Path, Path]:
    """A writable copy of the bundled val images and masks: (images dir, masks dir)."""
    val = shutil.copytree(sample_dataset_dir / "val", tmp_path / "val")
    return val / "img", val / "mask"


@pytest.fixture
def slide_copy(tmp_path, sample_slide_path) -> Path:
    return Path(shutil.copy(sample_slide_path, tmp_path / "slide.tif"))


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder this process cannot write into (a chmod-ed one, or /proc/sys as root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        yield folder
    elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        yield Path("/proc/sys")
    else:
        pytest.skip("no read-only folder available to this user")
    folder.chmod(0o755)

