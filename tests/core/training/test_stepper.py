"""The stepper: one optimisation step, and a clear error when the loss is not finite."""

from __future__ import annotations

import pytest
import torch

from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.training.stepper import Stepper, restore_optimizer

CPU = torch.device("cpu")


def test_a_step_moves_the_weights_and_a_nan_loss_is_refused():
    model = torch.nn.Linear(3, 1)
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), CPU, "test")
    before = model.weight.detach().clone()
    with stepper.autocast():
        loss = model(torch.ones(2, 3)).pow(2).mean()
    assert stepper.step(loss, "at epoch 1") == pytest.approx(loss.item())
    assert not torch.equal(before, model.weight)
    with pytest.raises(ConfigError, match="the test loss became nan at epoch 2: lower"):
        stepper.step(model(torch.ones(1, 3)).sum() * float("nan"), "at epoch 2")


def test_restored_optimiser_keeps_this_runs_base_lr():
    weight = torch.nn.Parameter(torch.zeros(1))
    old = torch.optim.SGD([{"params": [weight], "initial_lr": 0.5}], lr=0.5, momentum=0.9)
    weight.grad = torch.ones(1)
    old.step()
    fresh = torch.optim.SGD([{"params": [weight], "base_lr": 0.1}], lr=0.1, momentum=0.9)
    restore_optimizer(fresh, old.state_dict())
    group = fresh.param_groups[0]
    assert group["base_lr"] == 0.1 and "initial_lr" not in group
    assert fresh.state_dict()["state"][0]["momentum_buffer"].item() == 1.0
