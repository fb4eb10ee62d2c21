"""Quality of every method preset on one dataset, with fixed seeds and budget.

Runs the real pipeline per method (``cam-ce`` is the baseline: plain CAM pseudo-masks and plain
cross-entropy) and writes a table of stage-1 pseudo-mask quality and final segmentation scores on
the dataset's val masks (with the spread of per-image mIoU), plus wall time. With several
``--seeds`` each seed runs in ``OUT/seed-N`` and a second table gives each row's mean and
standard deviation over the seeds. Finished methods are reused from ``--out`` so an
interrupted benchmark resumes.

    python benchmarks/quality.py ../shared/data/wsss4luad --out runs/quality
    python benchmarks/quality.py DATA --seeds 0,1,2 --out runs/quality-3seeds
    python benchmarks/quality.py DATA --methods mlps,cam-ce --device cuda --schedule paper
    python benchmarks/quality.py DATA --methods recommended --self-train   # with the teacher
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from napari_histo_wsss.cli.progress import drive
from napari_histo_wsss.core.config.presets import METHODS, PRESET_SCHEDULES
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.pipeline import prepare_run, run_pipeline


def run_method(data_dir: Path, out: Path, method: str, seed: int, args) -> list[dict]:
    """Rows of one preset: its own loss, then plain CE on the same pseudo-masks (``--with-ce``)."""
    try:
        run, config, layout = prepare_run(
            data_dir, out / method, method, schedule=args.schedule, seed=seed,
            device=args.device, self_train=args.self_train,
        )
    except ConfigError as error:
        raise SystemExit(f"{method}: {error}") from None
    if config.pseudo_masks.teacher and not args.self_train:
        raise SystemExit(f"{run.root} was made with the self-training teacher: use another "
                         "--out, or --self-train")
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
            "seed": seed,
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


def pseudo_mask_scores(row: dict) -> tuple[float | None, float | None]:
    """(stage-1 PM mIoU, PM mIoU label-gated) of a row. Recipes that gate with the classifier's
    prediction (ESFAN) are also scored gated by the images' true labels, as label-gated
    recipes are."""
    pseudo = row["pseudo_mask"]
    if not pseudo:
        return None, None
    return pseudo["miou"], (pseudo.get("label_gated") or pseudo)["miou"]


def row_values(row: dict, class_names: list[str]) -> dict[str, float | None]:
    """The figures of one row that the tables show, by column name."""
    final = row["final"]
    stage1, gated = pseudo_mask_scores(row)
    spread = final.get("per_image") or {}
    return {
        "stage-1 PM mIoU": stage1, "PM mIoU label-gated": gated, "mIoU": final["miou"],
        "FwIoU": final["fwiou"], "Dice": final["dice"],
        **{f"IoU {name}": final["per_class"][name]["iou"] for name in class_names},
        "per-image median": spread.get("median"), "per-image 10th pct": spread.get("p10"),
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def markdown_table(rows: list[dict], class_names: list[str]) -> str:
    """One line per run and strategy."""
    columns = list(row_values(rows[0], class_names))
    header = ["method", "loss", "seed", *columns, "segmenter (min)", "run total (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = row_values(row, class_names)
        segmenter = row["segmenter_seconds"]
        cells = [row["method"], row["strategy"], str(row["seed"]),
                 *[_pct(values[column]) for column in columns],
                 "n/a" if segmenter is None else f"{segmenter / 60:.1f}",
                 f"{row['wall_seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_summary_table(rows: list[dict], class_names: list[str]) -> str:
    """One line per method and strategy: mean +- standard deviation over the seeds run."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["strategy"]), []).append(row)
    columns = list(row_values(rows[0], class_names))
    header = ["method", "loss", "seeds", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, strategy), group in groups.items():
        cells = [method, strategy, ",".join(str(row["seed"]) for row in group)]
        figures = [row_values(row, class_names) for row in group]
        for column in columns:
            values = [100 * row[column] for row in figures if row[column] is not None]
            if not values:
                cells.append("n/a")
            elif len(values) == 1:
                cells.append(f"{values[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--methods", default=",".join(METHODS.names()))
    parser.add_argument("--schedule", choices=PRESET_SCHEDULES.names(), default="fast")
    parser.add_argument("--seed", type=int, default=0, help="one seed, runs in OUT/METHOD")
    parser.add_argument("--seeds", default=None,
                        help="several seeds, e.g. 0,1,2: each runs in OUT/seed-N/METHOD")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--with-ce", action=argparse.BooleanOptionalAction, default=True,
                        help="also train plain CE on each preset's pseudo-masks (default on)")
    parser.add_argument("--self-train", action="store_true",
                        help="add the self-training teacher to every preset (as the CLI's "
                             "--self-train; refused for presets it cannot relabel)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    if args.seeds is None:
        runs = [(args.seed, args.out)]
    else:
        runs = [(int(seed), args.out / f"seed-{int(seed)}") for seed in args.seeds.split(",")]
    rows = [row for seed, out in runs for method in args.methods.split(",")
            for row in run_method(args.data_dir, out, method, seed, args)]
    class_names = list(rows[0]["final"]["per_class"])
    table = markdown_table(rows, class_names)
    if len(runs) > 1:
        table += "\n\nMean +- standard deviation over the seeds:\n\n"
        table += seed_summary_table(rows, class_names)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, device {args.device}"
    result = {"data_dir": str(args.data_dir), "schedule": args.schedule,
              "self_train": args.self_train,
              "seeds": [seed for seed, _ in runs], "machine": machine, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "quality.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
