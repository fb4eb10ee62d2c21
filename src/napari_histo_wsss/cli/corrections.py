"""``histo-wsss review``, ``histo-wsss corrections ...`` and ``train-segmenter
--with-corrections`` (docs/corrections.md).

``review`` ranks images by how little the run's segmenter can be trusted there and can save
the queue as QuPath annotations; ``corrections import/export/list`` move painted labels between
the run and QuPath GeoJSON; ``corrections apply`` writes the corrected images' masks, each
refined by its own strokes; ``corrections calibrate`` refits a segmenter's class offsets on
them; the fine-tune itself is started by ``train-segmenter``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .flags import add_device_flag, add_overwrite_flag, positive_float, positive_int


def add_corrections_parsers(commands) -> None:
    """Register ``review`` and ``corrections`` on the CLI's subcommands."""
    review = commands.add_parser(
        "review", help="rank images by low trust in the segmenter: where to correct first",
        description="Scores every image by prediction entropy and disagreement between "
                    "test-time views, least trusted first.")
    review.add_argument("run_dir", metavar="RUN_DIR")
    review.add_argument("--images", metavar="DIR",
                        help="images to rank (default: the run dataset's val images)")
    review.add_argument("--top", type=positive_int, default=20,
                        help="how many to list (default 20)")
    review.add_argument("--strategy", help="which trained segmenter (default: the best on val)")
    review.add_argument("--geojson", metavar="F",
                        help="also save the queue as QuPath annotations (one rectangle per "
                             "image around its least trusted area)")
    add_overwrite_flag(review, "replace a --geojson file histo-wsss did not write")
    add_device_flag(review)
    review.set_defaults(func=cmd_review)

    corrections = commands.add_parser(
        "corrections", help="import, export or list the painted corrections of a run",
        description="Corrections are sparse painted labels kept in RUN_DIR/corrections; "
                    "`train-segmenter RUN_DIR --with-corrections` fine-tunes on them.")
    actions = corrections.add_subparsers(dest="action", required=True, metavar="ACTION")
    importing = actions.add_parser(
        "import", help="add classified annotations from QuPath (GeoJSON) as corrections")
    importing.add_argument("run_dir", metavar="RUN_DIR")
    importing.add_argument("geojson", metavar="ANNOTATIONS")
    owner = importing.add_mutually_exclusive_group()
    owner.add_argument("--image", metavar="IMAGE",
                       help="the image the annotations were drawn on (default: each "
                            "annotation's own 'image' property, as our export writes)")
    owner.add_argument("--slide", metavar="SLIDE",
                       help="the slide the annotations were drawn on (coordinates in level-0 "
                            "pixels); the annotated region becomes one correction")
    importing.add_argument("--downsample", type=positive_float, default=1.0,
                           help="for --slide: level-0 pixels per painted pixel (default 1)")
    importing.add_argument("--author", help="who drew them (default: the current user)")
    importing.set_defaults(func=cmd_import)
    exporting = actions.add_parser("export", help="save the run's corrections as GeoJSON")
    exporting.add_argument("run_dir", metavar="RUN_DIR")
    exporting.add_argument("out", metavar="OUT.geojson")
    add_overwrite_flag(exporting, "replace a file histo-wsss did not write")
    exporting.set_defaults(func=cmd_export)
    listing = actions.add_parser("list", help="one line per corrected image or region")
    listing.add_argument("run_dir", metavar="RUN_DIR")
    listing.set_defaults(func=cmd_list)
    applying = actions.add_parser(
        "apply", help="save each corrected image's mask, refined by its own strokes",
        description="Predicts every corrected image (not slide regions) with its strokes: "
                    "the image's appearance model learns from them and they overrule the "
                    "network near them, no retraining (docs/corrections.md). Masks are "
                    "palette PNGs named like the images.")
    applying.add_argument("run_dir", metavar="RUN_DIR")
    applying.add_argument("out", metavar="OUT_DIR")
    applying.add_argument("--strategy", help="which trained segmenter (default: the best on "
                                             "val)")
    add_overwrite_flag(applying, "write into a folder that holds other files")
    add_device_flag(applying)
    applying.set_defaults(func=cmd_apply)
    calibrating = actions.add_parser(
        "calibrate", help="refit a segmenter's class offsets on the corrected images",
        description="What your strokes say about the class balance, applied to every image "
                    "without retraining: each corrected image's prediction refined by its "
                    "strokes is the target the class offsets are fitted to, with the val "
                    "masks where the run's dataset has them (docs/corrections.md). Replaces "
                    "the segmenter's class_offsets.json; run it again after removing the "
                    "corrections to go back to the val masks alone.")
    calibrating.add_argument("run_dir", metavar="RUN_DIR")
    calibrating.add_argument("--strategy", help="which trained segmenter (default: the best "
                                                "on val)")
    calibrating.add_argument("--no-val", action="store_true",
                             help="fit on the corrections alone, even where val masks exist")
    add_device_flag(calibrating)
    calibrating.set_defaults(func=cmd_calibrate)


