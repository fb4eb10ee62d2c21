"""``histo-wsss compare``: a run's trained strategies side by side on one image.

Each strategy predicts the image; ``--mask`` scores them, ``--out`` keeps their palette masks
(``DIR/<strategy>.png``) for a viewer, and the pixels where they disagree are counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from .flags import add_device_flag, add_engine_flags, add_overwrite_flag, print_engine_note

#: The command named in the marker of an --out folder (core/runs/outputs.py).
OUT_COMMAND = "compare --out"


def add_compare_parsers(commands) -> None:
    """Register ``compare`` on the ``histo-wsss`` sub-command parser."""
    compare = commands.add_parser(
        "compare", help="the run's trained strategies side by side on one image",
        description="Predict IMAGE with each trained segmenter of RUN_DIR; with --mask, score "
                    "each one (per-class IoU, mIoU); with --out, write their palette masks.")
    compare.add_argument("run_dir", metavar="RUN_DIR")
    compare.add_argument("image", metavar="IMAGE", help="an RGB image (PNG, JPEG, TIFF)")
    compare.add_argument("--mask", metavar="MASK",
                         help="the image's ground-truth palette mask, to score each strategy")
    compare.add_argument("--strategies", help="which trained segmenters, e.g. ce,onss "
                                              "(default: all of the run's)")
    compare.add_argument("--out", metavar="DIR",
                         help="write each strategy's palette mask as DIR/<strategy>.png (a new "
                              "or empty folder, or one an earlier compare --out wrote)")
    add_overwrite_flag(compare, "write --out into a folder that holds other files")
    compare.add_argument("--json", action="store_true",
                         help="print one JSON object (per strategy: miou, per_class, mask)")
    add_device_flag(compare)
    add_engine_flags(compare)
    compare.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from ..core.data.classes import DatasetSpec
    from ..core.data.datasets import read_mask, read_rgb, write_palette_mask
    from ..core.inference.metrics import format_scores
    from ..core.inference.predict import json_ready
    from ..core.runs.outputs import claim_output_folder
    from ..core.runs.run_dir import RunDirectory
    from ..core.stage2.compare import check_mask_fits, compare_strategies, disagreement

    run = RunDirectory(args.run_dir)
    spec = DatasetSpec.from_dict(run.config().dataset)
    strategies = args.strategies.split(",") if args.strategies else None
    if args.out:
        _check_out_folder(args, run, strategies)
    image = read_rgb(args.image)
    truth = read_mask(args.mask, spec) if args.mask else None
    if truth is not None:
        check_mask_fits(truth, image, args.mask)
    results = compare_strategies(run, image, strategies, truth=truth, device=args.device,
                                 engine=args.engine, precision=args.precision,
                                 on_engine=print_engine_note)
    if args.out:  # marked only once every model loaded and predicted
        claim_output_folder(args.out, OUT_COMMAND)
    report: dict = {"image": str(args.image), "strategies": {}}
    for strategy, result in results.items():
        entry = report["strategies"][strategy] = {}
        if result.scores is not None:
            entry.update(miou=result.miou, per_class=result.scores["per_class"])
        if args.out:
            path = Path(args.out) / f"{strategy}.png"
            write_palette_mask(path, result.labels, spec)
            entry["mask"] = str(path)
    report["disagreement"] = float(disagreement(list(results.values())).mean())
    if args.json:
        print(json.dumps(json_ready(report)))
        return 0
    for strategy, result in results.items():
        lines = [strategy + ":"]
        if result.scores is not None:
            lines.append(format_scores(result.scores))
        if "mask" in report["strategies"][strategy]:
            lines.append(f"  mask: {report['strategies'][strategy]['mask']}")
        print("\n".join(lines))
    print(f"strategies disagree on {100 * report['disagreement']:.1f} % of the pixels")
    return 0


def _check_out_folder(args, run, strategies: list[str] | None) -> None:
    """Refuse an --out folder that is an input or holds other files, and a mask path that is
    the image or the ground truth, before any strategy predicts."""
    from ..core.runs.outputs import COLLECTION, FILE, check_output

    inputs = [args.run_dir, args.image, args.mask]
    check_output(args.out, inputs, kind=COLLECTION, overwrite=args.overwrite,
                 command=OUT_COMMAND)
    for strategy in strategies or run.segmenter_strategies():
        check_output(Path(args.out) / f"{strategy}.png", inputs, kind=FILE, overwrite=True)
