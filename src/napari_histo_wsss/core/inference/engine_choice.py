"""Choosing the inference engine: the one asked for, or (``auto``) the fastest that is
installed and predicts like fp32 torch on real tissue.

``auto`` times every candidate (torch fp32; torch bf16 and OpenVINO bf16 where oneDNN has bf16
kernels for the CPU; ONNX Runtime and OpenVINO fp32 where installed) on a real tile of the bundled
CMU-1 slide, after checking each one against fp32 torch on real tiles: an export must match its
logits, bf16 must give the same labels on ``BF16_MIN_AGREEMENT`` of the pixels. The choice is
saved beside the export, keyed by the checkpoint and this machine, so later runs skip the
timing. On a GPU, torch runs with bf16 autocast (fp16 where bf16 is missing) as before.
"""

from __future__ import annotations

import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..devices import autocast_dtype, cpu_has_native_bf16
from ..errors import ConfigError
from ..models.segmenter import normalise
from .engine_names import ENGINE_ENV_VAR, EXPORT_ENGINES
from .engines import (
    Engine,
    ExportCache,
    check_against_torch,
    check_choice,
    exported_engine,
    installed_engines,
    require_installed,
    torch_engine,
)

#: Side of the real tiles engines are checked and timed on (the slide command's tile).
CALIBRATION_TILE = 512
TIMED_RUNS = 3
REAL_TISSUE = Path(__file__).resolve().parents[2] / "sample_data" / "cmu-1-small-region-pyramid.tif"


