"""Inference engines: what runs a segmenter's forward pass when a model only predicts.

On a CPU the model itself bounds prediction, and torch's eager CPU kernels are not the
hardware's limit: the same network exported to ONNX runs faster in ONNX Runtime or OpenVINO
(docs/benchmarks.md). An ``Engine`` maps normalised float32 (N, 3, H, W) inputs to float32
(N, C, H, W) logits; everything around it (padding, TTA, the class gate, softmax, tiling) stays
in torch, so every engine predicts through the same code.

The exported model is cached beside the checkpoint, keyed by the checkpoint's content hash and
the input layout, and re-exported when the checkpoint changes. It is never trusted blindly:
each time an engine is built it is compared with torch on real tissue tiles, and an export or
a check that fails falls back to torch with one line saying why. ONNX Runtime and OpenVINO
are optional (``pip install 'napari-histo-wsss[fast]'``); without them torch runs.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..devices import autocast_dtype
from ..errors import ConfigError
from ..models.ensemble import log_mean_softmax
from .engine_names import ENGINE_CHOICES, EXPORT_ENGINES, PRECISIONS

#: Input layout of the exported model; part of the cache key (a new layout re-exports).
INPUT_LAYOUT = "nchw-float32"
#: An fp32 export must give the same logits as torch within this fraction of the largest
#: logit magnitude (measured: ONNX Runtime 1e-6, OpenVINO 3e-7) ...
EXPORT_TOLERANCE = 1e-3
#: ... and the same label on at least this fraction of the pixels of the real tiles.
EXPORT_MIN_AGREEMENT = 0.999
#: bf16 is used only where its labels agree with fp32 torch on this fraction of the pixels.
BF16_MIN_AGREEMENT = 0.995
INSTALL_HINT = "pip install 'napari-histo-wsss[fast]'"


@dataclass
class Engine:
    """A forward pass: normalised float32 (N, 3, H, W) -> float32 (N, C, H, W) logits."""

    name: str
    precision: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    #: One line for the user: what runs, and why (a fallback, a calibration).
    note: str = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"

    def record(self) -> dict[str, str]:
        """What ran, for a result's metadata (a slide output, a comparison)."""
        return {"name": self.name, "precision": self.precision, "note": self.note}


def check_choice(engine: str, precision: str | None) -> None:
    """Refuse an unknown engine or precision with the valid names."""
    if engine not in ENGINE_CHOICES:
        raise ConfigError(f"unknown inference engine '{engine}': choose one of "
                          f"{', '.join(ENGINE_CHOICES)}")
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}': choose fp32 or bf16")


def installed_engines() -> list[str]:
    """The engines this Python can run: torch always, the exported-model ones if importable."""
    names = ["torch"]
    for name, module in EXPORT_ENGINES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        names.append(name)
    return names


def require_installed(engine: str) -> None:
    if engine not in installed_engines():
        raise ConfigError(f"the {engine} engine is not installed here: {INSTALL_HINT}, or "
                          "use --engine torch")


