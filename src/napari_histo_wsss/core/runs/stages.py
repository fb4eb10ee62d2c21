"""The names of a run's stages: one spelling for ``status.json`` keys and for job events.

Run directories written before the names were unified say ``pseudo_masks`` in their status
file; ``canonical_stage`` reads that as ``pseudo-masks``.
"""

from __future__ import annotations

CLASSIFIER = "classifier"
PSEUDO_MASKS = "pseudo-masks"
#: Self-training: the teacher network and the training patches it relabels.
REFINED_MASKS = "refined-masks"
SEGMENTER_PREFIX = "segmenter:"

#: Status keys of older run directories, by the name that replaced them.
_FORMER_NAMES = {"pseudo_masks": PSEUDO_MASKS}


def segmenter_stage(strategy: str) -> str:
    """The stage that trains ``segmenter/<strategy>/`` ("segmenter:onss")."""
    return f"{SEGMENTER_PREFIX}{strategy}"


def canonical_stage(name: str) -> str:
    """``name`` as this version spells it (older run directories used other keys)."""
    return _FORMER_NAMES.get(name, name)
