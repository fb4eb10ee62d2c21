"""torchrun: two CPU ranks (gloo) train like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_histo_wsss.core.config.run_config import RunConfig, SegmenterConfig
from napari_histo_wsss.core.data.datasets import find_dataset, write_palette_mask
from napari_histo_wsss.core.models.segmenter import build_segmenter
from napari_histo_wsss.core.runs.checkpoints import load_checkpoint
from napari_histo_wsss.core.runs.run_dir import LossLog, RunDirectory
from napari_histo_wsss.core.stage2.train_segmenter import train_segmenter
from napari_histo_wsss.core.training import distributed

WORKER = Path(__file__).with_name("ddp_worker.py")
CHOSEN = "0:32:2"  # 16 real patches: two global batches of 8, so 4 images per rank and step
SRC = Path(__file__).resolve().parents[3] / "src"


def run_python(arguments: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``python ARGUMENTS`` with this checkout's package importable."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *arguments], env=env, capture_output=True,
                          text=True, timeout=timeout)


def under_torchrun(ranks: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]


def launch(job: str, out: Path, data_dir: Path, ranks: int) -> str:
    """The worker's output, run under torchrun with ``ranks`` processes (or alone)."""
    command = [str(WORKER), job, str(out), str(data_dir), CHOSEN]
    if ranks > 1:
        command[0:0] = under_torchrun(ranks)
    finished = run_python(command)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


def flat(state: dict) -> torch.Tensor:
    return torch.cat([value.flatten().float() for key, value in state.items()
                      if value.is_floating_point() and "running" not in key])


def test_one_process_takes_the_whole_batch():
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert np.array_equal(distributed.shard(np.arange(8)), np.arange(8))


def test_two_ranks_on_the_loop_end_with_the_weights_of_one_process(tmp_path,
                                                                   sample_dataset_dir):
    alone = launch("loop", tmp_path / "alone", sample_dataset_dir, ranks=1)
    shared = launch("loop", tmp_path / "shared", sample_dataset_dir, ranks=2)
    # Started, per epoch 2 Batch, Epoch and 2 CheckpointSaved, Done; each rank takes half of
    # the 2 x 2 batches of 8
    assert "rank 0: 12 events, finished True, 32 samples" in alone
    assert "rank 0: 12 events, finished True, 16 samples" in shared
    assert "rank 1: 1 events, finished True, 16 samples" in shared  # only rank 0 reports
    assert len((tmp_path / "shared" / "log.txt").read_text().splitlines()) == 2  # one writer
    initial, one, two = (flat(torch.load(path, weights_only=True)) for path in (
        tmp_path / "alone" / "initial.pt", tmp_path / "alone" / "model.pt",
        tmp_path / "shared" / "model.pt"))
    assert (one - initial).abs().max() > 1e-2  # it learnt something...
    assert torch.allclose(one, two, rtol=1e-4, atol=1e-5)  # ... the same in both set-ups


def test_a_process_in_a_group_exits_with_its_code_and_its_output():
    # stdout to a pipe is block-buffered: without the flush os._exit would drop the line
    script = """
import torch.distributed as dist
from napari_histo_wsss.core.training import distributed
dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
print("results saved")
distributed.exit_process(3)
"""
    finished = run_python(["-c", script], timeout=120)
    assert (finished.returncode, finished.stdout) == (3, "results saved\n"), finished.stderr


def test_a_process_alone_exits_through_sys_exit():
    with pytest.raises(SystemExit) as exited:
        distributed.exit_process(4)
    assert exited.value.code == 4


def make_run(root: Path, layout, patches) -> tuple[RunDirectory, RunConfig]:
    """A tiny PSPNet with pseudo-masks of each patch's first class."""
    settings = SegmenterConfig(arch="pspnet", encoder_depth=3, loss="ce", epochs=1,
                               batch_size=8, input_size=64, lr=0.005)
    config = RunConfig(dataset=layout.spec.to_dict(), data_dir=str(layout.root),
                       segmenter=settings)
    run = RunDirectory(root)
    run.create(config)
    for index, path in enumerate(patches.paths):
        height, width = patches.image(index).shape[:2]
        first = int(np.flatnonzero(patches.labels[index])[0])
        write_palette_mask(run.pseudo_mask_dir("final") / path.with_suffix(".png").name,
                           np.full((height, width), first, np.uint8), layout.spec)
    return run, config


def test_two_ranks_train_a_segmenter_close_to_one_process(tmp_path, sample_dataset_dir):
    layout = find_dataset(sample_dataset_dir)
    start, stop, step = (int(part) for part in CHOSEN.split(":"))
    patches = layout.patches().subset(range(start, stop, step))
    single, config = make_run(tmp_path / "single", layout, patches)
    list(train_segmenter(single, config, patches, device="cpu"))
    ranks, _ = make_run(tmp_path / "ranks", layout, patches)
    output = launch("segmenter", ranks.root, layout.root, ranks=2)
    assert "rank 1: 1 events, finished True" in output
    assert len(LossLog(ranks.segmenter_dir("ce") / "losses.csv", []).rows()) == 1

    torch.manual_seed(config.seed)
    initial = flat(build_segmenter(config.segmenter, layout.spec.num_classes).state_dict())
    one, two = (flat(load_checkpoint(run.segmenter_checkpoint("ce"))["state_dict"])
                for run in (single, ranks))
    # BatchNorm statistics and dropout masks are per rank (half the batch each), which moves
    # a step's gradient by about a third here; the data and the averaging are the same.
    assert (two - one).norm() < 0.75 * (one - initial).norm()


def test_the_command_line_under_torchrun_trains_and_exits_cleanly(tmp_path, sample_dataset_dir):
    """The launch docs/distributed.md gives, on two CPU ranks: exit code 0 and one model."""
    layout = find_dataset(sample_dataset_dir)
    run, _ = make_run(tmp_path / "run", layout, layout.patches())
    finished = run_python([*under_torchrun(2), "-m", "napari_histo_wsss.cli.main",
                           "train-segmenter", str(run.root), "--loss", "ce", "--device", "cpu"])
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert load_checkpoint(run.segmenter_checkpoint("ce"))["state_dict"]
    assert len(LossLog(run.segmenter_dir("ce") / "losses.csv", []).rows()) == 1
