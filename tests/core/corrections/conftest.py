"""A tiny segmenter trained on the bundled real patches, for the correction tests."""

from __future__ import annotations

import numpy as np
import pytest

from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
from napari_histo_wsss.core.data.datasets import find_dataset, write_palette_mask
from napari_histo_wsss.core.events import run_to_completion
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage2.train_segmenter import train_segmenter


@pytest.fixture(scope="module")
def layout(sample_dataset_dir):
    return find_dataset(sample_dataset_dir)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, layout):
    """A run whose tiny segmenter trained one epoch on real patches and banded pseudo-masks."""
    patches = layout.patches()
    patches = patches.subset(range(0, len(patches), 3))
    settings = SegmenterConfig(arch="pspnet", encoder_depth=3, loss="ce", epochs=1,
                               batch_size=4)
    config = RunConfig(dataset=layout.spec.to_dict(), data_dir=str(layout.root),
                       segmenter=settings)
    run = RunDirectory(tmp_path_factory.mktemp("finetune") / "run")
    run.create(config)
    for index, path in enumerate(patches.paths):
        mask = np.full(patches.image(index).shape[:2], int(np.argmax(patches.labels[index])),
                       np.uint8)
        write_palette_mask(run.pseudo_mask_dir("final") / path.name, mask, layout.spec)
    run_to_completion(train_segmenter(run, config, patches, device="cpu"))
    return run, config, patches
