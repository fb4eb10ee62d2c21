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


def _stepped(stepper: Stepper, value: float, where: str) -> float:
    """One step on a loss whose value is ``value`` (the weights' gradient is irrelevant)."""
    weight = next(stepper.model.parameters())
    return stepper.step(weight.sum() * 0 + value, where)


def test_a_loss_1000_times_its_early_median_is_divergence():
    model = torch.nn.Linear(3, 1)
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.0), CPU, "test")
    for value in (1.0, 3.0, 2.0):  # early median 2
        _stepped(stepper, value, "at epoch 1")
    assert _stepped(stepper, 1999.0, "at epoch 1") == 1999.0
    with pytest.raises(ConfigError, match="grew to 2e\\+03 at epoch 2, over 1000 times its "
                                          "early value 2: lower the learning rate"):
        _stepped(stepper, 2001.0, "at epoch 2")


def test_a_tiny_early_loss_counts_as_the_floor():
    model = torch.nn.Linear(3, 1)
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.0), CPU, "test")
    for value in (0.001, 0.002, 0.001):  # a nearly fitted model resumed
        _stepped(stepper, value, "at epoch 1")
    assert _stepped(stepper, 99.0, "at epoch 1") == 99.0  # below 1000 x the floor 0.1
    with pytest.raises(ConfigError, match="early value 0.1"):
        _stepped(stepper, 101.0, "at epoch 1")
