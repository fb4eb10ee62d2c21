"""Networks: backbones, stage-1 feature modules, the CAM classifier and the segmenters."""
