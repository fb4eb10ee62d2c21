"""``train-classifier`` and ``pseudo-masks``: stage 1 of the pipeline as two commands.

``train-classifier`` sets up (or reopens) the run directory exactly as ``pipeline`` does, so the
stages can be run one by one and continued with ``pipeline`` later.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.config.presets import DEFAULT_METHOD, METHODS


def add_stage1_parsers(commands) -> None:
    """Register the two stage-1 commands on the ``histo-wsss`` sub-command parser."""
    from .flags import (
        add_dataset_flags,
        add_device_flag,
        add_more_epochs_flag,
        add_run_positionals,
        add_training_flags,
    )

    train = commands.add_parser(
        "train-classifier", help="stage 1: train the CAM classifier on the patch labels "
                                 "(resumes an interrupted run)")
    train.add_argument("data_dir", metavar="DATA_DIR")
    train.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS.names(),
                       help="method preset (default: %(default)s)")
    train.add_argument("--out", required=True, metavar="RUN_DIR")
    add_training_flags(train)
    add_dataset_flags(train)
    train.add_argument("--restart", action="store_true",
                       help="train from scratch instead of resuming classifier/last.pt")
    add_more_epochs_flag(train, "classifier of --out (its own method)")
    train.set_defaults(func=cmd_train_classifier)

    masks = commands.add_parser(
        "pseudo-masks", help="stage 1: pseudo-masks of every training patch from the run's "
                             "classifier")
    add_run_positionals(masks)
    add_device_flag(masks, default="the run's")
    masks.add_argument("--report", action="store_true",
                       help="also score the recipe on DATA_DIR's val masks (stage-1 mIoU)")
    masks.set_defaults(func=cmd_pseudo_masks)


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from ..core.devices import resolve_device
    from ..core.errors import ConfigError
    from ..core.pipeline import prepare_run
    from ..core.runs.outputs import FOLDER, check_output
    from ..core.runs.run_dir import RunDirectory
    from ..core.stage1.train_classifier import train_classifier
    from .flags import spec_from_args, stage_overrides
    from .progress import drive

    if args.more_epochs and (args.restart or args.epochs_cls):
        raise ConfigError("--more-epochs continues the trained classifier: give it without "
                          "--restart and --epochs-cls")
    check_output(args.out, kind=FOLDER)
    method = args.method
    if args.more_epochs and RunDirectory(args.out).exists():
        method = RunDirectory(args.out).config().method  # training longer keeps the run's
    run, config, layout = prepare_run(
        args.data_dir, args.out, method, spec=spec_from_args(args),
        schedule=args.schedule, seed=args.seed, device=args.device, mpp=args.mpp,
        train_precision=args.train_precision, self_train=args.self_train,
        **stage_overrides(args),
    )
    device = resolve_device(args.device or config.device)
    print(f"{layout.describe()}\nrun directory: {run.root}", file=sys.stderr)
    val = layout.eval_set("val")
    if val is not None:
        val.check()  # a bad val mask is found now, not after hours of training
    patches = layout.patches()
    done = drive(lambda stop: train_classifier(run, config, patches, device=device, stop=stop,
                                               resume=not args.restart,
                                               more_epochs=args.more_epochs or 0, val=val))
    if done is None or done.stopped:
        again = "without --more-epochs " if args.more_epochs else ""
        print(f"stopped; run the same command {again}again to resume ({run.root})",
              file=sys.stderr)
        return 1
    print(done.result)
    if args.more_epochs:
        print(f"the pseudo-masks come from the earlier classifier: make them again with "
              f"`histo-wsss pseudo-masks {run.root}` (segmenters trained on them are marked "
              "stale)", file=sys.stderr)
    return 0


def cmd_pseudo_masks(args: argparse.Namespace) -> int:
    from ..core.data.classes import DatasetSpec
    from ..core.data.datasets import find_dataset
    from ..core.devices import resolve_device
    from ..core.errors import ConfigError, DatasetError
    from ..core.inference.metrics import format_scores
    from ..core.runs.run_dir import RunDirectory
    from ..core.stage1.pseudo_masks import generate_pseudo_masks, pseudo_mask_report
    from .progress import drive

    run = RunDirectory(args.run_dir)
    config = run.config()
    if not run.classifier_checkpoint.is_file():
        raise ConfigError("no trained classifier here: run `histo-wsss train-classifier` first",
                          run.root)
    layout = find_dataset(Path(args.data_dir or config.data_dir),
                          DatasetSpec.from_dict(config.dataset))
    val = layout.eval_set("val") if args.report else None
    if args.report and val is None:
        raise DatasetError("--report needs val/img and val/mask folders", layout.root)
    device = resolve_device(args.device or config.device)
    patches = layout.patches()
    done = drive(lambda stop: generate_pseudo_masks(run, config, patches, device=device,
                                                    stop=stop))
    if done is None or done.stopped:
        print("stopped; run the same command again to regenerate", file=sys.stderr)
        return 1
    print(done.result)
    if val is not None:
        print(f"pseudo-masks on val ({len(val)} images):\n"
              f"{format_scores(pseudo_mask_report(run, config, val, device))}")
    if config.pseudo_masks.teacher:
        return _refine(run, config, patches, layout.eval_set("val"), device)
    return 0


def _refine(run, config, patches, val, device) -> int:
    """The recipe's self-training teacher relabels the pseudo-masks it just made (its best
    epoch chosen on val where the dataset has one, as in the pipeline)."""
    from ..core.stage2.self_training import refine_pseudo_masks
    from .progress import drive

    if val is not None:
        val.check()
    done = drive(lambda stop: refine_pseudo_masks(run, config, patches, device=device,
                                                  stop=stop, val=val, resume=False))
    if done is None or done.stopped:
        print("stopped; run the same command again to make the pseudo-masks and relabel them",
              file=sys.stderr)
        return 1
    print(done.result)
    return 0
