"""``histo-wsss segment-slide``: a trained run applied to whole slides, on the command line.

One slide writes ``--out OUT.zarr``; several write ``OUT_DIR/<slide name>.zarr``, here one
after another or, with ``--scheduler``, as tasks on a dask.distributed cluster (one model per
worker). ``--geojson`` adds QuPath annotations (a file for one slide, a folder for several).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from ..core.inference.tiling import BLEND_MODES
from .flags import (
    add_appearance_flag,
    add_batch_size_flag,
    add_device_flag,
    add_engine_flags,
    add_overwrite_flag,
    non_negative_int,
    positive_float,
    positive_int,
    print_engine_note,
    print_offsets_note,
)


def add_slides_parsers(commands) -> None:
    """Register ``segment-slide`` on the ``histo-wsss`` sub-command parser."""
    parser = commands.add_parser(
        "segment-slide",
        help="segment whole slides with a trained run into OME-Zarr (+ GeoJSON for QuPath)",
        description="Tiled, seam-free segmentation of whole slides into OME-Zarr label and "
                    "probability pyramids. An interrupted run resumes when run again.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="run directory (or segmenter checkpoint) to predict with")
    parser.add_argument("slides", nargs="+", metavar="SLIDE",
                        help="slide files (SVS, NDPI, OME-TIFF, pyramidal TIFF, OME-Zarr...)")
    parser.add_argument("--out", required=True, metavar="OUT",
                        help="OUT.zarr for one slide, a folder for several (never a slide, and "
                             "never a folder of other files)")
    parser.add_argument("--geojson", metavar="F",
                        help="also export class polygons for QuPath (file, or folder for several)")
    add_overwrite_flag(parser, "replace existing --geojson files that histo-wsss did not write")
    resolution = parser.add_mutually_exclusive_group()
    resolution.add_argument("--mpp", type=positive_float,
                            help="microns per pixel to work at (default: the model's)")
    resolution.add_argument("--level", type=non_negative_int, help="pyramid level to work at")
    parser.add_argument("--tile", type=positive_int, default=512,
                        help="model input size (default 512)")
    parser.add_argument("--halo", type=non_negative_int, default=64,
                        help="context margin on each side of a tile (default 64)")
    parser.add_argument("--blend", choices=BLEND_MODES.names(), default="gaussian",
                        help="how overlapping tiles are merged (default gaussian)")
    add_batch_size_flag(parser, "tiles per batch (default 8)")
    add_device_flag(parser)
    add_engine_flags(parser)
    add_appearance_flag(parser)
    parser.add_argument("--no-tissue-mask", action="store_true",
                        help="predict every tile, background included")
    parser.add_argument("--no-resume", action="store_true",
                        help="start again even if OUT holds an interrupted run")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="dask.distributed scheduler, e.g. tcp://host:8786")
    parser.set_defaults(func=cmd_segment_slide, batch_size=8)


def cmd_segment_slide(args) -> int:
    """Run the command; 0 on success, 1 when stopped, 2 when some slide failed."""
    from ..core.inference.predict import load_predictor
    from ..core.wsi.geojson_export import segmentation_to_geojson
    from ..core.wsi.slide_inference import segment_slides
    from .progress import drive

    slides = [Path(slide) for slide in args.slides]
    out = Path(args.out)
    _check_outputs(args, slides)
    outputs = [out] if len(slides) == 1 else out
    options = {
        "target_mpp": args.mpp, "level": args.level, "tile": args.tile, "halo": args.halo,
        "blend": args.blend, "batch_size": args.batch_size,
        "tissue_mask": not args.no_tissue_mask, "resume": not args.no_resume,
    }
    engine = {"engine": args.engine, "precision": args.precision,
              "appearance_weight": args.appearance_weight}
    if args.scheduler:
        predictor = partial(load_predictor, args.run_dir, args.device, **engine)
    else:
        predictor = load_predictor(args.run_dir, args.device, **engine)
        print_engine_note(predictor)
        print_offsets_note(predictor)
    done = drive(lambda stop: segment_slides(
        predictor, slides, outputs, scheduler=args.scheduler, stop=stop, **options))
    if done is None or done.stopped:
        print("stopped; run the same command again to resume", file=sys.stderr)
        return 1
    result = done.result
    try:
        for zarr_path in result.outputs:
            print(zarr_path, flush=True)
            if args.geojson:
                geojson = _geojson_path(args, zarr_path.stem, len(slides))
                segmentation_to_geojson(zarr_path, geojson)  # written atomically
                print(geojson, flush=True)
    except KeyboardInterrupt:
        print("stopped while exporting GeoJSON; run the same command again to finish (the "
              "segmentations are complete and are not computed again)", file=sys.stderr)
        return 1
    for problem in result.failures.values():
        print(f"histo-wsss: error: {problem}", file=sys.stderr)
    return 2 if result.failures else 0


def _geojson_path(args, name: str, slide_count: int) -> Path:
    geojson = Path(args.geojson)
    return geojson / f"{name}.geojson" if slide_count > 1 else geojson


def _check_outputs(args, slides: list[Path]) -> None:
    """Every output path is refused or accepted before the model is loaded (core/runs/outputs)."""
    from ..core.runs.outputs import COLLECTION, FILE, FOLDER, OutputError, check_output
    from ..core.wsi.geojson_export import is_exported_geojson
    from ..core.wsi.ome_zarr_labels import is_segmentation
    from ..core.wsi.slides import slide_name

    inputs = [*slides, Path(args.run_dir)]
    out = Path(args.out)
    if len(slides) == 1:
        stores = [out]
    else:
        check_output(out, inputs, kind=COLLECTION)
        stores = [out / f"{slide_name(slide)}.zarr" for slide in slides]
    for store in stores:
        check_output(store, inputs, kind=FOLDER, made_here=is_segmentation)
    if args.geojson is None:
        return
    if Path(args.geojson).expanduser().resolve() == out.expanduser().resolve():
        raise OutputError("is given as both --out and --geojson; give the GeoJSON its own "
                          "path (for example OUT.geojson)", args.geojson)
    if len(slides) > 1:
        check_output(args.geojson, inputs, kind=COLLECTION)
    for store in stores:
        # The export is named after the written store (cmd_segment_slide does the same).
        check_output(_geojson_path(args, store.stem, len(slides)), [*inputs, store],
                     kind=FILE, overwrite=args.overwrite, made_here=is_exported_geojson)