@lru_cache(maxsize=4)
def real_tiles(side: int) -> np.ndarray:
    """Two uint8 (side, side, 3) crops of real H&E (CMU-1, level 0 of the bundled region)."""
    import tifffile

    with tifffile.TiffFile(REAL_TISSUE) as tiff:
        region = tiff.series[0].levels[0].asarray()
    height, width = region.shape[:2]
    side_y, side_x = min(side, height), min(side, width)
    tops = (height // 3 - side_y // 2, 2 * height // 3 - side_y // 2)
    left = max(0, width // 2 - side_x // 2)
    crops = [region[max(0, top):max(0, top) + side_y, left:left + side_x] for top in tops]
    return np.stack(crops)


def build_engine(model: nn.Module, engine: str = "torch", precision: str | None = None, *,
                 device: torch.device, mean, std, cache: ExportCache | None = None,
                 tile: int = CALIBRATION_TILE) -> Engine:
    """The engine that runs ``model`` (normalised with ``mean``/``std``) for prediction.

    An explicit exported engine that is not installed is refused; one whose export or check
    fails falls back to torch and says so in ``Engine.note``. ``HISTO_WSSS_ENGINE`` overrides
    ``engine``.
    """
    engine = (os.environ.get(ENGINE_ENV_VAR) or engine).strip().lower()
    check_choice(engine, precision)
    if device.type != "cpu":
        if engine not in ("auto", "torch"):
            raise ConfigError(f"the {engine} engine runs on the CPU; use --device cpu or "
                              "--engine torch")
        default = "bf16" if autocast_dtype(device) is not None else "fp32"
        return torch_engine(model, precision or default, device)
    if engine == "torch":
        return torch_engine(model, precision or "fp32", device)
    if engine != "auto":
        require_installed(engine)
        if engine == "onnxruntime" and precision == "bf16":
            raise ConfigError("the onnxruntime engine runs fp32 only; for bf16 use --engine "
                              "openvino or torch")
    tiles, reference = _reference(model, device, mean, std, tile)
    if engine == "auto":
        return _calibrated(model, precision, device, cache, tiles, reference)
    try:
        return exported_engine(model, engine, precision or "fp32", cache, tiles, reference)
    except Exception as error:  # noqa: BLE001 - any failure of a third-party exporter/runtime
        fallback = torch_engine(model, "fp32", device)
        fallback.note = f"{engine} not used ({_reason(error)}): running torch fp32"
        return fallback


def _reference(model, device, mean, std, tile) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised real tiles, fp32 torch logits on them): what every engine is checked on."""
    tiles = normalise(torch.from_numpy(real_tiles(tile)).to(device), mean, std)
    with torch.inference_mode():
        reference = model(tiles).logits.float()
    return tiles, reference


def _reason(error: BaseException) -> str:
    """An exception as a short clause for a one-line note."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def candidates(precision: str | None) -> list[tuple[str, str]]:
    """(engine, precision) pairs worth timing here, torch fp32 first (the baseline)."""
    installed = installed_engines()
    bf16 = cpu_has_native_bf16()
    pairs = [("torch", "fp32")]
    if bf16:
        pairs.append(("torch", "bf16"))
    for name in EXPORT_ENGINES:
        if name in installed:
            pairs.append((name, "fp32"))
            if name == "openvino" and bf16:
                pairs.append((name, "bf16"))
    return [pair for pair in pairs if precision is None or pair[1] == precision] \
        or [("torch", precision or "fp32")]


def _calibrated(model, precision, device, cache, tiles, reference) -> Engine:
    """The fastest candidate that passes its check; the saved choice when there is one."""
    saved = _saved_choice(cache, precision)
    if saved is not None:
        try:
            engine = _candidate(model, *saved["choice"], device, cache, tiles, reference)
            engine.note = saved["note"]
            return engine
        except Exception:  # noqa: BLE001 - the saved choice no longer works: time again
            pass
    timed, refused = [], []
    for name, chosen_precision in candidates(precision):
        try:
            engine = _candidate(model, name, chosen_precision, device, cache, tiles, reference)
        except Exception as error:  # noqa: BLE001 - a candidate that fails is skipped
            refused.append(f"{name} {chosen_precision}: {_reason(error)}")
            continue
        timed.append((_seconds_per_tile(engine, tiles[:1]), engine))
    if not timed:  # only bf16 was asked for, and no bf16 engine predicts like fp32 here
        fallback = torch_engine(model, "fp32", device)
        fallback.note = f"no engine passed its check ({'; '.join(refused)}): running torch fp32"
        return fallback
    baseline = timed[0][0] if timed[0][1].label == "torch fp32" else None
    seconds, best = min(timed, key=lambda pair: pair[0])
    speed = f", {baseline / seconds:.1f}x torch fp32" if baseline else ""
    best.note = f"engine {best.label} (auto{speed} on a real tile)" + (
        f"; not used: {'; '.join(refused)}" if refused else "")
    _save_choice(cache, precision, best)
    return best


def _candidate(model, name, precision, device, cache, tiles, reference) -> Engine:
    if name == "torch":
        engine = torch_engine(model, precision, device)
        if precision != "fp32":
            check_against_torch(engine, tiles, reference)
        return engine
    return exported_engine(model, name, precision, cache, tiles, reference)


def _seconds_per_tile(engine: Engine, tile: torch.Tensor) -> float:
    """Median wall time of one forward pass on ``tile``, after one warm-up."""
    with torch.inference_mode():
        engine(tile)
        times = []
        for _ in range(TIMED_RUNS):
            started = time.perf_counter()
            engine(tile)
            times.append(time.perf_counter() - started)
    return float(np.median(times))


def machine_fingerprint() -> dict:
    """What makes a calibration valid: the CPU, the thread count and the engines' versions."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"torch": torch.__version__}
    for name in installed_engines()[1:]:
        versions[name] = getattr(__import__(EXPORT_ENGINES[name]), "__version__", "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "versions": versions}


def _choice_path(cache: ExportCache) -> Path:
    return cache.folder / f"calibration-{cache.key}.json"


def _saved_choice(cache: ExportCache | None, precision: str | None) -> dict | None:
    if cache is None or not _choice_path(cache).is_file():
        return None
    try:
        saved = json.loads(_choice_path(cache).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    fits = saved.get("machine") == machine_fingerprint() and saved.get("precision") == precision
    return saved if fits and isinstance(saved.get("choice"), list) else None


def _save_choice(cache: ExportCache | None, precision: str | None, engine: Engine) -> None:
    """Keep the choice for the next run on this machine (a cache: failing to write is fine)."""
    if cache is None:
        return
    from ..runs.outputs import atomic_write_text

    record = {"choice": [engine.name, engine.precision], "precision": precision,
              "note": engine.note, "machine": machine_fingerprint()}
    try:
        cache.folder.mkdir(parents=True, exist_ok=True)
        for stale in cache.folder.glob("calibration-*.json"):
            stale.unlink()
        atomic_write_text(_choice_path(cache), json.dumps(record, indent=2))
    except OSError:
        pass
