"""Whole slides: lazy reading, tissue masks, tiled segmentation to OME-Zarr and GeoJSON."""
