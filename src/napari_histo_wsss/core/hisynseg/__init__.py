"""HisynSeg: synthetic training images with exact masks, their filter and two-round training."""
