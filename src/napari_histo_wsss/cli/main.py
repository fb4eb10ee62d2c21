"""``histo-wsss``: the command line over the core jobs (docs/architecture.md).

Every user-caused problem ends as one line on stderr and exit code 2; Ctrl-C stops a training
job cleanly after the current batch, with a checkpoint to resume from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from .. import __version__
from ..core.errors import HistoWsssError


def cmd_info(args) -> int:
    import torch

    from ..core.devices import available_devices

    print(json.dumps({"napari-histo-wsss": __version__, "torch": str(torch.__version__),
                      "devices": available_devices()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .compare import add_compare_parsers
    from .corrections import add_corrections_parsers
    from .pipeline import add_pipeline_parsers
    from .slides import add_slides_parsers
    from .stage1 import add_stage1_parsers
    from .stage2 import add_stage2_parsers

    parser = argparse.ArgumentParser(
        prog="histo-wsss",
        description="Weakly-supervised tissue segmentation of H&E histopathology: patch labels "
                    "-> CAM classifier -> pseudo-masks -> segmenter -> whole slides.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_pipeline_parsers(commands)
    add_stage1_parsers(commands)
    add_stage2_parsers(commands)
    add_slides_parsers(commands)
    add_compare_parsers(commands)
    add_corrections_parsers(commands)

    info = commands.add_parser("info", help="versions and the devices available here")
    info.set_defaults(func=cmd_info)
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
    except (MemoryError, RuntimeError) as error:
        from ..core.devices import OUT_OF_MEMORY_MESSAGE, is_out_of_memory

        if not is_out_of_memory(error):
            raise
        print(f"histo-wsss: error: {OUT_OF_MEMORY_MESSAGE} (--batch-size, --device cpu)",
              file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The ``histo-wsss`` program: ``main`` on the process's arguments, then exit. A process
    started by ``torchrun`` exits through ``distributed.exit_process``, whose reason is there."""
    code = main()
    if "WORLD_SIZE" in os.environ:  # only a torchrun worker can have joined a process group
        from ..core.training.distributed import exit_process

        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
