"""The library: data, models, training jobs, pseudo-masks, metrics and slides.

Nothing in this package imports Qt or napari; the CLI, the widgets and the tests all use it.

The names in ``__all__`` are the public API. They load lazily (PEP 562): ``import
napari_histo_wsss.core`` imports no torch, and a widget that imports one submodule does not pay
for the others, so napari starts fast. ``from napari_histo_wsss.core import load_predictor``
imports the module that defines it on first use. See docs/architecture.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: Public name -> the submodule (relative to this package) that defines it.
_PUBLIC: dict[str, str] = {
    # Run the whole job.
    "prepare_run": ".pipeline",
    "run_pipeline": ".pipeline",
    # Configuration.
    "RunConfig": ".config.run_config",
    "preset": ".config.presets",
    "with_overrides": ".config.presets",
    # Data.
    "DatasetSpec": ".data.classes",
    "find_dataset": ".data.datasets",
    "load_eval_set": ".data.datasets",
    # Runs.
    "RunDirectory": ".runs.run_dir",
    # Predict and evaluate.
    "SegmentationPredictor": ".inference.predict",
    "load_predictor": ".inference.predict",
    "predict_image": ".inference.predict",
    "evaluate": ".inference.predict",
    "evaluate_mask_folder": ".inference.predict",
    # Slides.
    "Slide": ".wsi.slides",
    "open_slide": ".wsi.slides",
    "segment_slide": ".wsi.slide_inference",
    "segment_slides": ".wsi.slide_inference",
    "open_segmentation": ".wsi.ome_zarr_labels",
    "segmentation_to_geojson": ".wsi.geojson_export",
    "write_geojson": ".wsi.geojson_export",
    # Jobs: events, stopping, draining.
    "Event": ".events",
    "Started": ".events",
    "Batch": ".events",
    "Epoch": ".events",
    "CheckpointSaved": ".events",
    "Preview": ".events",
    "Message": ".events",
    "Done": ".events",
    "StopToken": ".events",
    "run_to_completion": ".events",
    # Errors a user can cause.
    "HistoWsssError": ".errors",
    "DatasetError": ".errors",
    "SlideError": ".errors",
    "CheckpointError": ".errors",
    "ConfigError": ".errors",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Import the defining submodule on first access and cache the name here."""
    try:
        module_name = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

