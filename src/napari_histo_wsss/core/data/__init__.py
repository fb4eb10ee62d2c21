"""Datasets: class descriptions, weakly-labelled patches and evaluation images with masks."""
