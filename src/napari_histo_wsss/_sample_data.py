"""napari sample data, all bundled with the package so it works offline.

* a real H&E slide region (CMU-1, CC0) as a 3-level pyramid with its 0.499 um/px scale;
* real WSSS4LUAD val images with their ground-truth masks, laid out side by side (the
  training patches have image-level labels only, nothing to overlay).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_ROOT = Path(__file__).parent / "sample_data"
SLIDE_PATH = SAMPLE_ROOT / "cmu-1-small-region-pyramid.tif"
WSSS4LUAD_VAL = SAMPLE_ROOT / "wsss4luad" / "val"
#: Val images shown: tumour + stroma, and normal tissue (rare, so one is always included).
PATCH_NAMES = ("00", "02", "03", "21")
_GAP = 16


def sample_slide() -> list[tuple]:
    """The bundled H&E slide region as a multiscale image."""
    from ._reader import slide_layer_data
    from .core.wsi.slides import open_slide

    return [slide_layer_data(open_slide(SLIDE_PATH))]


def sample_labelled_patches() -> list[tuple]:
    """A few WSSS4LUAD val images and their masks (0 tumour, 1 stroma, 2 normal, 3 background).

    Masks keep the dataset's values; the label colormap gives them the dataset colours and
    treats 3 as the background, so painting and erasing stay in the dataset's convention.
    """
    from napari.utils.colormaps import DirectLabelColormap
    from PIL import Image

    from .core.data.classes import WSSS4LUAD

    background = WSSS4LUAD.background_index
    colours = {
        index: np.asarray([*colour, 255], float) / 255.0
        for index, colour in enumerate(WSSS4LUAD.colours[:background])
    }
    colours[background] = colours[None] = np.zeros(4)
    layers = []
    x_offset = 0
    for name in PATCH_NAMES:
        image = np.asarray(Image.open(WSSS4LUAD_VAL / "img" / f"{name}.png").convert("RGB"))
        with Image.open(WSSS4LUAD_VAL / "mask" / f"{name}.png") as mask_file:
            mask = np.asarray(mask_file)  # palette indices, not colours
        translate = (0, x_offset)
        layers.append((image, {"name": f"WSSS4LUAD val {name}", "rgb": True,
                               "translate": translate}, "image"))
        layers.append((mask, {
            "name": f"WSSS4LUAD val {name} mask", "translate": translate, "opacity": 0.5,
            "colormap": DirectLabelColormap(color_dict=colours, background_value=background),
            "features": {"class": [*WSSS4LUAD.class_names, "background"]},
        }, "labels"))
        x_offset += image.shape[1] + _GAP
    return layers
