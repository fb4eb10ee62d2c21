"""``histo-wsss``: the command line. ``flags`` holds what several commands share; each other
module registers one group of commands; ``main`` builds the parser and turns errors into one line.
"""

from .main import main

__all__ = ["main"]
