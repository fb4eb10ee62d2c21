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

__all__ = [
    # Run the whole job.
    "prepare_run", "run_pipeline",
    # Configuration.
    "RunConfig", "preset", "with_overrides",
    # Data.
    "DatasetSpec", "find_dataset", "load_eval_set",
    # Runs.
    "RunDirectory",
    # Predict and evaluate.
    "SegmentationPredictor", "load_predictor", "predict_image", "evaluate",
    "evaluate_mask_folder",
    # Slides.
    "Slide", "open_slide", "segment_slide", "segment_slides", "open_segmentation",
    "segmentation_to_geojson", "write_geojson",
    # Jobs: events, stopping, draining.
    "Event", "Started", "Batch", "Epoch", "CheckpointSaved", "Preview", "Message", "Done",
    "StopToken", "run_to_completion",
    # Errors a user can cause.
    "HistoWsssError", "DatasetError", "SlideError", "CheckpointError", "ConfigError",
]

#: The submodule (relative to this package) that defines each public name; a test checks that
#: it covers ``__all__`` exactly.
_HOMES: dict[str, tuple[str, ...]] = {
    ".pipeline": ("prepare_run", "run_pipeline"),
    ".config.run_config": ("RunConfig",),
    ".config.presets": ("preset", "with_overrides"),
    ".data.classes": ("DatasetSpec",),
    ".data.datasets": ("find_dataset", "load_eval_set"),
    ".runs.run_dir": ("RunDirectory",),
    ".inference.predict": ("SegmentationPredictor", "load_predictor", "predict_image",
                           "evaluate", "evaluate_mask_folder"),
    ".wsi.slides": ("Slide", "open_slide"),
    ".wsi.slide_inference": ("segment_slide", "segment_slides"),
    ".wsi.ome_zarr_labels": ("open_segmentation",),
    ".wsi.geojson_export": ("segmentation_to_geojson", "write_geojson"),
    ".events": ("Event", "Started", "Batch", "Epoch", "CheckpointSaved", "Preview", "Message",
                "Done", "StopToken", "run_to_completion"),
    ".errors": ("HistoWsssError", "DatasetError", "SlideError", "CheckpointError",
                "ConfigError"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import the defining submodule on first access and cache the name here."""
    try:
        module_name = _HOME_OF[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

