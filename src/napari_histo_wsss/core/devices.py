"""Device selection: ``auto | cpu | cuda | cuda:N | mps``, overridable by ``HISTO_WSSS_DEVICE``.

The environment variable wins so that a user (or a test suite) can force a device for every
entry point at once without touching settings.
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

DEVICE_ENV_VAR = "HISTO_WSSS_DEVICE"


def available_devices() -> list[str]:
    """Devices this machine can actually run on, best first (for drop-downs)."""
    devices = []
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def resolve_device(requested: str | None = "auto") -> torch.device:
    """Turn a device name into a ``torch.device`` that exists here, or explain why not."""
    name = os.environ.get(DEVICE_ENV_VAR) or requested or "auto"
    name = name.strip().lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if "mps" not in available_devices():
            raise ConfigError("device 'mps' was requested but Apple MPS is not available here")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' was requested but CUDA is not available here")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device '{name}' was requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
        return torch.device(f"cuda:{index}")
    raise ConfigError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for ``device``, or None where autocast would not help."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def release_memory(device: torch.device) -> None:
    """Give cached GPU memory back after a job (long-lived napari processes keep it otherwise)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


#: The one thing a user can do about running out of memory, worded for the CLI and the widgets.
OUT_OF_MEMORY_MESSAGE = "out of memory: try a smaller batch size, or the CPU"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means host or device memory ran out (torch reports some device OOMs
    as a plain RuntimeError), so callers can turn it into advice or retry smaller."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
