"""``histo-wsss``: the command line over the core jobs (DESIGN.md section 4).

Every user-caused problem ends as one line on stderr and exit code 2; Ctrl-C stops a training
job cleanly after the current batch, with a checkpoint to resume from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .core.errors import HistoWsssError

DEMO_DATA = Path(__file__).parent / "sample_data" / "wsss4luad"


def add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that say what the dataset's labels mean when it is not a built-in one."""
    parser.add_argument("--classes", help="class names in label order, e.g. tumour,stroma,normal")
    parser.add_argument("--background", type=int,
                        help="mask value of white background / excluded pixels (= class count)")


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the pipeline and the stage commands (DESIGN.md section 4)."""
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--backbone", help="timm model name or res38d (default "
                        "tf_efficientnet_lite0, ImageNet weights shipped offline)")
    parser.add_argument("--weights", help="local weights file for the backbone (offline use)")
    parser.add_argument("--epochs-cls", type=int, help="classifier epochs")
    parser.add_argument("--epochs-seg", type=int, help="segmenter epochs")
    parser.add_argument("--batch-size", type=int, help="batch size of both stages")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--schedule", choices=("fast", "paper"), default="fast",
                        help="fast: scaled to the dataset for a CPU; paper: published schedules")
    parser.add_argument("--mpp", type=float,
                        help="microns per pixel of the training patches: recorded in the run so "
                             "slides are segmented at the same resolution")


def spec_from_args(args):
    """The dataset description from ``--classes/--background``, or None to detect it."""
    if not getattr(args, "classes", None):
        if getattr(args, "background", None) is not None:
            from .core.errors import ConfigError

            raise ConfigError("--background needs --classes")
        return None
    from .core.classes import custom_spec

    return custom_spec(args.classes, args.background)


def stage_overrides(args) -> dict[str, dict]:
    """Per-section config changes from the shared training flags (None means keep)."""
    def given(**values):
        return {k: v for k, v in values.items() if v is not None}

    batch = getattr(args, "batch_size", None)
    backbone = getattr(args, "backbone", None)
    weights = getattr(args, "weights", None)
    # ResNet38 is a classifier backbone only; the segmenter then keeps its default encoder.
    shared_encoder = backbone is not None and backbone != "res38d"
    return {
        "classifier": given(backbone=backbone, weights=weights,
                            epochs=getattr(args, "epochs_cls", None), batch_size=batch),
        "segmenter": given(epochs=getattr(args, "epochs_seg", None), batch_size=batch,
                           encoder=backbone if shared_encoder else None,
                           weights=weights if shared_encoder else None),
    }


def _run_pipeline(args, data_dir: Path, out: Path) -> int:
    from .cli_progress import drive
    from .core.metrics import format_scores
    from .core.pipeline import prepare_run, run_pipeline

    resuming = (out / "run.json").is_file()
    run, config, layout = prepare_run(
        data_dir, out, args.method, spec=spec_from_args(args), schedule=args.schedule,
        seed=args.seed, device=args.device, mpp=getattr(args, "mpp", None),
        **stage_overrides(args),
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


def cmd_pipeline(args) -> int:
    return _run_pipeline(args, Path(args.data_dir), Path(args.out))


def cmd_demo(args) -> int:
    """The whole job on the bundled sample, then napari with every result as layers."""
    args.classes = args.background = args.backbone = args.weights = None
    args.epochs_cls = args.epochs_seg = args.batch_size = args.seed = None
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
    from .demo_viewer import show_run

    show_run(Path(args.out))
    return 0


def cmd_version(args) -> int:
    import torch

    from .core.devices import available_devices

    print(json.dumps({"napari-histo-wsss": __version__, "torch": str(torch.__version__),
                      "devices": available_devices()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .slide_cli import add_segment_slide_parser
    from .stage1_cli import add_stage1_parsers
    from .stage2_cli import add_stage2_parsers

    parser = argparse.ArgumentParser(
        prog="histo-wsss",
        description="Weakly-supervised tissue segmentation of H&E histopathology: patch labels "
                    "-> CAM classifier -> pseudo-masks -> segmenter -> whole slides.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pipeline = commands.add_parser(
        "pipeline", help="run every stage with a method preset (resumes an interrupted run)")
    pipeline.add_argument("data_dir", metavar="DATA_DIR")
    pipeline.add_argument("--method", required=True,
                          choices=("mlps", "msv-onss", "arml", "esfan", "hisynseg", "cam-ce"))
    pipeline.add_argument("--out", required=True, metavar="RUN_DIR")
    pipeline.add_argument("--strategies",
                          help="train several noise-suppression losses one after another on the "
                               "same pseudo-masks, e.g. ce,onss,anm (for comparison)")
    add_training_flags(pipeline)
    add_dataset_flags(pipeline)
    pipeline.set_defaults(func=cmd_pipeline)

    add_stage1_parsers(commands)
    add_stage2_parsers(commands)
    add_segment_slide_parser(commands)

    demo = commands.add_parser(
        "demo", help="the whole job on the bundled real sample, then open napari")
    demo.add_argument("--no-viewer", action="store_true", help="do not open napari at the end")
    demo.add_argument("--out", default="histo-wsss-demo", metavar="RUN_DIR",
                      help="run directory (default ./histo-wsss-demo; reused if it exists)")
    demo.add_argument("--method", default="mlps",
                      choices=("mlps", "msv-onss", "arml", "esfan", "hisynseg", "cam-ce"))
    demo.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    demo.set_defaults(func=cmd_demo)

    version = commands.add_parser("info", help="versions and the devices available here")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HistoWsssError as error:
        print(f"histo-wsss: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("histo-wsss: aborted", file=sys.stderr)
        return 130
    except MemoryError:
        print("histo-wsss: error: out of memory; try a smaller --batch-size", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if "out of memory" in str(error).lower():
            print("histo-wsss: error: the device ran out of memory; try a smaller --batch-size "
                  "or --device cpu", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
