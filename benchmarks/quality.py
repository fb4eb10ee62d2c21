"""Quality of every method preset on one dataset, with a fixed seed and budget.

Runs the real pipeline per method (``cam-ce`` is the baseline: plain CAM pseudo-masks and plain
cross-entropy) and writes a table of stage-1 pseudo-mask quality and final segmentation scores on
the dataset's val masks, plus wall time. Finished methods are reused from ``--out`` so an
interrupted benchmark resumes.

    python benchmarks/quality.py ../shared/data/wsss4luad --out runs/quality
    python benchmarks/quality.py DATA --methods mlps,cam-ce --device cuda --schedule paper
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from napari_histo_wsss.cli.progress import drive
from napari_histo_wsss.core.config.presets import METHODS, PRESET_SCHEDULES
from napari_histo_wsss.core.pipeline import prepare_run, run_pipeline


def run_method(data_dir: Path, out: Path, method: str, args) -> list[dict]:
    """Rows of one preset: its own loss, then plain CE on the same pseudo-masks (``--with-ce``)."""
    run, config, layout = prepare_run(
        data_dir, out / method, method, schedule=args.schedule, seed=args.seed,
        device=args.device,
    )
    strategies = [config.segmenter.loss]
    if args.with_ce and config.method != "hisynseg" and "ce" not in strategies:
        strategies.append("ce")
    started = time.perf_counter()
    done = drive(lambda stop: run_pipeline(run, config, layout, stop=stop,
                                           strategies=strategies), quiet=args.quiet)
    if done is None or done.stopped:
        raise SystemExit(f"{method} was stopped; run again to resume")
    summary = done.result
    report_path = run.pseudo_mask_root / "report.json"
    pseudo = json.loads(report_path.read_text()) if report_path.is_file() else None
    status = run.status()
    rows = []
    for strategy in summary["strategies"]:
        metrics_path = run.segmenter_dir(strategy) / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        rows.append({
            "method": method,
            "strategy": strategy,
            "pseudo_mask": pseudo,
            "final": summary["val"][strategy],
            "best_epoch_val": metrics.get("best_val"),
            "segmenter_seconds": metrics.get("train_seconds"),
            "classifier_seconds": status.get("classifier", {}).get("seconds"),
            # Every stage and strategy trained in this run directory, across invocations.
            "wall_seconds": summary.get("wall_seconds",
                                        round(time.perf_counter() - started, 1)),
            "epochs": {"classifier": config.classifier.epochs,
                       "segmenter": config.segmenter.epochs},
        })
    return rows


def markdown_table(rows: list[dict], class_names: list[str]) -> str:
    header = ["method", "loss", "stage-1 PM mIoU", "PM mIoU label-gated", "mIoU", "FwIoU", "Dice",
              *[f"IoU {name}" for name in class_names], "segmenter (min)", "run total (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.2f}"

    for row in rows:
        final = row["final"]
        pm = row["pseudo_mask"]["miou"] if row["pseudo_mask"] else None
        # Recipes that gate with the classifier's prediction (ESFAN) are also scored gated by
        # the images' true labels, as label-gated recipes are.
        gated = (row["pseudo_mask"].get("label_gated") or row["pseudo_mask"])["miou"] \
            if row["pseudo_mask"] else None
        segmenter = row["segmenter_seconds"]
        cells = [row["method"], row["strategy"], pct(pm), pct(gated), pct(final["miou"]),
                 pct(final["fwiou"]), pct(final["dice"]),
                 *[pct(final["per_class"][name]["iou"]) for name in class_names],
                 "n/a" if segmenter is None else f"{segmenter / 60:.1f}",
                 f"{row['wall_seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--methods", default=",".join(METHODS.names()))
    parser.add_argument("--schedule", choices=PRESET_SCHEDULES.names(), default="fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--with-ce", action=argparse.BooleanOptionalAction, default=True,
                        help="also train plain CE on each preset's pseudo-masks (default on)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    rows = [row for method in args.methods.split(",")
            for row in run_method(args.data_dir, args.out, method, args)]
    class_names = list(rows[0]["final"]["per_class"])
    table = markdown_table(rows, class_names)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, device {args.device}"
    result = {"data_dir": str(args.data_dir), "schedule": args.schedule, "seed": args.seed,
              "machine": machine, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "quality.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