def cmd_review(args) -> int:
    from ..core.corrections.geojson import review_to_geojson, save_geojson
    from ..core.corrections.review import review_queue
    from ..core.inference.predict import load_predictor

    run_dir = Path(args.run_dir).expanduser()
    images = _review_images(args, run_dir)
    if args.geojson:
        _check_geojson_output(args.geojson, [run_dir, args.images], args.overwrite, "review")
    predictor = load_predictor(run_dir, args.device, args.strategy, tta="none",
                               use_class_gate=False)
    items = review_queue(predictor, images, top=args.top)
    print(f"{'rank':>4}  {'score':>6}  {'entropy':>7}  {'views':>6}  focus (y, x, h, w)  image")
    for rank, item in enumerate(items, start=1):
        print(f"{rank:>4}  {item.score:6.3f}  {item.entropy:7.3f}  {item.disagreement:6.3f}  "
              f"{str(item.focus):18}  {item.image}")
    if args.geojson:
        collection = review_to_geojson(items)
        collection["properties"] = {"histo_wsss": "review", "run": str(run_dir.resolve())}
        print(f"saved {save_geojson(collection, args.geojson)}", file=sys.stderr)
    return 0


def _review_images(args, run_dir: Path) -> list[Path]:
    from ..core.data.datasets import IMAGE_SUFFIXES, find_dataset
    from ..core.errors import ConfigError, DatasetError
    from ..core.runs.run_dir import RunDirectory

    if args.images:
        folder = Path(args.images).expanduser()
        if not folder.is_dir():
            raise DatasetError("folder not found", folder)
    else:
        config = RunDirectory(run_dir).config()
        layout = find_dataset(config.data_dir) if config.data_dir else None
        if layout is None or layout.val is None:
            raise ConfigError("the run's dataset has no val images: give --images DIR", run_dir)
        folder = layout.val[0]
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError("no images to review in this folder", folder)
    return images


