"""``histo-wsss pipeline`` and ``histo-wsss demo``: every stage in one command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..core.config.presets import DEFAULT_METHOD, METHODS
from .flags import (
    add_dataset_flags,
    add_device_flag,
    add_training_flags,
    spec_from_args,
    stage_overrides,
)

DEMO_DATA = Path(__file__).parents[1] / "sample_data" / "wsss4luad"


def add_pipeline_parsers(commands) -> None:
    """Register ``pipeline`` and ``demo`` on the ``histo-wsss`` sub-command parser."""
    pipeline = commands.add_parser(
        "pipeline", help="run every stage with a method preset (resumes an interrupted run)")
    pipeline.add_argument("data_dir", metavar="DATA_DIR")
    pipeline.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS.names(),
                          help="method preset (default: %(default)s, the best measured; "
                               "docs/results.md)")
    pipeline.add_argument("--out", required=True, metavar="RUN_DIR")
    pipeline.add_argument("--strategies",
                          help="train several noise-suppression losses one after another on the "
                               "same pseudo-masks, e.g. ce,onss,anm (for comparison)")
    add_training_flags(pipeline)
    add_dataset_flags(pipeline)
    pipeline.set_defaults(func=cmd_pipeline)

    demo = commands.add_parser(
        "demo", help="the whole job on the bundled real sample, then open napari")
    demo.add_argument("--no-viewer", action="store_true", help="do not open napari at the end")
    demo.add_argument("--out", default="histo-wsss-demo", metavar="RUN_DIR",
                      help="run directory (default ./histo-wsss-demo; reused if it exists)")
    demo.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS.names(),
                      help="method preset (default: %(default)s)")
    add_device_flag(demo)
    demo.set_defaults(func=cmd_demo)


def _run_pipeline(args, data_dir: Path, out: Path) -> int:
    from ..core.inference.metrics import format_scores
    from ..core.pipeline import prepare_run, run_pipeline
    from .progress import drive

    _check_run_out(out)
    resuming = (out / "run.json").is_file()
    run, config, layout = prepare_run(
        data_dir, out, args.method, spec=spec_from_args(args), schedule=args.schedule,
        seed=args.seed, device=args.device, mpp=getattr(args, "mpp", None),
        train_precision=getattr(args, "train_precision", None),
        self_train=getattr(args, "self_train", False), **stage_overrides(args),
    )
    print(f"{layout.describe()}\nrun directory: {run.root}", file=sys.stderr)
    if resuming:
        print("continuing the existing run with the settings in its run.json (flags that "
              "change settings apply to new runs only)", file=sys.stderr)
    strategies = args.strategies.split(",") if getattr(args, "strategies", None) else None
    done = drive(lambda stop: run_pipeline(run, config, layout, stop=stop,
                                           strategies=strategies))
    if done is None or done.stopped:
        print(f"stopped; run the same command again to resume ({run.root})", file=sys.stderr)
        return 1
    for strategy, scores in done.result.get("val", {}).items():
        print(f"{strategy} on val:\n{format_scores(scores)}")
    return 0


def _check_run_out(out: Path) -> None:
    """--out must be a folder (new or a run) in a writable place: refused before any work."""
    from ..core.runs.outputs import FOLDER, check_output

    check_output(out, kind=FOLDER)


def cmd_pipeline(args) -> int:
    return _run_pipeline(args, Path(args.data_dir), Path(args.out))


def cmd_demo(args) -> int:
    """The whole job on the bundled sample, then napari with every result as layers."""
    args.classes = args.background = args.backbone = args.weights = None
    args.epochs_cls = args.epochs_seg = args.batch_size = args.seed = None
    args.classifiers = None
    args.schedule = "fast"
    status = _run_pipeline(args, DEMO_DATA, Path(args.out))
    if status != 0 or args.no_viewer:
        return status
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        print(f"No display found, so napari is not opened. The results are in {args.out}; "
              "open them later with `histo-wsss demo` on a desktop.", file=sys.stderr)
        return 0
    from ..widgets.demo import show_run

    show_run(Path(args.out))
    return 0


