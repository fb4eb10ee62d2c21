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

from napari_histo_wsss.cli_progress import drive
from napari_histo_wsss.core.pipeline import prepare_run, run_pipeline
from napari_histo_wsss.core.presets import METHODS


def run_method(data_dir: Path, out: Path, method: str, args) -> dict:
    run, config, layout = prepare_run(
        data_dir, out / method, method, schedule=args.schedule, seed=args.seed,
        device=args.device,
    )
    started = time.perf_counter()
    done = drive(lambda stop: run_pipeline(run, config, layout, stop=stop), quiet=args.quiet)
    if done is None or done.stopped:
        raise SystemExit(f"{method} was stopped; run again to resume")
    summary = done.result
    report_path = run.pseudo_mask_root / "report.json"
    pseudo = json.loads(report_path.read_text()) if report_path.is_file() else None
    strategy = summary["strategies"][0]
    return {
        "method": method,
        "strategy": strategy,
        "pseudo_mask": pseudo,
        "final": summary["val"][strategy],
        # A method reused from an earlier run keeps that run's training wall time.
        "wall_seconds": summary.get("wall_seconds", round(time.perf_counter() - started, 1)),
        "epochs": {"classifier": config.classifier.epochs, "segmenter": config.segmenter.epochs},
    }


def markdown_table(rows: list[dict], class_names: list[str]) -> str:
    header = ["method", "stage-1 PM mIoU", "mIoU", "FwIoU", "Dice",
              *[f"IoU {name}" for name in class_names], "wall (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.2f}"

    for row in rows:
        final = row["final"]
        pm = row["pseudo_mask"]["miou"] if row["pseudo_mask"] else None
        cells = [row["method"], pct(pm), pct(final["miou"]), pct(final["fwiou"]),
                 pct(final["dice"]),
                 *[pct(final["per_class"][name]["iou"]) for name in class_names],
                 f"{row['wall_seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--schedule", choices=("fast", "paper"), default="fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    rows = [run_method(args.data_dir, args.out, method, args)
            for method in args.methods.split(",")]
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
