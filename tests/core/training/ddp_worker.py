"""Run by test_distributed.py, under torchrun or alone: one training job, then one line saying
how many events this process saw.

    python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py \\
        segmenter RUN_DIR DATA_DIR 0:32:2
    python ddp_worker.py loop OUT_DIR DATA_DIR 0:32:2
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_histo_wsss.core.data.datasets import find_dataset
from napari_histo_wsss.core.events import Done, StopToken
from napari_histo_wsss.core.runs.run_dir import RunDirectory
from napari_histo_wsss.core.stage2.train_segmenter import train_segmenter
from napari_histo_wsss.core.training import distributed
from napari_histo_wsss.core.training.loop import EpochResult, EpochTrainer, run_epochs
from napari_histo_wsss.core.training.sampling import epoch_order
from napari_histo_wsss.core.training.schedules import set_lr
from napari_histo_wsss.core.training.state import TrainingState
from napari_histo_wsss.core.training.stepper import Stepper


class SmallConvTrainer(EpochTrainer):
    """A small CNN without BatchNorm or dropout (whose per-rank statistics would make ranks
    differ from one process) classifying real patches on the loop: 2 epochs of batches of 8."""

    stage = done_stage = "small-cnn"

    def __init__(self, folder: Path, patches, device: torch.device):
        self.folder, self.device = folder, device
        self.images = torch.stack([torch.from_numpy(np.ascontiguousarray(
            patches.image(i)[:64, :64])).permute(2, 0, 1).float() / 255
            for i in range(len(patches))])
        self.labels = torch.from_numpy(patches.labels.astype(np.float32))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))
        self.model = model.to(device)
        if distributed.is_main_process():
            torch.save(model.state_dict(), folder / "initial.pt")
        optimizer = torch.optim.SGD([{"params": model.parameters(), "base_lr": 0.5}], lr=0.5,
                                    momentum=0.9)
        self.stepper = Stepper(self.model, optimizer, device, "test")
        self.state, self.epochs, self.batch_size = TrainingState(), 2, 8
        self.batches_per_epoch = len(patches) // self.batch_size
        self.last_path, self.model_path = folder / "last.pt", folder / "model.pt"
        self.samples_seen = 0

    def begin_epoch(self, epoch: int, first_batch: int) -> None:
        self.order = epoch_order(self.labels.numpy(), "uniform", 0, epoch)

    def set_lr(self, epoch: int, index: int) -> float:
        return set_lr(self.stepper.optimizer, "poly", epoch * self.batches_per_epoch + index,
                      self.epochs * self.batches_per_epoch)

    def step(self, model, epoch: int, index: int):
        positions = distributed.shard(np.arange(index * self.batch_size,
                                                (index + 1) * self.batch_size))
        chosen = torch.from_numpy(self.order[positions])
        self.samples_seen += len(chosen)
        logits = model(self.images[chosen].to(self.device))
        return F.multilabel_soft_margin_loss(logits, self.labels[chosen].to(self.device)), {}

    def end_epoch(self, epoch, train_loss, parts, lr) -> EpochResult:
        return EpochResult()

    def save(self, path: Path, with_optimizer: bool, stopped: bool = False) -> None:
        torch.save(self.model.state_dict(), path)

    def record(self, epoch, train_loss, parts, lr, result) -> None:
        with (self.folder / "log.txt").open("a") as log:
            log.write(f"{epoch} {train_loss:.6f}\n")


def main(job: str, out: str, data_dir: str, chosen: str) -> None:
    start, stop, step = (int(part) for part in chosen.split(":"))
    patches = find_dataset(data_dir).patches().subset(range(start, stop, step))
    device = distributed.setup(torch.device("cpu"))
    seen = ""
    if job == "loop":
        Path(out).mkdir(parents=True, exist_ok=True)
        trainer = SmallConvTrainer(Path(out), patches, device)
        events = list(run_epochs(trainer, StopToken()))
        seen = f", {trainer.samples_seen} samples"
    else:
        run = RunDirectory(out)
        events = list(train_segmenter(run, run.config(), patches, device=device))
    done = isinstance(events[-1], Done) and not events[-1].stopped
    print(f"rank {os.environ.get('RANK', 0)}: {len(events)} events, finished {done}{seen}",
          flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    distributed.exit_process(0)  # as the command line ends: see exit_process for why
