"""Data-parallel training under ``torchrun``: one process per device, one model replica each.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK. Then the process group is set up (nccl on
CUDA, gloo on the CPU), each process trains on ``cuda:LOCAL_RANK`` (or the CPU), the model is
wrapped in ``DistributedDataParallel`` (gradients are averaged over the ranks at every step) and
each rank takes its share of every global batch. Only rank 0 writes the run directory and
reports events. Without those variables every function here is a no-op for one process.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched by ``torchrun``; the device this rank trains on."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"distributed training runs on CUDA or the CPU, not on '{device}'")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # A process group still alive at interpreter exit can abort the process ("terminate
        # called without an active exception") after the work is done. Leaving it at exit
        # makes that rarer, not impossible (2 of 8 runs of the test worker still aborted):
        # the command line ends through exit_process, which skips the teardown.
        atexit.register(_leave_process_group)
    return device


def _leave_process_group() -> None:
    """Destroy the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``; in a process group, without the interpreter's teardown.

    Under ``torchrun`` gloo's threads can abort that teardown after the work is saved, which
    turns a finished run's exit code into a failure (2 of 8 runs of a two-rank CPU job on a
    2-core machine). So a process that joined a group flushes its output, leaves the group
    and exits at once; atexit handlers do not run (none of ours must: files are closed by
    then).
    """
    if not dist.is_initialized():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    _leave_process_group()
    os._exit(code)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run): the process that writes and reports."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (after rank 0 changed files the others read next)."""
    if world_size() > 1:
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` inside ``DistributedDataParallel`` when several ranks train, else itself.
    Unused parameters are allowed: training-only modules switch on at later epochs."""
    if world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                               find_unused_parameters=True)


def shard(indices: np.ndarray) -> np.ndarray:
    """This rank's contiguous slice of a global batch (the ranks together take all of it)."""
    if world_size() == 1:
        return indices
    return np.array_split(np.asarray(indices), world_size())[rank()]


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over the ranks (each rank's batch loss -> the global batch's)."""
    if world_size() == 1:
        return value
    tensor = _collective_tensor([value], torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any (a stop request seen by one rank stops all)."""
    if world_size() == 1:
        return flag
    tensor = _collective_tensor([int(flag)], torch.int64)
    dist.all_reduce(tensor)
    return bool(tensor)


def _collective_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
    """A tensor where the backend can reduce it: nccl reduces CUDA tensors only."""
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
    return torch.tensor(values, dtype=dtype, device=device)
