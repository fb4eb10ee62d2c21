"""Inference engines: exports predict like torch on real tissue, follow the checkpoint, fall
back to torch with one line when they cannot be trusted, and ``auto`` picks only what exists."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
from napari_histo_wsss.core.data.classes import WSSS4LUAD
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.inference.engine_choice import build_engine, candidates, real_tiles
from napari_histo_wsss.core.inference.engines import ExportCache, installed_engines
from napari_histo_wsss.core.inference.predict import load_predictor
from napari_histo_wsss.core.models.segmenter import (
    SegmenterOutput,
    build_segmenter,
    checkpoint_config,
)
from napari_histo_wsss.core.runs.checkpoints import save_checkpoint
from napari_histo_wsss.core.runs.run_dir import RunDirectory

#: ImageNet-like normalisation in the 0-255 scale, as the trainers save it.
NORMALISATION = {"mean": (123.7, 116.3, 103.5), "std": (58.4, 57.1, 57.4)}
SIDE = 256


@pytest.fixture(autouse=True)
def engine_as_requested(monkeypatch):
    """The suite forces torch through HISTO_WSSS_ENGINE; these tests choose engines."""
    monkeypatch.delenv("HISTO_WSSS_ENGINE", raising=False)


def save_run(root, seed: int = 0) -> RunDirectory:
    """A run holding a small DeepLabV3+ (ImageNet EfficientNet-Lite0 encoder, seeded head)."""
    torch.manual_seed(seed)
    settings = SegmenterConfig(arch="deeplabv3plus", encoder_depth=3)
    model = build_segmenter(settings, WSSS4LUAD.num_classes)
    config = RunConfig(dataset=WSSS4LUAD.to_dict(), mpp=0.5)
    config.segmenter = settings
    run = RunDirectory(root)
    save_checkpoint(run.segmenter_checkpoint("ce"), kind="segmenter",
                    state_dict=model.state_dict(), spec=WSSS4LUAD,
                    config=checkpoint_config(config, "ce", SIDE, "imagenet", **NORMALISATION))
    run.create(config)
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("engines") / "run")


@pytest.fixture(scope="module")
def tissue(val_images):
    """Real H&E: two tiles of the bundled CMU-1 slide and a WSSS4LUAD val image."""
    return [*real_tiles(SIDE), val_images[0]]


@pytest.fixture(scope="module")
def val_images(sample_dataset_dir):
    from napari_histo_wsss.core.data.datasets import find_dataset

    val = find_dataset(sample_dataset_dir).eval_set("val")
    return [val.pair(0)[0]]


def labels_of(predictor, images) -> list[np.ndarray]:
    return [predictor.predict_batch(image[None])[0].argmax(axis=0) for image in images]


def agreement(first, second) -> float:
    return float(np.mean(np.concatenate([(a == b).ravel() for a, b in zip(first, second,
                                                                             strict=True)])))


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_exported_model_gives_torchs_labels_on_real_tissue(run, tissue, engine):
    pytest.importorskip(engine)
    torch_predictor = load_predictor(run.root, "cpu", engine="torch")
    exported = load_predictor(run.root, "cpu", engine=engine, precision="fp32")
    assert (exported.engine.name, exported.engine.precision) == (engine, "fp32")
    assert exported.engine.note == ""  # no fallback
    assert agreement(labels_of(exported, tissue), labels_of(torch_predictor, tissue)) >= 0.999
    probabilities = exported.predict_batch(tissue[-1][None])
    np.testing.assert_allclose(probabilities, torch_predictor.predict_batch(tissue[-1][None]),
                               atol=1e-3)
    exports = list((run.segmenter_dir("ce") / "engines").glob("segmenter-*.onnx"))
    assert [path.name for path in exports] == [
        ExportCache.beside(run.segmenter_checkpoint("ce")).model_path(None).name]


def test_a_changed_checkpoint_is_exported_again(tmp_path, tissue):
    pytest.importorskip("onnxruntime")
    run = save_run(tmp_path / "run", seed=0)
    first = load_predictor(run.root, "cpu", engine="onnxruntime")
    old_export = ExportCache.beside(run.segmenter_checkpoint("ce")).model_path(None)
    assert old_export.is_file()
    save_run(tmp_path / "run", seed=1)  # retrained: other weights in the same file
    second = load_predictor(run.root, "cpu", engine="onnxruntime")
    new_export = ExportCache.beside(run.segmenter_checkpoint("ce")).model_path(None)
    assert new_export != old_export and new_export.is_file() and not old_export.exists()
    torch_labels = labels_of(load_predictor(run.root, "cpu", engine="torch"), tissue)
    assert agreement(labels_of(second, tissue), torch_labels) >= 0.999
    assert agreement(labels_of(first, tissue), torch_labels) < 0.99  # the old model differs


def test_an_export_that_cannot_be_written_falls_back_to_torch_with_one_line(tmp_path, tissue):
    pytest.importorskip("onnxruntime")
    run = save_run(tmp_path / "run")
    (run.segmenter_dir("ce") / "engines").write_text("not a folder")  # the cache is blocked
    predictor = load_predictor(run.root, "cpu", engine="onnxruntime")
    assert predictor.engine.name == "torch"
    note = predictor.engine.note
    assert note.startswith("onnxruntime not used (") and "running torch fp32" in note
    assert "\n" not in note
    torch_labels = labels_of(load_predictor(run.root, "cpu", engine="torch"), tissue)
    assert agreement(labels_of(predictor, tissue), torch_labels) == 1.0


class TracesOneBranch(torch.nn.Module):
    """A network whose forward depends on its input's values: tracing (on zeros) keeps only
    one branch, so its export differs from torch on real tissue and must not be used."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, WSSS4LUAD.num_classes, 3, padding=1)

    def forward(self, x):
        logits = self.conv(x)
        return SegmenterOutput(logits if x.abs().mean() > 0.01 else -logits)


