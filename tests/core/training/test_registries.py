"""Schedules and samplings are looked up by name; unknown names get one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.training.sampling import SAMPLINGS, epoch_order
from napari_histo_wsss.core.training.schedules import SCHEDULES, set_lr


def test_registered_names_are_the_config_values():
    assert SCHEDULES.names() == ("poly", "constant")
    assert SAMPLINGS.names() == ("uniform", "balanced", "sqrt")
    with pytest.raises(ConfigError, match="unknown lr schedule 'cosine': choose one of poly"):
        SCHEDULES.get("cosine")
    with pytest.raises(ConfigError, match="unknown sampling 'x'"):
        epoch_order(np.ones((4, 2)), "x", 0, 0)


def test_poly_falls_to_the_floor_and_constant_stays():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [weight], "base_lr": 0.1}], lr=0.1)
    assert set_lr(optimizer, "poly", 0, 10) == pytest.approx(0.1)
    assert set_lr(optimizer, "poly", 5, 10) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert set_lr(optimizer, "poly", 10, 10, min_lr=1e-3) == pytest.approx(1e-3)
    assert set_lr(optimizer, "constant", 9, 10) == pytest.approx(0.1)
