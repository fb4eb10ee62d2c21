"""Every tooltip of every widget, in one place, so the wording stays consistent."""

TOOLTIPS: dict[str, str] = {
    # data and runs
    "dataset": "Dataset folder: labelled training patches in train/ (or training/, train/img/)"
               " and optional val/img + val/mask. The label format and classes are detected.",
    "run_folder": "Run folder: everything the run produces (config, checkpoints, pseudo-masks,"
                  " losses). An existing run folder is resumed where it stopped.",
    "method": "Method preset: 'recommended' (the default, the best measured) or a published"
              " recipe (MLPS, MSV-ONSS, ARML, ESFAN, HisynSeg, or the plain CAM + CE"
              " baseline); each fills every setting.",
    "backbone": "Classifier backbone: a timm model name, or res38d (needs a weights file).",
    "weights": "Local weights file for the backbone (offline use). Leave empty for the"
               " ImageNet weights that ship with the package.",
    "device": "Where to train: auto picks the best available (CUDA, then MPS, then CPU)."
              " HISTO_WSSS_DEVICE overrides it.",
    "epochs": "Epochs to train (preset: the method's schedule). An existing run keeps the"
              " epochs it was started with, so that resuming ends where an uninterrupted run"
              " would; 'more epochs' trains a finished one longer.",
    "more_epochs": "Train a finished model this many epochs longer (none: train or resume as"
                   " usual). It continues from its last state with a new, shorter learning-"
                   "rate tail; the run records the new total.",
    "segmenter_epochs": "Epochs per strategy (preset: the run's). A stopped strategy resumes"
                        " and trains up to this many.",
    "batch_size": "Patches per optimisation step. Lower it if the device runs out of memory.",
    "schedule": "fast: epochs and batch sizes scaled to the dataset for a CPU; paper: the"
                " published schedules (for a GPU). Used when a new run is created.",
    "self_train": "Self-training: a teacher network trained on the pseudo-masks relabels the"
                  " training patches within their labels, and the segmenter learns from"
                  " those labels (a few minutes more; not for MLPS, whose segmenter learns"
                  " from three layers' masks). Used when a new run is created.",
    "seed": "Random seed of a new run (data order, augmentation, initialisation).",
    "lr": "Learning rate of the newly initialised layers' base rate (the preset's value by"
          " default).",
    "input_size": "Side of the square training crops, in pixels.",
    "candidates": "Classifiers to train, each with its own seed; the one whose val "
                  "pseudo-masks, limited by its class gate, score best is kept (needs val "
                  "masks). Each costs the classifier's training time again.",
    # pseudo-masks
    "source": "Which images to look at: training patches of the dataset, the source images"
              " rebuilt from overlapping patches (with the fused pseudo-mask the recipe trains"
              " on), validation images (with their ground truth), or an RGB image layer of"
              " the viewer.",
    "index": "Browse the images of the chosen source.",
    "image_layer": "An RGB image layer in the viewer to compute class maps for.",
    "generate": "Generate the recipe's pseudo-masks for every training patch (a job; writes"
                " pseudo_masks/ in the run folder).",
    "show_scales": "Also show the per-scale and per-layer class maps of multi-scale and"
                   " multi-layer recipes (hidden layers you can switch on).",
    # segmenter
    "strategies": "Noise-suppression strategies to train, one after another, on the same"
                  " pseudo-masks (select several with Ctrl/Shift to compare them).",
    "arch": "Segmenter architecture.",
    "encoder": "Segmenter encoder: a timm model name (empty: the preset's, EfficientNet-Lite0"
               " with the ImageNet weights that ship with the package).",
    # compare
    "compare_source": "Compare on a validation image (IoU against its mask), a training patch"
                      " (shows each strategy's trust map over its pseudo-mask), an image"
                      " layer, or the current view of a slide layer.",
    "grid": "Show the image, ground truth and every prediction side by side in napari's grid.",
    "compare_strategies": "Trained strategies of the run to compare.",
    # slides
    "slide_layer": "The whole-slide image layer to segment (opened with this plugin's reader,"
                   " or any multiscale RGB image).",
    "slide_file": "The slide file, when the layer does not say where it came from.",
    "strategy": "Which trained segmenter of the run to use.",
    "output": "OME-Zarr folder for the result (labels pyramid + class probabilities). An"
              " interrupted run with the same settings continues where it stopped.",
    "target_mpp": "Microns per pixel to segment at (0: the resolution the model was trained"
                  " at, or the chosen level when unknown).",
    "level": "Pyramid level to read when the slide has no microns-per-pixel (0: full"
             " resolution).",
    "tile": "Side of the tiles the segmenter sees, in pixels at the working resolution.",
    "halo": "Context added around every tile and cropped or blended away, in pixels.",
    "blend": "How overlapping tile borders are merged: crop (fastest), or linear / gaussian"
             " weighted averaging (no seams).",
    "tissue_mask": "Skip tiles without tissue (Otsu on a low-resolution level).",
    # inference engines (docs/engines.md)
    "engine": "What runs the segmenter on a CPU: auto (the fastest installed engine that"
              " predicts like torch fp32 on real tiles, chosen once per model), torch,"
              " onnxruntime or openvino (the last two need pip install"
              " 'napari-histo-wsss[fast]'). On a GPU torch runs. HISTO_WSSS_ENGINE overrides"
              " it.",
    "precision": "auto: the engine's choice (auto takes bf16 only where its labels agree with"
                 " fp32 on 99.5 % of a real tile's pixels); fp32; or bf16 (faster on CPUs"
                 " with bf16 kernels).",
    "export_zarr": "Copy the result (OME-Zarr) to another folder.",
    "export_geojson": "Write the tissue regions as GeoJSON polygons for QuPath.",
}
