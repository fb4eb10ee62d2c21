"""Trust maps: the per-pixel weight a trained strategy's loss gives a patch's pseudo-mask.

Noise-suppression losses (ONSS, ARML, ANM) down-weight pixels they believe mislabelled; showing
those weights over a training patch tells a user what each strategy learnt to ignore. The napari
comparison view shows them beside the predictions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config.run_config import RunConfig
from ..data.classes import DatasetSpec
from ..data.datasets import read_mask
from ..models.segmenter import load_segmenter, normalise
from ..runs.run_dir import RunDirectory
from .losses import LossContext, LossTargets, build_loss


def strategy_trust_map(run: RunDirectory, strategy: str, image: np.ndarray, patch_name: str,
                       patch_label: np.ndarray, device) -> np.ndarray | None:
    """The per-pixel weight the strategy's loss gives this patch's pseudo-mask, with the trained
    segmenter's predictions (None for losses that weigh every pixel alike).

    The loss runs as at the end of training: its own pseudo-mask targets, the last epoch of
    its schedule, and dropout on where the strategy compares perturbed passes (ARML).
    """
    model, payload = load_segmenter(run.segmenter_checkpoint(strategy), device)
    saved = payload["config"]
    settings = RunConfig.from_dict(saved["run"]).segmenter
    spec = DatasetSpec.from_dict(payload["dataset"])
    loss = build_loss(settings)
    mask_name = Path(patch_name).with_suffix(".png").name
    paths = [run.pseudo_mask_dir(target) / mask_name for target in settings.targets]
    if not all(path.is_file() for path in paths):
        return None
    multiple = model.input_multiple
    height = image.shape[0] // multiple * multiple
    width = image.shape[1] // multiple * multiple
    if not height or not width:
        return None
    masks = [read_mask(path, spec)[:height, :width].copy() for path in paths]
    model.eval()
    if loss.num_passes > 1:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.train()
    batch = torch.from_numpy(np.ascontiguousarray(image[None, :height, :width])).to(device)
    x = normalise(batch, saved["normalisation"]["mean"], saved["normalisation"]["std"])
    targets = LossTargets([torch.as_tensor(m[None], dtype=torch.int64, device=device)
                           for m in masks],
                          torch.as_tensor(patch_label[None], dtype=torch.float32, device=device))
    epochs = max(settings.epochs, 1)
    with torch.no_grad():
        passes = [model(x) for _ in range(loss.num_passes)]
        result = loss(passes, targets, LossContext(spec.num_classes, epoch=epochs - 1,
                                                   total_epochs=epochs))
    if result.pixel_weight is None:
        return None
    trust = np.zeros(image.shape[:2], dtype=np.float32)
    trust[:height, :width] = result.pixel_weight[0].float().cpu().numpy()
    return trust
