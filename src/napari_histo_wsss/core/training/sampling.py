"""Samplings: which patches an epoch visits, in which order (``SegmenterConfig.sampling``).

A sampling is looked up by name in ``SAMPLINGS`` and maps the patch labels and the epoch's seeded
generator to the epoch's patch indices (as many as there are patches). The order depends on the
seed and the epoch only, so a resumed epoch continues the same order and every rank of a
distributed run shards the same one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..registry import Registry

Sampling = Callable[[np.ndarray, np.random.Generator], np.ndarray]

SAMPLINGS: Registry[Sampling] = Registry("sampling")


@SAMPLINGS.register("uniform")
def uniform_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every patch once, shuffled (the papers)."""
    return rng.permutation(len(labels))


@SAMPLINGS.register("balanced")
def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draws with replacement, each patch weighted by 1 / (number of patches holding its rarest
    class): a class found in 17 of 557 patches is then drawn about as often as one found in
    431, so a rare tissue is not learnt from a handful of steps. A patch without any label
    weighs as much as one of the commonest class."""
    return _by_rarest_class(labels, rng, lambda counts: 1.0 / counts)


@SAMPLINGS.register("sqrt")
def sqrt_balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``balanced`` softened: each patch weighted by 1 / sqrt(number of patches holding its
    rarest class). A class in 17 of 557 patches is drawn about five times as often as under
    ``uniform`` instead of twenty-five, enough to be seen in every epoch without crowding out
    the common classes (``balanced`` cost plain CE 8.9 mIoU, docs/results.md)."""
    return _by_rarest_class(labels, rng, lambda counts: 1.0 / np.sqrt(counts))


def _by_rarest_class(labels: np.ndarray, rng: np.random.Generator,
                     weight_of_count: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """As many draws as patches, with replacement, each patch weighted by its rarest class's
    ``weight_of_count(patches holding it)``; unlabelled patches like the commonest class."""
    count = len(labels)
    holders = labels.astype(bool)
    class_counts = holders.sum(axis=0)
    per_class = np.where(class_counts > 0, weight_of_count(np.maximum(class_counts, 1)), 0.0)
    weights = (holders * per_class).max(axis=1)
    commonest = per_class[per_class > 0].min() if (per_class > 0).any() else 1.0
    weights = np.where(weights > 0, weights, commonest)
    return rng.choice(count, size=count, replace=True, p=weights / weights.sum())


def epoch_order(labels: np.ndarray, sampling: str, seed: int, epoch: int) -> np.ndarray:
    """The patch indices of one epoch under the sampling called ``sampling``."""
    return SAMPLINGS.get(sampling)(labels, np.random.default_rng([seed, epoch]))
