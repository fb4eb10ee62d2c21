"""Shared fixtures: the bundled real sample and forcing the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on the CPU even where a GPU exists, unless a test asks for CUDA itself.
os.environ.setdefault("HISTO_WSSS_DEVICE", "cpu")

SAMPLE_ROOT = Path(__file__).resolve().parents[1] / "src" / "napari_histo_wsss" / "sample_data"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def sample_dataset_dir() -> Path:
    """42 real WSSS4LUAD training patches and 7 val images with masks, shipped in the repo."""
    return SAMPLE_ROOT / "wsss4luad"


@pytest.fixture(scope="session")
def sample_slide_path() -> Path:
    """A real 3-level H&E pyramid (CMU-1 small region, CC0)."""
    return SAMPLE_ROOT / "cmu-1-small-region-pyramid.tif"


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests where CUDA is missing (CI never has a GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
