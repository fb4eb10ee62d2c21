"""Thin napari dock widgets over the core jobs."""
