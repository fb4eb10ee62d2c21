"""A simulated annotator: how much a few brush strokes per image improve a trained run.

The val images are split in two halves (alternating by name). On one half (``--annotate``) the
annotator looks at the run's prediction and draws k strokes per image on the largest wrongly
predicted regions, using the true masks: each stroke is a path of brush dabs (a disk of
``--radius`` pixels) about ``--length`` pixels long along the region's long axis, kept inside
the region, in the region's true class. The segmenter is fine-tuned on the strokes
(``core.corrections``) and scored on the **other half only**, which no stroke touched. For each
k also: class offsets fitted on the strokes alone (``core.corrections.calibrate``, no
fine-tune), scored on the other half against the run's predictor without its val-fitted offsets.
The strokes are drawn where that predictor (what a user without val masks sees in napari) is
wrong. Also measured: the time of each fine-tune, and whether correcting images in review-queue
order beats a random order for the same number of strokes (mIoU gained per stroke). With
``--here``, also what the strokes do to their own image without retraining (the prediction that
follows them in napari, ``SegmentationPredictor.finish``): the annotated half's mIoU on the
pixels nobody painted, before and after, with the run's shipped predictor.

    python benchmarks/bench_corrections.py runs/base --strokes 0,1,3,10 --json out.json
    python benchmarks/bench_corrections.py runs/base --strokes 1,3,10 --here --no-finetune \
        --order-images 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from napari_histo_wsss.core.corrections.calibrate import StrokeTargets
from napari_histo_wsss.core.corrections.finetune import (
    corrected_strategy,
    finetune_with_corrections,
)
from napari_histo_wsss.core.corrections.recipe import FINETUNE_EPOCHS
from napari_histo_wsss.core.corrections.review import review_queue
from napari_histo_wsss.core.corrections.store import Correction
from napari_histo_wsss.core.data.classes import DatasetSpec
from napari_histo_wsss.core.data.datasets import EvalSet, find_dataset
from napari_histo_wsss.core.events import run_to_completion
from napari_histo_wsss.core.inference.calibration import MAX_PIXELS, choose_offsets
from napari_histo_wsss.core.inference.metrics import ConfusionMatrix
from napari_histo_wsss.core.inference.predict import (
    CLASS_OFFSETS_FILE,
    evaluate,
    load_predictor,
    predict_image,
)
from napari_histo_wsss.core.runs.run_dir import RunDirectory


def stroke_on(region: np.ndarray, radius: int, length: int) -> np.ndarray:
    """A brush path inside ``region`` (bool): dabs along its principal axis through its most
    interior pixel, at most ``length`` pixels long."""
    from scipy.ndimage import distance_transform_edt
    from skimage.draw import disk

    inside = distance_transform_edt(region)
    centre = np.array(np.unravel_index(int(np.argmax(inside)), region.shape), float)
    points = np.argwhere(region).astype(float)
    if len(points) > 2:
        _, _, axes = np.linalg.svd(points - points.mean(axis=0), full_matrices=False)
        direction = axes[0]
    else:
        direction = np.array([0.0, 1.0])
    painted = np.zeros(region.shape, bool)
    for step in np.arange(-length / 2, length / 2 + 1, max(1, radius // 2)):
        y, x = np.round(centre + step * direction).astype(int)
        if 0 <= y < region.shape[0] and 0 <= x < region.shape[1] and region[y, x]:
            painted[disk((y, x), radius, shape=region.shape)] = True
    return painted & region


def simulated_strokes(prediction: np.ndarray, truth: np.ndarray, spec: DatasetSpec, k: int,
                      radius: int, length: int) -> np.ndarray:
    """Labels (0-ignore convention) of ``k`` strokes on the largest wrong regions."""
    from skimage.measure import label

    labels = np.zeros(truth.shape, np.uint8)
    wrong = (prediction != truth) & (truth < spec.num_classes)
    regions = []
    for value in range(spec.num_classes):
        components = label(wrong & (truth == value), connectivity=1)
        for index in range(1, components.max() + 1):
            region = components == index
            regions.append((int(region.sum()), value, region))
    regions.sort(key=lambda entry: -entry[0])
    for _, value, region in regions[:k]:
        labels[stroke_on(region, radius, length)] = value + 1
    return labels


def split_halves(eval_set: EvalSet) -> tuple[EvalSet, EvalSet]:
    first = EvalSet(eval_set.image_paths[0::2], eval_set.mask_paths[0::2], eval_set.spec)
    second = EvalSet(eval_set.image_paths[1::2], eval_set.mask_paths[1::2], eval_set.spec)
    return first, second


def strokes_here(run, strategy, pairs, spec, ks, args) -> list[dict]:
    """mIoU of the annotated images on their unpainted pixels, as shipped and with k strokes
    on each image refining its own prediction (no retraining)."""
    shipped = load_predictor(run.root, args.device, strategy)
    # The network once per image, refined again for each k (as the widget does).
    networks = [shipped.network_probabilities(image[None])[0] for image, _ in pairs]
    predictions = [shipped.finish(network, image).argmax(axis=0)
                   for network, (image, _) in zip(networks, pairs, strict=True)]
    rows = []
    for k in (k for k in ks if k > 0):
        before, after = ConfusionMatrix(spec.num_classes), ConfusionMatrix(spec.num_classes)
        started, painted = time.perf_counter(), 0
        for (image, truth), network, prediction in zip(pairs, networks, predictions,
                                                        strict=True):
            strokes = simulated_strokes(prediction, truth, spec, k, args.radius, args.length)
            unpainted = np.where(strokes > 0, 255, truth).astype(np.uint8)
            before.update(prediction, unpainted)
            after.update(shipped.finish(network, image, strokes).argmax(axis=0), unpainted)
            painted += int(np.count_nonzero(strokes))
        seconds = (time.perf_counter() - started) / len(pairs)  # strokes and refinement
        rows.append({"k": k, "miou_before": before.scores()["miou"],
                     "miou_after": after.scores()["miou"], "painted_pixels": painted,
                     "seconds_per_image": seconds})
        print(f"here, k={k}: unpainted pixels of the {len(pairs)} annotated images "
              f"{100 * rows[-1]['miou_before']:.2f} -> {100 * rows[-1]['miou_after']:.2f}, "
              f"{seconds:.2f} s per image")
    return rows


def finetune_and_score(run, config, layout, corrections, strategy, epochs, second, device):
    """Held-out scores of the fine-tuned network raw (as the base is scored) and as it
    predicts: its class offsets refitted on the strokes alone (no val masks), the run's gate
    choice and appearance model."""
    started = time.perf_counter()
    done = run_to_completion(finetune_with_corrections(
        run, config, layout.patches(), strategy=strategy, corrections=corrections,
        epochs=epochs, device=device, resume=False))
    seconds = time.perf_counter() - started
    predictor = load_predictor(done, device, corrected_strategy(strategy),
                               use_class_gate=False, use_class_offsets=False)  # as the base
    # Where the strokes were too few to refit the offsets, the fine-tune keeps its base's,
    # which were fitted on the masks of both halves: a user without val masks has none.
    offsets = done.parent / CLASS_OFFSETS_FILE
    refitted = offsets.is_file() and json.loads(offsets.read_text()).get("corrected_images")
    shipped = load_predictor(done, device, corrected_strategy(strategy),
                             use_class_offsets=bool(refitted))
    return evaluate(predictor, second), seconds, evaluate(shipped, second)["miou"]


def calibrated_score(predictor, corrections, second) -> tuple[float, list[float] | None]:
    """Held-out mIoU of ``predictor`` (no class offsets) with offsets fitted on the strokes'
    targets alone (``core.corrections.calibrate``, no fine-tune), and those offsets."""
    targets = StrokeTargets(corrections)
    record = choose_offsets(targets.samples(predictor, MAX_PIXELS // max(len(targets), 1)),
                            predictor.spec.class_names)
    predictor.class_offsets = np.asarray(record["offsets"], np.float32) if record["use"] \
        else None
    try:
        return evaluate(predictor, second)["miou"], record["offsets"] if record["use"] else None
    finally:
        predictor.class_offsets = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--strategy", help="segmenter to start from (default: the run's loss)")
    parser.add_argument("--strokes", default="0,1,3,10")
    parser.add_argument("--order-images", type=int, default=5,
                        help="images corrected (3 strokes each) in review vs random order "
                             "(0: skip that comparison)")
    parser.add_argument("--epochs", type=int, default=FINETUNE_EPOCHS)
    parser.add_argument("--radius", type=int, default=4)
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--here", action="store_true",
                        help="also measure the strokes on their own image, no retraining")
    parser.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True,
                        help="fine-tune and score the other half for each k (default on)")
    parser.add_argument("--annotate", choices=("first", "second"), default="first",
                        help="which half of val is annotated; the other is scored")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    run = RunDirectory(args.run_dir)
    config = run.config()
    spec = DatasetSpec.from_dict(config.dataset)
    layout = find_dataset(config.data_dir, spec)
    strategy = args.strategy or config.segmenter.loss
    first, second = split_halves(layout.eval_set("val"))
    if args.annotate == "second":
        first, second = second, first
    # The raw model, as the fine-tuned one is scored (no gate, no val-fitted offsets).
    base = load_predictor(run.root, args.device, strategy, use_class_gate=False,
                          use_class_offsets=False)
    pairs = [first.pair(i) for i in range(len(first))]
    results = {"run": str(run.root), "strategy": strategy, "epochs": args.epochs,
               "annotated": args.annotate,
               "annotated_images": len(first), "scored_images": len(second),
               "radius": args.radius, "length": args.length,
               "base_miou": None, "by_strokes": [], "order": {}}
    ks = [int(v) for v in args.strokes.split(",")]
    if args.here:
        results["here"] = strokes_here(run, strategy, pairs, spec, ks, args)
    # As a user without val masks sees the run: its gate choice and appearance model, no
    # class offsets (the run's were fitted on the masks of both halves); strokes go where
    # that is wrong.
    uncalibrated = load_predictor(run.root, args.device, strategy, use_class_offsets=False)
    predictions = [predict_image(uncalibrated, image)[0] for image, _ in pairs]
    base_scores = evaluate(base, second)
    results["base_miou"] = base_scores["miou"]
    print(f"base: mIoU {100 * base_scores['miou']:.2f} on {len(second)} held-out images")

    def corrections_for(indices, k):
        made = []
        for i in indices:
            labels = simulated_strokes(predictions[i], pairs[i][1], spec, k, args.radius,
                                       args.length)
            if labels.any():
                made.append(Correction(first.image_paths[i], labels, author="simulated"))
        return made

    results["uncalibrated_miou"] = evaluate(uncalibrated, second)["miou"]
    print(f"without class offsets: mIoU {100 * results['uncalibrated_miou']:.2f}")
    for k in ks:
        if k == 0:
            results["by_strokes"].append({"k": 0, "miou": base_scores["miou"], "seconds": 0.0,
                                          "painted_pixels": 0})
            continue
        corrections = corrections_for(range(len(first)), k)
        row = {"k": k, "painted_pixels": sum(c.painted for c in corrections)}
        started = time.perf_counter()
        row["calibrated_miou"], row["offsets"] = calibrated_score(uncalibrated, corrections,
                                                                  second)
        row["calibration_seconds"] = time.perf_counter() - started  # with the scoring
        print(f"k={k}: offsets from the strokes alone {row['offsets']}: mIoU "
              f"{100 * row['calibrated_miou']:.2f} "
              f"({100 * (row['calibrated_miou'] - results['uncalibrated_miou']):+.2f})")
        if args.finetune:
            scores, row["seconds"], row["finetuned_shipped_miou"] = finetune_and_score(
                run, config, layout, corrections, strategy, args.epochs, second, args.device)
            row.update(miou=scores["miou"], per_class=scores["per_class"])
            gain = scores["miou"] - base_scores["miou"]
            print(f"k={k}: fine-tuned, raw mIoU {100 * scores['miou']:.2f} ({100 * gain:+.2f}), "
                  f"as it predicts {100 * row['finetuned_shipped_miou']:.2f}, fine-tune "
                  f"{row['seconds']:.0f} s, {row['painted_pixels']} painted px")
        results["by_strokes"].append(row)

    chosen = {}
    if args.order_images > 0:
        queue = review_queue(base, first.image_paths)
        order = {str(p.resolve()): i for i, p in enumerate(first.image_paths)}
        chosen = {"review": [order[item.image] for item in queue[:args.order_images]],
                  "random": np.random.default_rng(args.seed).permutation(len(first))[
                      :args.order_images].tolist()}
    for name, indices in chosen.items():
        corrections = corrections_for(indices, 3)
        strokes = 3 * len(indices)
        scores, seconds, shipped = finetune_and_score(run, config, layout, corrections,
                                                      strategy, args.epochs, second,
                                                      args.device)
        gain = scores["miou"] - base_scores["miou"]
        results["order"][name] = {"images": [first.image_paths[i].name for i in indices],
                                  "miou": scores["miou"], "gain_per_stroke": gain / strokes,
                                  "finetuned_shipped_miou": shipped, "seconds": seconds}
        print(f"{name} order, {len(indices)} images x 3 strokes: mIoU {100 * scores['miou']:.2f}"
              f" ({100 * gain:+.2f}, {100 * gain / strokes:+.3f} per stroke), as it predicts "
              f"{100 * shipped:.2f}")
    _write_json(args.json, results)


def _write_json(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