def test_an_export_that_disagrees_with_torch_is_not_used(tmp_path):
    pytest.importorskip("onnxruntime")
    model = TracesOneBranch().eval()
    engine = build_engine(model, "onnxruntime", device=torch.device("cpu"),
                          cache=ExportCache(tmp_path, "branchy"), tile=64, **NORMALISATION)
    assert engine.name == "torch"
    assert "onnxruntime not used (logits differ from torch" in engine.note


def test_auto_never_picks_an_engine_that_is_not_installed(run, tissue, monkeypatch):
    for module in ("onnxruntime", "openvino"):
        monkeypatch.setitem(sys.modules, module, None)  # import now fails: not installed
    assert installed_engines() == ["torch"]
    assert {name for name, _ in candidates(None)} == {"torch"}
    predictor = load_predictor(run.root, "cpu", engine="auto")
    assert predictor.engine.name == "torch"
    with pytest.raises(ConfigError, match="openvino engine is not installed"):
        load_predictor(run.root, "cpu", engine="openvino")


def test_auto_picks_an_installed_engine_that_predicts_like_torch_and_remembers(run, tissue):
    predictor = load_predictor(run.root, "cpu", engine="auto")
    assert predictor.engine.name in installed_engines()
    assert predictor.engine.note.startswith(f"engine {predictor.engine.label} (auto")
    minimum = 0.995 if predictor.engine.precision == "bf16" else 0.999
    torch_labels = labels_of(load_predictor(run.root, "cpu", engine="torch"), tissue)
    assert agreement(labels_of(predictor, tissue), torch_labels) >= minimum
    saved = list((run.segmenter_dir("ce") / "engines").glob("calibration-*.json"))
    assert len(saved) == 1
    again = load_predictor(run.root, "cpu", engine="auto")
    assert again.engine.label == predictor.engine.label


def test_unknown_choices_and_impossible_pairs_are_refused(run):
    with pytest.raises(ConfigError, match="unknown inference engine 'tensorrt'"):
        load_predictor(run.root, "cpu", engine="tensorrt")
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        load_predictor(run.root, "cpu", engine="torch", precision="fp16")
    if "onnxruntime" in installed_engines():
        with pytest.raises(ConfigError, match="onnxruntime engine runs fp32 only"):
            load_predictor(run.root, "cpu", engine="onnxruntime", precision="bf16")


class PoolsToFixedBins(torch.nn.Module):
    """PSPNet's pyramid pooling in small: adaptive pooling to 3x3 bins, which the TorchScript
    exporter cannot express for an input of unknown size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(16, WSSS4LUAD.num_classes, 1)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        pooled = torch.nn.functional.adaptive_avg_pool2d(features, 3)
        context = torch.nn.functional.interpolate(pooled, size=x.shape[-2:], mode="bilinear")
        return SegmenterOutput(self.head(torch.cat([features, context], dim=1)))


def test_a_network_that_exports_only_at_fixed_sizes_gets_one_export_per_size(tmp_path, capfd):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    cache = ExportCache(tmp_path, "pooled")
    model = PoolsToFixedBins().eval()
    engine = build_engine(model, "onnxruntime", device=torch.device("cpu"), cache=cache,
                          tile=64, **NORMALISATION)
    assert engine.name == "onnxruntime" and engine.note == ""
    assert cache.fixed_size_marker.is_file() and cache.model_path((64, 64)).is_file()
    assert capfd.readouterr().out == ""  # the failed first export printed nothing
    x = torch.randn(2, 3, 96, 64)  # a new size: exported on first use, checked against torch
    with torch.inference_mode():
        np.testing.assert_allclose(engine(x), model(x).logits, atol=1e-4)
        np.testing.assert_allclose(engine(x), model(x).logits, atol=1e-4)
    assert cache.model_path((96, 64)).is_file() and engine.forward.fallback_sizes == []


def test_cli_evaluate_names_the_engine_on_stderr_and_keeps_json_clean(run, capfd,
                                                                     sample_dataset_dir):
    import json

    from napari_histo_wsss.cli.main import main

    val = sample_dataset_dir / "val"
    assert main(["evaluate", str(run.root), str(val / "img"), str(val / "mask"), "--json",
                 "--engine", "auto"]) == 0
    captured = capfd.readouterr()
    assert "miou" in json.loads(captured.out)
    assert captured.err.startswith("histo-wsss: engine ")