def torch_engine(model: nn.Module, precision: str, device: torch.device) -> Engine:
    """Eager torch; bf16 through autocast (on CUDA: bf16, or fp16 where bf16 is missing)."""
    dtype = None
    if precision == "bf16":
        dtype = torch.bfloat16 if device.type == "cpu" else autocast_dtype(device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return model(x).logits.float()

    return Engine("torch", precision if dtype is not None else "fp32", forward)


def averaged_with(engine: Engine, companions: list[nn.Module]) -> Engine:
    """``engine``'s network averaged with companion networks run in torch (``core.models.
    ensemble``): log of the mean softmax. The strategy's network is the one worth exporting;
    a companion can be a network that exports only at fixed sizes (PSPNet), which would need
    one export per image size."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return log_mean_softmax([engine(x), *(companion(x).logits
                                                  for companion in companions)])

    note = "; ".join(filter(None, [engine.note, "its companion network runs in torch"]))
    return Engine(engine.name, engine.precision, forward, note)


class LogitsOnly(nn.Module):
    """The segmenter's main logits as a plain tensor output, which is what gets exported."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


@dataclass
class ExportCache:
    """Where exported models live: ``folder`` and the checkpoint's content ``key``."""

    folder: Path
    key: str

    @classmethod
    def beside(cls, checkpoint: str | Path) -> ExportCache:
        """The cache of a checkpoint file: ``<its folder>/engines/``, keyed by its bytes."""
        checkpoint = Path(checkpoint)
        digest = hashlib.sha256()
        with checkpoint.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        return cls(checkpoint.parent / "engines", digest.hexdigest()[:16])

    def model_path(self, size: tuple[int, int] | None) -> Path:
        """The export for inputs of ``size`` (height, width); None: any size."""
        sizes = "any" if size is None else f"{size[0]}x{size[1]}"
        return self.folder / f"segmenter-{self.key}-{INPUT_LAYOUT}-{sizes}.onnx"

    @property
    def fixed_size_marker(self) -> Path:
        """Present when this model exports only at fixed sizes (PSPNet's adaptive pooling)."""
        return self.folder / f"segmenter-{self.key}-{INPUT_LAYOUT}-fixed-size-only"

    def remove_stale(self) -> None:
        """Delete the exports of other checkpoints or layouts: they are never used again."""
        current = f"segmenter-{self.key}-{INPUT_LAYOUT}-"
        for path in self.folder.glob("segmenter-*"):
            if not path.name.startswith(current):
                path.unlink(missing_ok=True)


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1: torch's exporter prints its whole graph there from C++ when
    an export fails, which would garble a command's output (``evaluate --json``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def export_onnx(model: nn.Module, cache: ExportCache, size: tuple[int, int] | None,
                example_size: tuple[int, int]) -> Path:
    """The cached ONNX model of ``model`` for inputs of any batch and of ``size`` (None: any
    height and width, traced at ``example_size``), exported when missing.

    Any size uses torch's TorchScript exporter (seconds, and one export serves every size);
    networks it cannot export (PSPNet's adaptive pooling) are exported per size by the
    ``torch.export`` based exporter, which needs ``onnxscript``.
    """
    path = cache.model_path(size)
    if path.is_file():
        return path
    cache.folder.mkdir(parents=True, exist_ok=True)
    cache.remove_stale()
    partial = path.with_name(path.name + ".partial")
    if size:
        options = {"dynamo": True, "dynamic_shapes": ({0: torch.export.Dim("batch")},),
                   "verbose": False, "opset_version": 18, "external_data": False}
    else:
        axes = {0: "batch", 2: "height", 3: "width"}
        options = {"dynamo": False, "dynamic_axes": {"x": axes, "logits": axes},
                   "opset_version": 17}
    try:
        # Exports may be made mid-prediction, under inference mode, which tracing cannot use.
        with warnings.catch_warnings(), _quiet_stdout(), torch.inference_mode(False):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            example = torch.zeros(2, 3, *(size or example_size))
            torch.onnx.export(LogitsOnly(model).eval(), (example,), str(partial),
                              input_names=["x"], output_names=["logits"], **options)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)  # a half-written export is never found
    return path


Runner = Callable[[torch.Tensor], torch.Tensor]


def onnxruntime_runner(path: Path, precision: str) -> Runner:
    """ONNX Runtime's CPU provider (fp32 only: its CPU kernels have no bf16 convolutions)."""
    if precision != "fp32":
        raise ConfigError("the onnxruntime engine runs fp32 only; for bf16 use --engine "
                          "openvino or torch")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        inputs = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {"x": inputs})[0])

    return run


def openvino_runner(path: Path, precision: str) -> Runner:
    """OpenVINO on the CPU; its precision hint picks fp32 or bf16 kernels."""
    import openvino

    core = openvino.Core()
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        inputs = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        result = request.infer({0: inputs})
        return torch.from_numpy(np.array(result[compiled.output(0)], dtype=np.float32))

    return run


RUNNERS: dict[str, Callable[[Path, str], Runner]] = {
    "onnxruntime": onnxruntime_runner, "openvino": openvino_runner}


