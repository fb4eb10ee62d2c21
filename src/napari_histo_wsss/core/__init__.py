"""The library: data, models, training jobs, pseudo-masks, metrics and slides.

Nothing in this package imports Qt or napari; the CLI, the widgets and the tests all use it.
"""