def cmd_import(args) -> int:
    from ..core.corrections.geojson import read_annotations
    from ..core.corrections.store import CorrectionStore
    from ..core.errors import DatasetError

    store = CorrectionStore.of_run(args.run_dir)
    if args.slide and not Path(args.slide).expanduser().is_file():
        raise DatasetError("slide file not found", args.slide)
    imported = read_annotations(
        args.geojson, store.spec, image=args.slide or args.image,
        kind="slide" if args.slide else "image",
        downsample=args.downsample if args.slide else 1.0, author=args.author)
    for correction in imported.corrections:
        earlier = store.find(correction.image, correction.region)
        if earlier is not None and earlier.labels.shape == correction.labels.shape:
            painted = correction.labels > 0  # new strokes over the earlier ones
            merged = earlier.labels.copy()
            merged[painted] = correction.labels[painted]
            correction.labels = merged
        store.save(correction)
        print(f"{correction.painted:>9} px  {correction.image}  region {correction.region}")
    if not imported.corrections:
        raise DatasetError("no annotation with one of the run's classes in this file",
                           args.geojson)
    if imported.skipped:
        print(f"skipped {imported.skipped} annotations without a class of the run",
              file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from ..core.corrections.geojson import corrections_to_geojson, save_geojson
    from ..core.corrections.store import CorrectionStore

    store = CorrectionStore.of_run(args.run_dir)
    _check_geojson_output(args.out, [args.run_dir], args.overwrite, "corrections")
    collection = corrections_to_geojson(store.load_all(), store.spec)
    collection["properties"] = {"histo_wsss": "corrections",
                                "run": str(Path(args.run_dir).resolve())}
    print(save_geojson(collection, args.out))
    return 0


def cmd_list(args) -> int:
    from ..core.corrections.store import CorrectionStore

    for entry in CorrectionStore.of_run(args.run_dir).entries():
        print(f"{entry['painted_pixels']:>9} px  {','.join(entry['classes']):24}  "
              f"{entry['created']}  {entry['author'] or '-':10}  {entry['image']}")
    return 0


def cmd_apply(args) -> int:
    from ..core.corrections.store import CorrectionStore
    from ..core.data.datasets import read_rgb, write_palette_mask
    from ..core.errors import ConfigError
    from ..core.inference.predict import load_predictor, predict_image
    from ..core.runs.outputs import COLLECTION, check_output, claim_output_folder

    command = "corrections apply"
    check_output(args.out, [args.run_dir], kind=COLLECTION, overwrite=args.overwrite,
                 command=command)
    store = CorrectionStore.of_run(args.run_dir)
    corrections = [c for c in store.load_all() if c.kind == "image"]
    if not corrections:
        print(f"no corrected images in {args.run_dir} (slide regions are left to "
              "`train-segmenter --with-corrections`)", file=sys.stderr)
        return 1
    predictor = load_predictor(args.run_dir, args.device, args.strategy)
    out = claim_output_folder(args.out, command)
    for correction in corrections:
        image = read_rgb(correction.image)
        try:
            labels, _ = predict_image(predictor, image, painted=correction.labels)
        except ConfigError as error:
            raise ConfigError(f"its strokes cannot refine it: {error}",
                              correction.image) from None
        target = out / f"{Path(correction.image).stem}.png"
        write_palette_mask(target, labels, predictor.spec)
        print(f"{target}  ({correction.painted} painted px)")
    return 0


def _check_geojson_output(path, inputs, overwrite: bool, what: str) -> None:
    """Refuse an input, or a file histo-wsss did not write, before any work."""
    import json

    from ..core.runs.outputs import check_output

    def made_here(existing: Path) -> bool:
        try:
            properties = json.loads(existing.read_text()).get("properties") or {}
        except (OSError, ValueError, AttributeError):
            return False
        return properties.get("histo_wsss") == what

    check_output(path, inputs, overwrite=overwrite, made_here=made_here)


def cmd_finetune(args, run, config, layout) -> int:
    """``train-segmenter --with-corrections``: fine-tune on the run's corrections."""
    from ..core.corrections.finetune import finetune_with_corrections
    from ..core.corrections.recipe import FINETUNE_EPOCHS
    from ..core.inference.metrics import format_scores
    from ..core.inference.predict import evaluate, load_predictor
    from .progress import drive

    val = layout.eval_set("val")  # also refits the class offsets, with the corrections
    done = drive(lambda stop: finetune_with_corrections(
        run, config, layout.patches(), strategy=args.strategy,
        epochs=args.epochs_seg or FINETUNE_EPOCHS, device=config.device, stop=stop,
        resume=not args.restart, calibration_set=val))
    if done is None or done.stopped:
        print(f"stopped; run the same command again to resume ({run.root})", file=sys.stderr)
        return 1
    print(done.result)
    if val is not None:
        scores = evaluate(load_predictor(done.result, config.device), val)  # as it predicts
        print(f"on val (corrected images included):\n{format_scores(scores)}", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    """``corrections calibrate``: class offsets refitted on the corrections (and val)."""
    from ..core.corrections.calibrate import calibrate_with_corrections
    from ..core.corrections.store import CorrectionStore
    from ..core.data.classes import DatasetSpec
    from ..core.data.datasets import find_dataset
    from ..core.errors import ConfigError
    from ..core.inference.calibration import MIN_CLASS_IMAGES, counted, describe_offsets
    from ..core.inference.predict import CLASS_OFFSETS_FILE, find_checkpoint
    from ..core.runs.run_dir import RunDirectory

    run = RunDirectory(args.run_dir)
    config = run.config()
    strategy = find_checkpoint(run.root, args.strategy)[0].parent.name
    corrections = CorrectionStore.of_run(run).load_all()
    val = None
    if not args.no_val and config.data_dir:
        val = find_dataset(config.data_dir, DatasetSpec.from_dict(config.dataset)
                           ).eval_set("val")
    record = calibrate_with_corrections(run, strategy, corrections, val, args.device)
    if record is None:
        val_part = f" and {counted(len(val), 'val image')}" if val is not None else ""
        raise ConfigError(f"{counted(len(corrections), 'corrected image')}{val_part}: "
                          f"refitting the class offsets needs a class seen in "
                          f"{MIN_CLASS_IMAGES} images or more; paint more images (nothing was "
                          "changed)", run.root)
    print(describe_offsets(record), file=sys.stderr)
    print(run.segmenter_dir(strategy) / CLASS_OFFSETS_FILE)
    return 0
