"""Weakly-supervised tissue segmentation of H&E slides: library, CLI and napari plugin.

Kept import-light on purpose: napari scans plugins at start-up, so torch and Qt are
imported only by the modules that need them.
"""

__version__ = "0.1.0"
