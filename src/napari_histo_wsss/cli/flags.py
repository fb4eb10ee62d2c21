"""Flags and argument handling that several commands share (one place, no import cycle)."""

from __future__ import annotations

import argparse

from ..core.config.presets import PRESET_SCHEDULES


def _number(kind: type, text: str, smallest: float, inclusive: bool, what: str):
    """``text`` as a ``kind`` of at least (or above) ``smallest``; argparse turns the
    ``ArgumentTypeError`` into one usage line and exit code 2."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
    if value != value or value in (float("inf"), float("-inf")) \
            or (value < smallest if inclusive else value <= smallest):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (epochs, batch size, tile): 1 or more."""
    return _number(int, text, 1, True, "a whole number of at least 1")


def non_negative_int(text: str) -> int:
    """argparse type of seeds, margins, levels and label values: 0 or more."""
    return _number(int, text, 0, True, "a whole number of at least 0")


def positive_float(text: str) -> float:
    """argparse type of physical sizes (microns per pixel): a finite number above 0."""
    return _number(float, text, 0.0, False, "a number above 0")


def non_negative_float(text: str) -> float:
    """argparse type of weights that 0 turns off: a finite number of at least 0."""
    return _number(float, text, 0.0, True, "a number of at least 0")


def add_device_flag(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device``; ``default`` only names what an absent flag means (the run's, or auto)."""
    parser.add_argument("--device", help=f"auto, cpu, cuda, cuda:N or mps (default: {default})")


def add_batch_size_flag(parser: argparse.ArgumentParser, what: str = "batch size") -> None:
    """``--batch-size``; absent means the run's (training) or the command's own default."""
    parser.add_argument("--batch-size", type=positive_int, help=what)


def add_segmenter_epochs_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs-seg", type=positive_int, help="segmenter epochs")


def add_more_epochs_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--more-epochs N``: train a finished stage N epochs longer (core/training/extension.py)."""
    parser.add_argument("--more-epochs", type=positive_int, metavar="N",
                        help=f"train the finished {what} N more epochs (the lr schedule gets "
                             "a new tail; the run records the new total)")


def add_seed_flag(parser: argparse.ArgumentParser, default: str = "0") -> None:
    parser.add_argument("--seed", type=non_negative_int,
                        help=f"random seed (default: {default})")


def add_run_positionals(parser: argparse.ArgumentParser) -> None:
    """``RUN_DIR [DATA_DIR]`` of the commands that continue an existing run."""
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("data_dir", metavar="DATA_DIR", nargs="?",
                        help="dataset folder (default: the one the run was made from)")


def add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that say what the dataset's labels mean when it is not a built-in one."""
    parser.add_argument("--classes", help="class names in label order, e.g. tumour,stroma,normal")
    parser.add_argument("--background", type=non_negative_int,
                        help="mask value of white background / excluded pixels (= class count)")


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the pipeline and the stage commands (docs/architecture.md)."""
    add_device_flag(parser)
    parser.add_argument("--backbone", help="timm model name or res38d (default "
                        "tf_efficientnet_lite0, ImageNet weights shipped offline)")
    parser.add_argument("--weights", help="local weights file for the backbone (offline use)")
    parser.add_argument("--epochs-cls", type=positive_int, help="classifier epochs")
    parser.add_argument("--classifiers", type=positive_int, metavar="N",
                        help="train N classifiers, each with its own seed, and keep the one "
                             "whose val pseudo-masks, limited by its class gate, score best "
                             "(default: the method's; 1 trains one)")
    add_segmenter_epochs_flag(parser)
    add_batch_size_flag(parser, "batch size of both stages")
    add_seed_flag(parser)
    parser.add_argument("--schedule", choices=PRESET_SCHEDULES.names(), default="fast",
                        help="fast: scaled to the dataset for a CPU; paper: published schedules")
    parser.add_argument("--mpp", type=positive_float,
                        help="microns per pixel of the training patches: recorded in the run so "
                             "slides are segmented at the same resolution")
    parser.add_argument("--self-train", action="store_true",
                        help="a teacher network trained on the pseudo-masks relabels the "
                             "training patches within their labels, and the segmenter learns "
                             "from those labels (about 3 minutes more on fast; "
                             "docs/algorithms.md 16)")
    add_train_precision_flag(parser, default="auto")


def add_train_precision_flag(parser: argparse.ArgumentParser, default: str) -> None:
    """``--train-precision``: the trainers' autocast (``RunConfig.train_precision``)."""
    from ..core.config.run_config import TRAIN_PRECISIONS

    parser.add_argument("--train-precision", choices=TRAIN_PRECISIONS,
                        help="auto: mixed precision on a GPU, fp32 on a CPU; fp32; bf16: bf16 "
                             "autocast, on a CPU too where it has bf16 kernels (else fp32, "
                             f"said in one line) (default: {default})")


def spec_from_args(args):
    """The dataset description from ``--classes/--background``, or None to detect it."""
    if not getattr(args, "classes", None):
        if getattr(args, "background", None) is not None:
            from ..core.errors import ConfigError

            raise ConfigError("--background needs --classes")
        return None
    from ..core.data.classes import custom_spec

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
                            epochs=getattr(args, "epochs_cls", None), batch_size=batch,
                            candidates=getattr(args, "classifiers", None)),
        "segmenter": given(epochs=getattr(args, "epochs_seg", None), batch_size=batch,
                           encoder=backbone if shared_encoder else None,
                           weights=weights if shared_encoder else None),
    }


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``: replace outputs this tool did not make (inputs are never replaced)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"{what}; inputs are never overwritten")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and ``--precision`` of the commands that only predict (core/inference)."""
    from ..core.inference.engine_names import ENGINE_CHOICES, PRECISIONS

    parser.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                        help="what runs the network on a CPU: auto (the fastest installed one "
                             "that predicts like torch fp32 on real tiles), torch, onnxruntime "
                             "or openvino (the last two: pip install 'napari-histo-wsss[fast]')")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="fp32 or bf16 (default: auto picks; bf16 only where its labels "
                             "agree with fp32 on 99.5 %% of a real tile's pixels)")


def add_appearance_flag(parser: argparse.ArgumentParser) -> None:
    """``--appearance-weight``: each image's own colour/texture model on the boundaries."""
    parser.add_argument("--appearance-weight", metavar="W", type=non_negative_float,
                        help="weight of each image's (or tile's) own colour/texture model on "
                             "the predicted boundaries; 0 turns it off (default: the "
                             "method's; docs/algorithms.md 15)")


def print_engine_note(predictor) -> None:
    """The engine's one line (what runs, a fallback), on stderr so --json output stays clean."""
    import sys

    note = getattr(getattr(predictor, "engine", None), "note", "")
    if note:
        print(f"histo-wsss: {note}", file=sys.stderr)


def print_offsets_note(predictor) -> None:
    """One line when class offsets fitted on val are applied (stderr)."""
    import sys

    offsets = predictor.config.get("class_offsets")
    if offsets:
        shown = ", ".join(f"{name} {value:+.2f}" for name, value in
                          zip(predictor.spec.class_names, offsets, strict=True) if value)
        print(f"histo-wsss: class offsets fitted on val applied ({shown}); "
              "--no-class-offsets leaves them out", file=sys.stderr)
