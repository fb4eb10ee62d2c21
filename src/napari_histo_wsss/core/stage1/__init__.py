"""Stage 1: the CAM classifier's training, class maps and the pseudo-masks made from them."""
