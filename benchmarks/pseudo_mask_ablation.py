"""The stage-1 ablation in docs/results.md: val pseudo-mask mIoU (label-gated) of a classifier
variant under pseudo-mask recipe variants.

The classifier trains once per run directory (``<method>[-<tag>]-s<seed>``, its settings are
``ClassifierConfig`` fields as ``key=value``); each ``--recipe`` is a set of
``PseudoMaskConfig`` fields (``name:key=value,key=value``, Python literals) scored on the val
images with the classes of each image's mask as its gate, which separates the class maps from
the gate (as ``pseudo_masks/report.json``'s ``label_gated``). Appends one JSON line per recipe
to ``<out>/pseudo_mask_ablation.jsonl``.

    python benchmarks/pseudo_mask_ablation.py ../shared/data/wsss4luad --out runs/ablation \\
        --method esfan --seed 0 --tag e10 --classifier epochs=10 \\
        --recipe "as-preset:" "two-scales:scales=(1.0,2.0),scale_fusion='mean'"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from napari_histo_wsss.core.devices import resolve_device
from napari_histo_wsss.core.pipeline import prepare_run
from napari_histo_wsss.core.runs.stages import CLASSIFIER
from napari_histo_wsss.core.stage1.pseudo_masks import pseudo_mask_report
from napari_histo_wsss.core.stage1.train_classifier import train_classifier
from segmenter_ablation import settings


def recipe(text: str) -> tuple[str, dict]:
    """``"two-scales:scales=(1.0,2.0),scale_fusion='mean'"`` -> (name, PseudoMaskConfig
    changes); commas inside brackets stay with their value."""
    name, _, body = text.partition(":")
    pairs, depth, current = [], 0, ""
    for char in body:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            pairs.append(current)
            current = ""
        else:
            current += char
    return name, settings([pair for pair in [*pairs, current] if pair])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", default="esfan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="names the classifier variant's run folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classifier", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--recipe", nargs="+", default=["as-preset:"], metavar="NAME:K=V,...")
    args = parser.parse_args()

    folder = "-".join(part for part in (args.method, args.tag, f"s{args.seed}") if part)
    run, config, layout = prepare_run(args.data_dir, args.out / folder, args.method,
                                      seed=args.seed, device=args.device,
                                      classifier=settings(args.classifier))
    device = resolve_device(args.device)
    if not run.is_complete(CLASSIFIER):
        patches = layout.patches()
        patches.decode_all()
        list(train_classifier(run, config, patches, device=device))
    val = layout.eval_set("val")
    # Each recipe's report would replace the run's own pseudo_masks/report.json.
    report_path = run.pseudo_mask_root / "report.json"
    saved_report = report_path.read_text() if report_path.is_file() else None
    for text in args.recipe:
        name, changes = recipe(text)
        variant = dataclasses.replace(config, pseudo_masks=dataclasses.replace(
            config.pseudo_masks, gating="label", **changes))
        started = time.perf_counter()
        scores = pseudo_mask_report(run, variant, val, device)
        row = {"method": args.method, "seed": args.seed, "classifier": settings(args.classifier),
               "classifier_epochs": config.classifier.epochs, "recipe": name, "changes": changes,
               "miou": round(100 * scores["miou"], 2),
               "iou": {cls: round(100 * (value["iou"] or 0), 2)
                       for cls, value in scores["per_class"].items()},
               "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(row), flush=True)
        with open(args.out / "pseudo_mask_ablation.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
    if saved_report is not None:
        report_path.write_text(saved_report)


if __name__ == "__main__":
    main()