class ExportedForward:
    """``model``'s forward pass through its export in engine ``name``.

    One export serves every input size where the network allows it; networks whose pooling
    needs a fixed size (PSPNet) get one export per input size, made on first use and checked
    against torch on that first input (torch then serves that size if the check fails).
    """

    def __init__(self, model: nn.Module, name: str, precision: str, cache: ExportCache | None):
        self.model, self.name, self.precision = model, name, precision
        self._temporary = None
        if cache is None:  # a model without a checkpoint file: a private, temporary cache
            self._temporary = tempfile.TemporaryDirectory(prefix="histo-wsss-export-")
            cache = ExportCache(Path(self._temporary.name), "unsaved")
        self.cache = cache
        self._runners: dict[tuple[int, int] | None, Runner] = {}
        self.fallback_sizes: list[tuple[int, int]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        runner = self._runners.get(None) or self._runners.get(size)
        if runner is not None:
            return runner(x)
        return self._first_at_size(x, size)

    def prepare(self, size: tuple[int, int]) -> None:
        """Export (or load the export) for inputs of ``size``; raises when export fails."""
        if not self.cache.fixed_size_marker.is_file():
            try:
                path = export_onnx(self.model, self.cache, None, size)
                self._runners[None] = RUNNERS[self.name](path, self.precision)
                return
            except Exception:  # noqa: BLE001 - retried at a fixed size below
                self.cache.folder.mkdir(parents=True, exist_ok=True)
                self.cache.fixed_size_marker.touch()
        path = export_onnx(self.model, self.cache, size, size)
        self._runners[size] = RUNNERS[self.name](path, self.precision)

    def _first_at_size(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A new input size of a fixed-size network: export, then check on this input."""
        with torch.inference_mode():
            reference = self.model(x).logits.float()
        try:
            self.prepare(size)
            check_against_torch(Engine(self.name, self.precision, self._runners[size]),
                                x, reference)
        except Exception:  # noqa: BLE001 - this size runs in torch instead
            self._runners[size] = lambda inputs: self.model(inputs).logits.float()
            self.fallback_sizes.append(size)
        return reference


def label_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of pixels whose most probable class is the same in both."""
    return float((logits.argmax(dim=1) == reference.argmax(dim=1)).float().mean())


def check_against_torch(engine: Engine, tiles: torch.Tensor, reference: torch.Tensor) -> None:
    """Raise ``ValueError`` saying how ``engine`` differs from fp32 torch on real ``tiles``."""
    logits = engine(tiles)
    if logits.shape != reference.shape:
        raise ValueError(f"output shape {tuple(logits.shape)}, torch gives "
                         f"{tuple(reference.shape)}")
    agreement = label_agreement(logits, reference)
    if engine.precision == "bf16":
        if agreement < BF16_MIN_AGREEMENT:
            raise ValueError(f"bf16 labels agree with fp32 on {100 * agreement:.2f} % of the "
                             f"pixels (< {100 * BF16_MIN_AGREEMENT:.1f} %)")
        return
    scale = max(1.0, float(reference.abs().max()))
    difference = float((logits - reference).abs().max()) / scale
    if difference > EXPORT_TOLERANCE or agreement < EXPORT_MIN_AGREEMENT:
        raise ValueError(f"logits differ from torch by {difference:.2g} of their range, "
                         f"labels agree on {100 * agreement:.2f} % of the pixels")


def exported_engine(model: nn.Module, name: str, precision: str, cache: ExportCache | None,
                    tiles: torch.Tensor, reference: torch.Tensor) -> Engine:
    """``name`` running ``model``'s export, checked on ``tiles`` against torch's
    ``reference`` logits; raises ``ValueError`` or the exporter's error when either fails."""
    forward = ExportedForward(model, name, precision, cache)
    forward.prepare((int(tiles.shape[-2]), int(tiles.shape[-1])))
    engine = Engine(name, precision, forward)
    check_against_torch(engine, tiles, reference)
    return engine
