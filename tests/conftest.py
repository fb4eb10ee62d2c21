"""Shared fixtures: the bundled real sample and forcing the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on the CPU even where a GPU exists, unless a test asks for CUDA itself.
os.environ.setdefault("HISTO_WSSS_DEVICE", "cpu")
# Prediction runs in torch unless a test chooses an engine (exports and calibration take
# seconds per model; tests/core/inference/test_engines.py covers them).
os.environ.setdefault("HISTO_WSSS_ENGINE", "torch")

SAMPLE_ROOT = Path(__file__).resolve().parents[1] / "src" / "napari_histo_wsss" / "sample_data"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def sample_dataset_dir() -> Path:
    """42 real WSSS4LUAD training patches and 7 val images with masks, shipped in the repo."""
    return SAMPLE_ROOT / "wsss4luad"


@pytest.fixture(scope="session")
def sample_layout(sample_dataset_dir):
    """The bundled sample as ``find_dataset`` lays it out (its patches, val images, classes)."""
    from napari_histo_wsss.core.data.datasets import find_dataset

    return find_dataset(sample_dataset_dir)


@pytest.fixture(scope="session")
def sample_patches(sample_layout):
    """The bundled sample's 42 training patches, decoded once; tests only read them."""
    patches = sample_layout.patches()
    patches.decode_all()
    return patches


@pytest.fixture(scope="session")
def sample_slide_path() -> Path:
    """A real 3-level H&E pyramid (CMU-1 small region, CC0)."""
    return SAMPLE_ROOT / "cmu-1-small-region-pyramid.tif"


@pytest.fixture(scope="session")
def train_tiny_segmenter(sample_dataset_dir):
    """Makes a run whose tiny PSPNet trained one epoch on every third bundled patch, with
    label-filled pseudo-masks for every patch (a fine-tune may replay any of them). Returns
    (run, config, the patches it trained on, the dataset layout)."""
    import numpy as np

    from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
    from napari_histo_wsss.core.data.datasets import find_dataset, write_palette_mask
    from napari_histo_wsss.core.events import run_to_completion
    from napari_histo_wsss.core.runs.run_dir import RunDirectory
    from napari_histo_wsss.core.stage2.train_segmenter import train_segmenter

    def train(root: Path):
        layout = find_dataset(sample_dataset_dir)
        every = layout.patches()
        patches = every.subset(range(0, len(every), 3))
        config = RunConfig(dataset=layout.spec.to_dict(), data_dir=str(layout.root),
                           device="cpu",
                           segmenter=SegmenterConfig(arch="pspnet", encoder_depth=3, loss="ce",
                                                     epochs=1, batch_size=4))
        run = RunDirectory(root)
        run.create(config)
        for index, path in enumerate(every.paths):
            mask = np.full(every.image(index).shape[:2], int(np.argmax(every.labels[index])),
                           np.uint8)
            write_palette_mask(run.pseudo_mask_dir("final") / path.name, mask, layout.spec)
        run_to_completion(train_segmenter(run, config, patches, device="cpu"))
        return run, config, patches, layout

    return train


@pytest.fixture
def write_segmentation():
    """Writes a finished slide segmentation of given labels through the store API (no model)."""
    import numpy as np

    from napari_histo_wsss.core.data.classes import WSSS4LUAD
    from napari_histo_wsss.core.wsi import ome_zarr_labels as store

    def write(path, labels: np.ndarray, level0_downsample: float = 2.0, complete: bool = True):
        """``complete=False``: what a stopped run leaves, level 0 only (no pyramid)."""
        height, width = labels.shape
        root = store.create_segmentation(
            path, shape=labels.shape, chunk=64, spec=WSSS4LUAD,
            maps={"probabilities": ["tumor", "stroma", "normal"]}, blocks=(1, 1),
            pixel_size=level0_downsample * 0.5, unit="micrometer",
            attrs={"spec": WSSS4LUAD.to_dict(), "level0_downsample": level0_downsample,
                   "slide": {"path": "slide.svs", "name": "slide", "mpp": 0.5,
                             "shape": [round(height * level0_downsample),
                                       round(width * level0_downsample)]}},
        )
        root[store.LABELS_PATH]["0"][:] = labels
        root["probabilities/0"][:] = np.stack([(labels == v) * 255 for v in (1, 2, 3)])
        if complete:
            store.build_pyramids(root)
            store.mark_complete(root)
        return path

    return write


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests where CUDA is missing (CI never has a GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
