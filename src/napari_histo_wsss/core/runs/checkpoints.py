"""One-file checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and JSON-like values: the state dict, the model kind and
its config, the dataset description (class names, colours), normalisation, versions and training
provenance. Nothing in it is an arbitrary pickled object, so opening a checkpoint from someone
else can never run code.
"""

from __future__ import annotations

import pickle
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import __version__
from ..data.classes import DatasetSpec
from ..errors import CheckpointError

FORMAT_VERSION = 1


def first_non_finite(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point entry holding NaN or Inf, else None: weights like
    that come from a diverged training and would predict garbage without a word."""
    for name, tensor in state_dict.items():
        if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                and not _all_finite(tensor)):
            return name
    return None


#: Float types numpy can view without a copy.
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _all_finite(tensor: torch.Tensor) -> bool:
    """Checked in numpy where it can be: one torch op per tensor wakes torch's thread pool
    each time, which made this check of a segmenter's 349 tensors take 0.9 s on a busy
    2-core CPU (3 ms in numpy), once per epoch and on every checkpoint load."""
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(tensor.detach().numpy()).all())
    return bool(torch.isfinite(tensor).all())


def save_checkpoint(
    path: str | Path,
    *,
    kind: str,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    spec: DatasetSpec,
    training: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    average_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + rename) so a crash never leaves half a file.

    ``kind`` names the model family ("classifier", "segmenter", ...); ``training`` holds
    provenance and resume state (epoch, step, best metric, losses, seed); ``average_state``
    the weight average a resumed run continues (``Stepper.average``).
    """
    path = Path(path)
    broken = first_non_finite(state_dict)
    if broken is not None:
        raise CheckpointError(f"not written: weight '{broken}' is NaN or infinite (training "
                              "diverged; the previous file, if any, is kept)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "config": config,
        "dataset": spec.to_dict(),
        "training": training or {},
        "optimizer_state": optimizer_state,
        "average_state": None if average_state is None else {
            k: v.detach().cpu() for k, v in average_state.items()},
        "versions": {
            "napari_histo_wsss": __version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)
    return path


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint safely; ``kind`` checks it holds the expected model family."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running the file's code: never.
        raise CheckpointError(
            "holds Python objects besides weights (a pickle that could run code when opened); "
            "it is refused: use a checkpoint written by napari-histo-wsss", path) from None
    except Exception as error:  # torch raises many types for a bad file; all mean the same
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise CheckpointError(f"not a readable checkpoint ({first_line})", path) from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "kind" not in payload:
        raise CheckpointError("not a napari-histo-wsss checkpoint (no state_dict/kind)", path)
    broken = first_non_finite(payload["state_dict"])
    if broken is not None:
        raise CheckpointError(f"weight '{broken}' is NaN or infinite: the training that wrote "
                              "it diverged; train again with a lower learning rate", path)
    if kind is not None and payload["kind"] != kind:
        raise CheckpointError(
            f"holds a {payload['kind']} model, but a {kind} checkpoint is needed here", path
        )
    return payload


def checkpoint_spec(payload: dict[str, Any]) -> DatasetSpec:
    return DatasetSpec.from_dict(payload["dataset"])


def check_same_classes(payload: dict[str, Any], spec: DatasetSpec, path: str | Path) -> None:
    """Refuse a checkpoint trained on other classes than the dataset at hand."""
    theirs = tuple(payload["dataset"]["class_names"])
    if theirs != spec.class_names:
        raise CheckpointError(
            f"was trained on classes {list(theirs)}, but the dataset has "
            f"{list(spec.class_names)}",
            path,
        )
