"""One optimisation step, the same for every trainer: mixed precision and channels-last on CUDA.

Autocast runs bf16 where the GPU has it and fp16 otherwise (with a ``GradScaler``, which keeps
small fp16 gradients from vanishing); on the CPU everything stays float32 unless the run asks
for bf16 (``RunConfig.train_precision``, ``devices.training_autocast``), which runs where the
CPU has bf16 kernels and falls back to float32 with one line elsewhere. A loss that is not
finite, or weights that are not (checked before anything is saved), stop training with one
``ConfigError`` instead of silently ruining the weights: nothing of the diverged model is written,
so the last good checkpoint stays and the stage is not marked complete.

A weight explosion can stay finite for many steps (lr 200 on the classifier: 0.9, 4.7e7, 5e16,
...). So a loss more than :data:`DIVERGENCE_FACTOR` times the early loss (the median of this
session's first :data:`EARLY_STEPS` losses, at least :data:`EARLY_FLOOR`) stops training the
same way. Healthy runs stay far below: the classifier's loss on 32 px crops at lr 0.01 peaks at
about 55 times its first value, a loss that is not going down but not diverging either.
"""

from __future__ import annotations

import math
import statistics
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..devices import training_autocast
from ..errors import ConfigError
from ..runs.checkpoints import first_non_finite
from . import distributed

#: What a diverging training most likely needs, said with every divergence.
DIVERGED_ADVICE = ("lower the learning rate or raise the batch size (training diverged; it "
                   "stopped, the last good checkpoint is kept and the stage is not complete)")


#: A loss this many times the early loss means training diverged.
DIVERGENCE_FACTOR = 1000.0
#: The early loss is the median of this many first losses of a training session ...
EARLY_STEPS = 3
#: ... and at least this, so a nearly fitted model resumed with a tiny loss is not stopped by
#: one hard batch.
EARLY_FLOOR = 0.1


class Stepper:
    """Owns the model being trained (DDP-wrapped under torchrun), its optimiser and scaler."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, loss_name: str, average_decay: float | None = None,
                 precision: str = "auto"):
        self.device = device
        self.loss_name = loss_name
        #: The autocast dtype (None: fp32) and a line saying what ``precision`` became.
        self.amp_dtype, self.precision_note = training_autocast(device, precision)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=self.amp_dtype == torch.float16)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        #: The module the step functions call (``model`` itself outside torchrun).
        self.model = distributed.wrap(model, device)
        #: The network itself, unwrapped: what the weight average follows and copies.
        self.network = model
        self.optimizer = optimizer
        self.early_losses: list[float] = []
        #: An exponential moving average of the weights (and BatchNorm statistics), updated
        #: after every step: it smooths the last epochs' noise, so the model scored and kept
        #: does not depend on which batch an epoch happened to end with (docs/algorithms.md 12).
        self.average_decay = average_decay
        self.average: AveragedModel | None = None
        self.restart_average()

    def restart_average(self) -> None:
        """Start the weight average (if any) from the model's current weights."""
        if self.average_decay:
            self.average = AveragedModel(
                self.network, multi_avg_fn=get_ema_multi_avg_fn(self.average_decay),
                use_buffers=True)

    @property
    def kept_model(self) -> nn.Module:
        """The model to validate and save: the weight average when there is one."""
        return self.average.module if self.average is not None else self.network

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def step(self, loss: torch.Tensor, where: str) -> float:
        """zero_grad, backward, optimiser step; the loss value (``where``: "at epoch 3")."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError(f"the {self.loss_name} loss became {value} {where}: "
                              f"{DIVERGED_ADVICE}")
        self._check_divergence(value, where)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update_parameters(self.network)
        return value

    def _check_divergence(self, value: float, where: str) -> None:
        """Refuse a loss orders of magnitude above the early ones (see the module docstring)."""
        if self.early_losses:
            early = max(statistics.median(self.early_losses), EARLY_FLOOR)
            if value > DIVERGENCE_FACTOR * early:
                raise ConfigError(
                    f"the {self.loss_name} loss grew to {value:.3g} {where}, over "
                    f"{DIVERGENCE_FACTOR:g} times its early value {early:.3g}: {DIVERGED_ADVICE}")
        if len(self.early_losses) < EARLY_STEPS:
            self.early_losses.append(value)

    def check_weights(self, where: str) -> None:
        """Refuse to go on (and so to save) with NaN or infinite weights or buffers: a finite
        loss can still be the step that broke them."""
        broken = first_non_finite(self.model.state_dict())
        if broken is not None:
            raise ConfigError(f"the {self.loss_name} model's weight '{broken}' became NaN or "
                              f"infinite {where}: {DIVERGED_ADVICE}")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Inputs in channels-last memory: the convolutions run faster on CPUs too (x1.3 for Lite0
    on two cores, benchmarks/bench_training.py)."""
    return x.contiguous(memory_format=torch.channels_last)


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a saved optimiser state but keep this run's ``base_lr`` per group: the schedule's
    base comes from the settings (older checkpoints named it ``initial_lr``)."""
    base = [group["base_lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["base_lr"] = lr
        group.pop("initial_lr", None)
