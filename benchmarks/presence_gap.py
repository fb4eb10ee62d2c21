"""How much of a run's val error is *which classes* a region holds, and how much *where* they lie.

The segmenter is scored on val (one confusion matrix, background excluded) as it predicts
alone, then gated four ways on windows of the training-patch size:

- ``classifier gate``: the recipe's ``ClassGate`` (the stage-1 classifier, p > threshold);
- ``classifier gate, overlapping``: the same with windows at half the stride, a class kept at a
  pixel only where every window covering it keeps it;
- ``oracle presence``: the windows gated by the classes that cover at least 5 % of each window
  in the true mask, the rule the WSSS4LUAD training patches were labelled by; with half-stride
  windows too. Information no prediction has: it bounds what a perfect presence test would
  give this segmenter, and the rest of its error is localisation.

    python benchmarks/presence_gap.py RUN_DIR --strategy rec --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from napari_histo_wsss.core.data.classes import DatasetSpec
from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.inference.metrics import ConfusionMatrix
from napari_histo_wsss.core.inference.predict import (
    ClassGate,
    load_predictor,
    predict_image,
    window_origins,
)
from napari_histo_wsss.core.models.classifier import load_classifier
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage1.classifier_choice import PRESENCE_SHARE


class OraclePresence(ClassGate):
    """A gate that reads the true mask (``truth``, set before each image) instead of a
    classifier: a window keeps the classes covering >= ``PRESENCE_SHARE`` of it."""

    def __init__(self, num_classes: int, window: int, stride: int):
        super().__init__(classifier=None, threshold=0.0, window=window, stride=stride)
        self.num_classes = num_classes
        self.truth: np.ndarray | None = None

    def present(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        win_h, win_w = min(self.window, height), min(self.window, width)
        origins = window_origins(height, width, win_h, win_w, self.stride)
        kept = torch.tensor(np.array([
            [(self.truth[y:y + win_h, x:x + win_w] == c).mean() >= PRESENCE_SHARE
             for c in range(self.num_classes)] for y, x in origins]))[None]
        return self.intersect(kept, origins, (height, width), (win_h, win_w))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--strategy", help="segmenter (default: the run's loss)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    run = RunDirectory(args.run_dir)
    config = run.config()
    spec = DatasetSpec.from_dict(config.dataset)
    val = find_dataset(config.data_dir, spec).eval_set("val")
    strategy = args.strategy or config.segmenter.loss
    predictor = load_predictor(run.root, args.device, strategy, use_class_gate=False,
                               use_class_offsets=False)
    classifier, _ = load_classifier(run.classifier_checkpoint, args.device, spec=spec)
    window = predictor.input_size
    threshold = config.segmenter.class_gate or 0.1
    gates = {
        "none": None,
        "classifier gate": ClassGate(classifier.eval(), threshold, window),
        "classifier gate, overlapping": ClassGate(classifier, threshold, window, window // 2),
        "oracle presence": OraclePresence(spec.num_classes, window, window),
        "oracle presence, overlapping": OraclePresence(spec.num_classes, window, window // 2),
    }
    matrices = {name: ConfusionMatrix(spec.num_classes) for name in gates}
    with torch.inference_mode():
        for index in range(len(val)):
            image, truth = val.pair(index)
            for name, gate in gates.items():
                if isinstance(gate, OraclePresence):
                    gate.truth = truth
                predictor.gate = gate
                matrices[name].update(predict_image(predictor, image)[0], truth)
    results = {"run": str(run.root), "strategy": strategy, "window": window,
               "threshold": threshold, "images": len(val), "gates": {}}
    for name, matrix in matrices.items():
        scores = matrix.scores(spec.class_names)
        results["gates"][name] = scores
        per_class = " / ".join(f"{100 * scores['per_class'][c]['iou']:.1f}"
                               for c in spec.class_names)
        print(f"{name:30s} mIoU {100 * scores['miou']:.2f}  ({per_class})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
