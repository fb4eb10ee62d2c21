"""``histo-wsss train-segmenter`` and ``histo-wsss evaluate`` (docs/architecture.md).

``evaluate SOURCE IMAGES_DIR MASKS_DIR`` scores either a model (SOURCE is a run directory or a
segmenter checkpoint; it predicts the images) or a folder of predicted palette masks named like
the images. For a mask folder the classes come from ``--classes/--background``, else from the
palette of the ground-truth masks when it is a built-in dataset's, else from the dataset the
masks folder belongs to (``DATA/val/mask`` -> ``DATA``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from ..core.registry import RegistryNames
from ..core.training.sampling import SAMPLINGS
from .flags import (
    add_appearance_flag,
    add_batch_size_flag,
    add_dataset_flags,
    add_device_flag,
    add_engine_flags,
    add_more_epochs_flag,
    add_overwrite_flag,
    add_run_positionals,
    add_seed_flag,
    add_segmenter_epochs_flag,
    add_train_precision_flag,
    print_engine_note,
    print_offsets_note,
    spec_from_args,
)

#: The command named in the marker of a --save-masks folder (core/runs/outputs.py).
SAVE_MASKS_COMMAND = "evaluate --save-masks"
TTA_CHOICES = RegistryNames("napari_histo_wsss.core.inference.predict", "TTA_MODES")


def add_stage2_parsers(commands) -> None:
    """Register ``train-segmenter`` and ``evaluate`` on the CLI's subcommands."""
    train = commands.add_parser(
        "train-segmenter",
        help="train the segmenter on a run's pseudo-masks (resumes an interrupted run)",
        description="Stage 2: train a segmenter on RUN_DIR/pseudo_masks with a "
                    "noise-suppression loss; writes RUN_DIR/segmenter/<strategy>/.",
    )
    add_run_positionals(train)
    train.add_argument("--loss", metavar="LOSS",
                       choices=RegistryNames("napari_histo_wsss.core.stage2.losses", "LOSSES"),
                       help="noise-suppression loss: %(choices)s (default: the method's)")
    train.add_argument("--strategy", help="folder name under segmenter/ (default: the loss name)")
    train.add_argument("--sampling", choices=SAMPLINGS.names(),
                       help="uniform: every patch once per epoch (default); balanced: patches "
                            "with rare classes drawn more often")
    add_segmenter_epochs_flag(train)
    add_batch_size_flag(train, "batch size (default: the run's)")
    add_device_flag(train, default="the run's")
    add_seed_flag(train, default="the run's")
    add_train_precision_flag(train, default="the run's")
    train.add_argument("--restart", action="store_true",
                       help="train from scratch instead of resuming segmenter/<strategy>/last.pt")
    add_more_epochs_flag(train, "segmenter/<strategy>")
    train.add_argument("--with-corrections", action="store_true",
                       help="fine-tune segmenter/<strategy> on the run's painted corrections "
                            "into segmenter/<strategy>-corrections (docs/corrections.md)")
    add_dataset_flags(train)
    train.set_defaults(func=cmd_train_segmenter)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a run's segmenter, or a folder of predicted masks, on images with masks",
        description="One confusion matrix over the set, background excluded: per-class IoU, "
                    "mIoU, FwIoU, Dice, pixel accuracy.",
    )
    evaluate.add_argument("source", metavar="SOURCE",
                          help="run directory, segmenter checkpoint, or folder of predicted "
                               "palette masks named like the images")
    evaluate.add_argument("images_dir", metavar="IMAGES_DIR")
    evaluate.add_argument("masks_dir", metavar="MASKS_DIR")
    evaluate.add_argument("--json", action="store_true",
                          help="print one JSON object (miou, fwiou, dice, per_class, ...)")
    evaluate.add_argument("--strategy", help="which trained segmenter of the run (default: "
                                             "the best on validation)")
    evaluate.add_argument("--tta", metavar="TTA", choices=TTA_CHOICES,
                          help="test-time augmentation: %(choices)s (default: the method's)")
    evaluate.add_argument("--no-class-gate", action="store_true",
                          help="do not gate classes with the stage-1 classifier (MLPS); by "
                               "default the gate is used where the pipeline found it helps "
                               "on val")
    evaluate.add_argument("--no-class-offsets", action="store_true",
                          help="leave out the per-class offsets the pipeline fitted on val "
                               "(recommended recipe); by default they are applied")
    add_appearance_flag(evaluate)
    evaluate.add_argument("--save-masks", metavar="DIR",
                          help="also write the predicted palette masks into DIR: a new or empty "
                               "folder, or one an earlier --save-masks wrote (never an input "
                               "folder)")
    add_overwrite_flag(evaluate, "write --save-masks into a folder that holds other files "
                                 "(same-named masks are replaced)")
    add_device_flag(evaluate)
    add_engine_flags(evaluate)
    add_dataset_flags(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)


