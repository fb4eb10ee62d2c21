"""One optimisation step, the same for every trainer: mixed precision and channels-last on CUDA.

Autocast runs bf16 where the GPU has it and fp16 otherwise (with a ``GradScaler``, which keeps
small fp16 gradients from vanishing); on the CPU everything stays float32. A loss that is not
finite, or weights that are not (checked before anything is saved), stop training with one
``ConfigError`` instead of silently ruining the weights: nothing of the diverged model is written,
so the last good checkpoint stays and the stage is not marked complete.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..devices import autocast_dtype
from ..errors import ConfigError
from ..runs.checkpoints import first_non_finite
from . import distributed

#: What a diverging training most likely needs, said with every divergence.
DIVERGED_ADVICE = ("lower the learning rate or raise the batch size (training diverged; it "
                   "stopped, the last good checkpoint is kept and the stage is not complete)")


class Stepper:
    """Owns the model being trained (DDP-wrapped under torchrun), its optimiser and scaler."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, loss_name: str, average_decay: float | None = None):
        self.device = device
        self.loss_name = loss_name
        self.amp_dtype = autocast_dtype(device)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=self.amp_dtype == torch.float16)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        #: The module the step functions call (``model`` itself outside torchrun).
        self.model = distributed.wrap(model, device)
        self.optimizer = optimizer
        #: An exponential moving average of the weights (and BatchNorm statistics), updated
        #: after every step: it smooths the last epochs' noise, so the model scored and kept
        #: does not depend on which batch an epoch happened to end with (docs/algorithms.md 12).
        self.average = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(average_decay), use_buffers=True,
        ) if average_decay else None

    @property
    def kept_model(self) -> nn.Module:
        """The model to validate and save: the weight average when there is one."""
        if self.average is not None:
            return self.average.module
        return getattr(self.model, "module", self.model)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def step(self, loss: torch.Tensor, where: str) -> float:
        """zero_grad, backward, optimiser step; the loss value (``where``: "at epoch 3")."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError(f"the {self.loss_name} loss became {value} {where}: "
                              f"{DIVERGED_ADVICE}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update_parameters(getattr(self.model, "module", self.model))
        return value

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
