"""Write docs/cli.md from the parsers' own --help, so the reference never drifts from the code.

    python scripts/cli_reference.py          # rewrite docs/cli.md
    python scripts/cli_reference.py --check  # exit 1 when docs/cli.md is out of date
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
INTRO = (
    "Generated from `histo-wsss COMMAND --help` by `scripts/cli_reference.py`. Every "
    "user-caused problem ends as one line on stderr and exit code 2; Ctrl-C stops a training "
    "job after the current batch, saving a checkpoint (run the same command again to resume)."
)


def reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: make the text stable
    from napari_histo_wsss.cli.main import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction))
    sections = ["# Command line reference", "", INTRO, ""]
    for name, subparser in commands.choices.items():
        sections += [f"## `histo-wsss {name}`", "", "```text",
                     subparser.format_help().rstrip(), "```", ""]
    return "\n".join(sections)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = reference()
    if args.check:
        if DOCS.read_text() != text:
            print(f"{DOCS} is out of date: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    DOCS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
