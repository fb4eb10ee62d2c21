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


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 and newer; fastest with AVX-512
    BF16 or AMX): elsewhere bf16 is emulated element by element and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_bf16_instructions() -> bool:
    """Whether the CPU computes in bf16 itself (AVX-512 BF16 or AMX), where bf16 can beat fp32;
    oneDNN's bf16 kernels on plain AVX-512 convert on the fly."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def training_autocast(device: torch.device, precision: str = "auto"
                      ) -> tuple[torch.dtype | None, str]:
    """(autocast dtype for training on ``device``, None: fp32; a line for the user, empty
    when there is nothing to say) for ``RunConfig.train_precision``: "auto" (mixed precision
    on CUDA, fp32 elsewhere), "fp32", or "bf16" where the device has bf16 kernels (the CPU
    too); bf16 that the device cannot run fast falls back, saying so."""
    if precision == "auto":
        return autocast_dtype(device), ""
    if precision == "fp32":
        return None, "training in fp32" if autocast_dtype(device) is not None else ""
    if precision != "bf16":
        raise ConfigError(f"unknown training precision '{precision}': choose auto, fp32 or "
                          "bf16")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "training with bf16 autocast"
    if device.type == "cpu" and cpu_has_native_bf16():
        if cpu_has_bf16_instructions():
            return torch.bfloat16, "training with bf16 autocast on the CPU"
        return torch.bfloat16, ("training with bf16 autocast on the CPU (emulated: this CPU has "
                                "no AVX-512 BF16 or AMX instructions, expect it slower than fp32)")
    fallback = autocast_dtype(device)
    name = "fp16 autocast" if fallback is torch.float16 else "fp32"
    return fallback, f"bf16 training asked for, but this {device.type.upper()} has no bf16 " \
                     f"kernels: training in {name}"


def release_memory(device: torch.device) -> None:
    """Give cached GPU memory back after a job (long-lived napari processes keep it otherwise).

    GPU only: there a full garbage collection first frees tensors caught in reference cycles,
    so the cache can shrink. On the CPU a freed tensor's memory goes back at once, and a full
    collection of a napari process (0.1-0.3 s, holding Python's lock) only froze the window at
    the end of every job (benchmarks/bench_freezes.py --trace-stalls).
    """
    if device.type != "cuda":
        return
    import gc

    gc.collect()
    torch.cuda.empty_cache()


#: The one thing a user can do about running out of memory, worded for the CLI and the widgets.
OUT_OF_MEMORY_MESSAGE = "out of memory: try a smaller batch size, or the CPU"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means host or device memory ran out (torch reports some device OOMs
    as a plain RuntimeError), so callers can turn it into advice or retry smaller."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
