"""Stage 2: training a segmenter on pseudo-masks with a noise-suppression loss."""
