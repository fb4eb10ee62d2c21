"""Trust maps: what a trained strategy's loss believes about a training patch's pseudo-mask."""

from __future__ import annotations

import numpy as np
import torch

from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.data.datasets import write_palette_mask
from napari_histo_wsss.core.models.segmenter import build_segmenter, checkpoint_config, normalise
from napari_histo_wsss.core.runs.checkpoints import save_checkpoint
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage2.losses import onss_pixel_weights
from napari_histo_wsss.core.stage2.trust_maps import strategy_trust_map

MEAN, STD = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)


def run_with(root, loss: str):
    """A run holding one (untrained) segmenter trained with ``loss`` and its model."""
    torch.manual_seed(0)
    settings = SegmenterConfig(arch="pspnet", encoder_depth=3, weights="none", loss=loss)
    model = build_segmenter(settings, WSSS4LUAD.num_classes)
    config = RunConfig(dataset=WSSS4LUAD.to_dict(), segmenter=settings)
    run = RunDirectory(root)
    run.create(config)
    save_checkpoint(run.segmenter_checkpoint(loss), kind="segmenter",
                    state_dict=model.state_dict(), spec=WSSS4LUAD,
                    config=checkpoint_config(config, loss, 64, "divide255", MEAN, STD))
    return run, model.eval()


def test_onss_trust_map_is_the_loss_weight_and_ce_has_none(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (70, 66, 3), dtype=np.uint8)
    mask = np.zeros((70, 66), np.uint8)
    mask[:, 33:] = 1  # two labels, so ONSS weighs pixels
    label = np.array([1, 1, 0], np.uint8)
    run, model = run_with(tmp_path / "onss", "onss")
    write_palette_mask(run.pseudo_mask_dir("final") / "patch.png", mask, WSSS4LUAD)

    trust = strategy_trust_map(run, "onss", image, "patch.png", label, "cpu")

    assert trust.shape == image.shape[:2]
    side = (64, 64)  # cropped to the encoder's multiple of 8; the rest stays 0
    with torch.no_grad():
        x = normalise(torch.from_numpy(image[None, :side[0], :side[1]].copy()), MEAN, STD)
        logits = model(x).logits
        expected = onss_pixel_weights(logits, torch.from_numpy(mask[None, :64, :64]).long())
    np.testing.assert_allclose(trust[:64, :64], expected[0].numpy(), rtol=1e-4, atol=1e-5)
    assert np.all(trust[64:] == 0) and np.all(trust[:, 64:] == 0)
    assert trust[:64, :64].std() > 0  # weights differ between pixels

    ce_run, _ = run_with(tmp_path / "ce", "ce")
    write_palette_mask(ce_run.pseudo_mask_dir("final") / "patch.png", mask, WSSS4LUAD)
    assert strategy_trust_map(ce_run, "ce", image, "patch.png", label, "cpu") is None
    # No pseudo-mask for this patch: nothing to show, no error.
    assert strategy_trust_map(run, "onss", image, "other.png", label, "cpu") is None
