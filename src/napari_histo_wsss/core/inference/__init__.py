"""Prediction with a trained segmenter, tiled windows and the evaluation metrics."""
