"""Comparing a run's trained strategies on one image: predictions, scores and trust maps.

The napari Compare widget and ``histo-wsss compare`` both show this; the figures come from
here so the two never disagree. With the image's mask each strategy is scored (one confusion
matrix, background excluded); with a training patch's name and label each strategy's trust
map shows which pseudo-mask pixels its loss believed (``trust_maps``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..devices import resolve_device
from ..errors import ConfigError, DatasetError
from ..events import StopToken
from ..inference.metrics import ConfusionMatrix
from ..inference.predict import SegmentationPredictor, load_predictor, predict_image
from ..runs.model_cache import ModelCache
from ..runs.run_dir import RunDirectory
from .trust_maps import strategy_trust_map


@dataclass
class StrategyComparison:
    """One strategy's result on the compared image."""

    strategy: str
    labels: np.ndarray  # (H, W) uint8 class indices
    scores: dict[str, Any] | None = None  # ``ConfusionMatrix.scores`` when a mask was given
    trust: np.ndarray | None = None  # (H, W) float32 loss weights on a training patch
    #: What ran the network (``Engine.record``: name, precision, note).
    engine: dict[str, str] | None = None

    @property
    def miou(self) -> float | None:
        return None if self.scores is None else self.scores["miou"]

    @property
    def per_class_iou(self) -> dict[str, float] | None:
        if self.scores is None:
            return None
        return {name: values["iou"] for name, values in self.scores["per_class"].items()}


def chosen_strategies(run: RunDirectory, strategies: Sequence[str] | None) -> list[str]:
    """``strategies`` checked against the run's trained segmenters (all of them when None)."""
    trained = run.segmenter_strategies()
    if not trained:
        raise ConfigError("this run has no trained segmenter to compare yet", run.root)
    if not strategies:
        return trained
    unknown = [name for name in strategies if name not in trained]
    if unknown:
        raise ConfigError(f"no trained segmenter {', '.join(map(repr, unknown))} in this run; "
                          f"trained: {', '.join(trained)}", run.root)
    return list(strategies)


def check_mask_fits(truth: np.ndarray, image: np.ndarray, path: Any = None) -> None:
    """Refuse a mask (read from ``path``) that is not the image's size."""
    if truth.shape != image.shape[:2]:
        raise DatasetError(f"the mask is {truth.shape[1]}x{truth.shape[0]} but the image is "
                           f"{image.shape[1]}x{image.shape[0]}", path)


def iter_comparisons(
    run: RunDirectory,
    image: np.ndarray,
    strategies: Sequence[str] | None = None,
    *,
    truth: np.ndarray | None = None,
    patch: tuple[str, np.ndarray] | None = None,
    device: Any = "auto",
    models: ModelCache | None = None,
    stop: StopToken | None = None,
    engine: str = "torch",
    precision: str | None = None,
    on_engine: Callable[[SegmentationPredictor], None] | None = None,
) -> Iterator[StrategyComparison]:
    """Each strategy's comparison in turn (a caller can show one while the next is computed).

    ``truth`` (H, W) class indices scores the predictions; ``patch`` (training patch name,
    image-level label) adds trust maps; ``models`` keeps loaded predictors between calls;
    a requested ``stop`` ends the iteration before the next strategy. ``engine`` and
    ``precision`` choose what runs the networks (``load_predictor``); ``on_engine`` is told
    each newly loaded predictor (to show which engine runs it).
    """
    names = chosen_strategies(run, strategies)
    device = resolve_device(device) if isinstance(device, str | None) else device
    models = models or ModelCache()
    if truth is not None:
        check_mask_fits(truth, image)
    for strategy in names:
        if stop is not None and stop.requested:
            return
        predictor = models.get(run.segmenter_checkpoint(strategy), (device, engine, precision),
                               lambda s=strategy: _loaded(run, s, device, engine, precision,
                                                          on_engine))
        labels, _ = predict_image(predictor, image)
        result = StrategyComparison(strategy, labels, engine=predictor.engine.record())
        if truth is not None:
            matrix = ConfusionMatrix(predictor.spec.num_classes)
            matrix.update(labels, truth)
            result.scores = matrix.scores(predictor.spec.class_names)
        if patch is not None:
            result.trust = strategy_trust_map(run, strategy, image, *patch, device)
        yield result


def _loaded(run, strategy, device, engine, precision, on_engine) -> SegmentationPredictor:
    predictor = load_predictor(run.root, device, strategy=strategy, engine=engine,
                               precision=precision)
    if on_engine is not None:
        on_engine(predictor)
    return predictor


def compare_strategies(run: RunDirectory, image: np.ndarray,
                       strategies: Sequence[str] | None = None, **options: Any
                       ) -> dict[str, StrategyComparison]:
    """Every chosen strategy's comparison by name (``iter_comparisons`` for the options)."""
    return {result.strategy: result
            for result in iter_comparisons(run, image, strategies, **options)}


def disagreement(results: Sequence[StrategyComparison]) -> np.ndarray:
    """(H, W) bool: where the strategies do not all predict the same class."""
    stacked = np.stack([result.labels for result in results])
    return np.any(stacked != stacked[:1], axis=0)