def cmd_train_segmenter(args) -> int:
    """Train one strategy; 0 when finished, 1 when stopped (run again to resume)."""
    from ..core.config.run_config import override
    from ..core.data.classes import DatasetSpec
    from ..core.data.datasets import find_dataset
    from ..core.errors import ConfigError
    from ..core.inference.metrics import format_scores
    from ..core.runs.run_dir import RunDirectory
    from ..core.stage2.train_segmenter import train_segmenter
    from .progress import drive

    if args.more_epochs and (args.restart or args.epochs_seg or args.with_corrections):
        raise ConfigError("--more-epochs continues the trained segmenter: give it without "
                          "--restart, --epochs-seg and --with-corrections")
    run = RunDirectory(args.run_dir)
    config = run.config()
    data_dir = args.data_dir or config.data_dir
    if not data_dir:
        raise ConfigError("the run does not name its dataset: give DATA_DIR", run.root)
    spec = spec_from_args(args) or (DatasetSpec.from_dict(config.dataset)
                                    if config.dataset else None)
    layout = find_dataset(data_dir, spec)
    segmenter = override(config.segmenter, loss=args.loss, epochs=args.epochs_seg,
                         batch_size=args.batch_size, sampling=args.sampling)
    config = replace(config, segmenter=segmenter, seed=config.seed if args.seed is None
                     else args.seed, device=args.device or config.device,
                     train_precision=args.train_precision or config.train_precision)
    if args.with_corrections:
        from .corrections import cmd_finetune

        return cmd_finetune(args, run, replace(config, segmenter=segmenter), layout)
    strategy = args.strategy or segmenter.loss
    val = layout.eval_set("val")
    if val is not None:
        val.check()
    print(f"{layout.describe()}\nsegmenter: {segmenter.arch} on {segmenter.encoder}, loss "
          f"{segmenter.loss} -> {run.segmenter_dir(strategy)}", file=sys.stderr)
    done = drive(lambda stop: train_segmenter(
        run, config, layout.patches(), strategy=strategy, device=config.device, stop=stop,
        resume=not args.restart, val=val, more_epochs=args.more_epochs or 0))
    if done is None or done.stopped:
        again = "without --more-epochs " if args.more_epochs else ""
        print(f"stopped; run the same command {again}again to resume ({run.root})",
              file=sys.stderr)
        return 1
    print(done.result)
    metrics_path = run.segmenter_dir(strategy) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if metrics.get("best_val"):
        paired = "; this network alone, before its companion joins it" \
            if config.segmenter.companion else ""
        if config.segmenter.appearance_weight:
            paired += "; before the appearance model refines it"
        print(f"best on val (epoch {metrics.get('best_epoch')} of {metrics.get('epochs')}, "
              f"kept as model.pt{paired}):\n{format_scores(metrics['best_val'])}",
              file=sys.stderr)
    if val is not None and (config.segmenter.class_gate is not None
                            or config.segmenter.fit_class_offsets):
        from ..core.inference.calibration import make_val_choices

        for line in make_val_choices(run, strategy, val, config.device)[1]:
            print(line, file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from ..core.data.datasets import load_eval_set
    from ..core.errors import ConfigError
    from ..core.inference.metrics import format_scores
    from ..core.inference.predict import evaluate, evaluate_mask_folder, json_ready, load_predictor
    from ..core.runs.outputs import claim_output_folder

    source = Path(args.source).expanduser()
    if _is_model(source):
        if args.save_masks:
            _check_masks_folder(args, source)
        predictor = load_predictor(source, args.device, args.strategy, tta=args.tta,
                                   use_class_gate=False if args.no_class_gate else None,
                                   use_class_offsets=not args.no_class_offsets,
                                   appearance_weight=args.appearance_weight,
                                   engine=args.engine, precision=args.precision)
        print_engine_note(predictor)
        print_offsets_note(predictor)
        eval_set = load_eval_set(args.images_dir, args.masks_dir, predictor.spec)
        if args.save_masks:  # marked only once the model and the set are known to load
            claim_output_folder(args.save_masks, SAVE_MASKS_COMMAND)
        scores = evaluate(predictor, eval_set, save_masks=args.save_masks)
    else:
        if args.save_masks or args.strategy or args.tta or args.appearance_weight is not None:
            raise ConfigError("--save-masks, --strategy, --tta and --appearance-weight need a "
                              "run directory or a checkpoint as SOURCE, not a folder of masks",
                              source)
        spec = spec_from_args(args) or mask_spec(Path(args.masks_dir))
        eval_set = load_eval_set(args.images_dir, args.masks_dir, spec)
        scores = evaluate_mask_folder(source, eval_set)
    if args.json:
        print(json.dumps(json_ready(scores)))
    else:
        print(format_scores(scores))
    return 0


def _check_masks_folder(args, source: Path) -> None:
    """Refuse a --save-masks folder that is an input or holds other files, before predicting."""
    from ..core.runs.outputs import COLLECTION, check_output

    check_output(args.save_masks, [source, args.images_dir, args.masks_dir], kind=COLLECTION,
                 overwrite=args.overwrite, command=SAVE_MASKS_COMMAND)


def _is_model(source: Path) -> bool:
    """A checkpoint file or a run directory (as opposed to a folder of masks)."""
    from ..core.errors import DatasetError

    if source.is_file():
        return True
    if not source.is_dir():
        raise DatasetError("no such run directory, checkpoint or mask folder", source)
    return (source / "run.json").is_file() or (source / "segmenter").is_dir()


def mask_spec(masks_dir: Path):
    """The classes of ground-truth masks: a built-in dataset whose colours the masks' palette
    starts with, else the dataset that holds the masks folder (``DATA/val/mask``)."""
    from PIL import Image

    from ..core.data.classes import BUILTIN_SPECS
    from ..core.data.datasets import IMAGE_SUFFIXES, find_dataset
    from ..core.errors import ConfigError, HistoWsssError

    first = next((p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES),
                 None) if masks_dir.is_dir() else None
    if first is not None:
        with Image.open(first) as mask:
            palette = mask.getpalette() if mask.mode == "P" else None
        for spec in BUILTIN_SPECS.values():
            colours = [channel for colour in spec.colours for channel in colour]
            if palette is not None and palette[: len(colours)] == colours:
                return spec
    try:
        return find_dataset(masks_dir.parent.parent).spec
    except HistoWsssError:
        raise ConfigError(
            "cannot tell which classes these masks hold: give --classes A,B,C (and "
            "--background N)",
            masks_dir,
        ) from None

