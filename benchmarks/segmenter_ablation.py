"""One row of the stage-2 ablation in docs/results.md: a segmenter variant on a preset's
pseudo-masks, with val mIoU after every epoch.

Stage 1 (classifier, pseudo-masks, their val report) runs once per run directory
(``<method>[-<tag>]-s<seed>``) and is reused; each variant trains into ``segmenter/<name>/`` of
that run. Settings are ``SegmenterConfig`` fields as ``key=value`` (Python literals);
``--pseudo-masks`` changes the recipe of a new run folder (name it with ``--tag``), and
``--classifier-from`` copies a finished run's classifier instead of training the same one again
(stage 1 is deterministic for a seed). Appends one JSON line per variant to
``<out>/ablation.jsonl``.

    python benchmarks/segmenter_ablation.py ../shared/data/wsss4luad --out runs/ablation \\
        --method esfan --seed 0 --name ce_histo_ema \\
        --set arch=deeplabv3plus encoder_depth=None head_lr_mult=10.0 loss=ce epochs=12 \\
              augment=histo weight_average=0.99
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
from dataclasses import replace
from pathlib import Path

from napari_histo_wsss.core.devices import resolve_device
from napari_histo_wsss.core.pipeline import prepare_run
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.runs.stages import CLASSIFIER, PSEUDO_MASKS
from napari_histo_wsss.core.stage1.pseudo_masks import generate_pseudo_masks, pseudo_mask_report
from napari_histo_wsss.core.stage1.train_classifier import train_classifier
from napari_histo_wsss.core.stage2.train_segmenter import train_segmenter


def settings(pairs: list[str]) -> dict:
    """``["epochs=12", "loss=ce"]`` -> ``{"epochs": 12, "loss": "ce"}``."""
    parsed = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key] = value
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", default="esfan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", required=True, help="the variant's segmenter folder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="", help="names a stage-1 variant's run folder")
    parser.add_argument("--schedule", default="fast",
                        help="the preset's schedule (fast, long, paper); not fast names the folder")
    parser.add_argument("--pseudo-masks", nargs="*", default=[], metavar="KEY=VALUE",
                        help="PseudoMaskConfig changes for a new run folder")
    parser.add_argument("--classifier-from", type=Path,
                        help="a run of the same method and seed whose classifier to copy")
    args = parser.parse_args()

    schedule_tag = "" if args.schedule == "fast" else args.schedule
    folder = "-".join(part for part in (args.method, schedule_tag, args.tag, f"s{args.seed}")
                      if part)
    run, config, layout = prepare_run(args.data_dir, args.out / folder, args.method,
                                      seed=args.seed, device=args.device,
                                      schedule=args.schedule,
                                      pseudo_masks=settings(args.pseudo_masks))
    device = resolve_device(args.device)
    patches, val = layout.patches(), layout.eval_set("val")
    patches.decode_all()
    if args.classifier_from and not run.is_complete(CLASSIFIER):
        source = RunDirectory(args.classifier_from)
        shutil.copytree(source.classifier_dir, run.classifier_dir, dirs_exist_ok=True)
        run.mark_complete(CLASSIFIER, copied_from=str(source.root))
    if not run.is_complete(CLASSIFIER):
        list(train_classifier(run, config, patches, device=device))
    if not run.is_complete(PSEUDO_MASKS):
        list(generate_pseudo_masks(run, config, patches, device=device))
        pseudo_mask_report(run, config, val, device)
    variant = replace(config, segmenter=replace(config.segmenter, **settings(args.set)))
    list(train_segmenter(run, variant, patches, strategy=args.name, device=device,
                         resume=False, val=val))
    metrics = json.loads((run.segmenter_dir(args.name) / "metrics.json").read_text())
    report = json.loads((run.pseudo_mask_root / "report.json").read_text())
    history = [round(100 * entry["miou"], 2) for entry in metrics["history"]]
    row = {"method": args.method, "tag": args.tag, "schedule": args.schedule,
           "seed": args.seed, "name": args.name,
           "settings": settings(args.set), "pseudo_masks": settings(args.pseudo_masks),
           "pseudo_mask_miou_label_gated": round(
               100 * (report.get("label_gated") or report)["miou"], 2),
           "val_miou_by_epoch": history, "final": history[-1],
           "best": max(history), "best_epoch": metrics["best_epoch"],
           "segmenter_seconds": metrics["train_seconds"]}
    print(json.dumps(row))
    with open(args.out / "ablation.jsonl", "a") as log:
        log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
