"""TrainingState: a plain dict in checkpoints, older classifier dicts still resume."""

from __future__ import annotations

import torch

from napari_histo_wsss.core.training.state import TrainingState


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    state = TrainingState(extra={"round": 2, "best_round": 1})
    state.add_batch(0.5, {"dice": 0.25})
    state.add_batch(1.5, {"dice": 0.75})
    loss, parts = state.finish_epoch(2)
    assert (loss, parts) == (1.0, {"dice": 0.5})
    state.history.append({"epoch": 1, "train_loss": loss})
    state.best_miou, state.best_epoch = 0.4, 1
    torch.save(state.to_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert loaded["round"] == 2 and loaded["epoch"] == 1 and loaded["batch"] == 0
    again = TrainingState.from_dict(loaded)
    assert again == state
    state.history[0]["train_loss"] = 9.0  # the saved dict is a copy, not a view
    assert loaded["history"][0]["train_loss"] == 1.0


def test_a_classifier_checkpoint_from_before_the_state_resumes_at_its_place():
    old = {"step": 7, "epoch_losses": [0.9], "running_loss": 1.2, "running_batches": 2,
           "seconds": 3.5, "total_steps": 10, "steps_per_epoch": 5, "batch_size": 8,
           "input_size": 64, "seed": 0, "finished": False, "stopped": True}
    state = TrainingState.from_dict(old)
    assert (state.epoch, state.batch, state.step) == (1, 2, 7)
    assert state.loss_sum == 1.2 and state.seconds == 3.5
    assert state.history == [{"epoch": 1, "train_loss": 0.9}]
    assert "running_loss" not in state.to_dict() and state.extra["total_steps"] == 10
