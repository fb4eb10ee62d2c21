"""A run directory holding a freshly initialised classifier, for pseudo-mask jobs."""

from __future__ import annotations

import pytest
import torch

from napari_histo_wsss.core.models.classifier import build_classifier
from napari_histo_wsss.core.runs.checkpoints import save_checkpoint
from napari_histo_wsss.core.runs.run_dir import RunDirectory


@pytest.fixture(scope="session")
def untrained_classifier_run(tmp_path_factory):
    """``make(config, spec, name)``: a new run of ``config`` whose classifier checkpoint holds
    untrained weights (seed 0): enough to run the recipe, not to judge its masks."""

    def make(config, spec, name: str) -> RunDirectory:
        run = RunDirectory(tmp_path_factory.mktemp(name))
        run.create(config)
        torch.manual_seed(0)
        model = build_classifier(config.classifier, spec.num_classes, spec)
        save_checkpoint(run.classifier_checkpoint, kind="classifier",
                        state_dict=model.state_dict(), config=config.to_dict(), spec=spec)
        return run

    return make
