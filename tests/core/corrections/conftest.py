"""The dataset layout and a tiny trained run, for the correction tests."""

from __future__ import annotations

import pytest

from napari_histo_wsss.core.data.datasets import find_dataset


@pytest.fixture(scope="module")
def layout(sample_dataset_dir):
    return find_dataset(sample_dataset_dir)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, train_tiny_segmenter):
    """(run, config, patches): a tiny segmenter trained one epoch on real patches."""
    run, config, patches, _ = train_tiny_segmenter(tmp_path_factory.mktemp("finetune") / "run")
    return run, config, patches
