"""The tie rule of the best checkpoint (``driver.results.best_checkpoint``): of epochs with equal
selection metric the latest is best, the one Tune keeps. Ray's own checkpoint manager, fed a
history with a tie; no Ray cluster, no training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from driver.results import _row, best_checkpoint

# (val_acc, test_acc) per epoch: val_acc ties at epochs 2 and 3, test_acc tells them apart
HISTORY = [(0.30, 0.20), (0.50, 0.35), (0.50, 0.45), (0.40, 0.50)]


def _result(folder: Path, num_to_keep: int | None):
    """A ``ray.tune.Result`` of a trial that reported ``HISTORY`` with a checkpoint every epoch,
    its kept checkpoints as Ray's ``_CheckpointManager`` leaves them under ``run_tuner``'s
    ``CheckpointConfig`` (``num_to_keep`` 1) or with every checkpoint kept (None)."""
    from ray import tune
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    manager = _CheckpointManager(tune.CheckpointConfig(num_to_keep=num_to_keep, checkpoint_score_attribute="val_acc",
                                                       checkpoint_score_order="max"))
    rows = []
    for epoch, (val, test) in enumerate(HISTORY, start=1):
        directory = folder / f"checkpoint_{epoch - 1:06d}"
        directory.mkdir(parents=True)
        (directory / "model.pt").write_text(str(epoch))
        metrics = {"training_iteration": epoch, "val_acc": val, "test_acc": test, "epoch_seconds": 1.0,
                   "trial_started_at": 100.0, "timestamp": 100 + epoch}
        manager.register_checkpoint(_TrainingResult(tune.Checkpoint.from_directory(str(directory)), metrics))
        rows.append(metrics)
    return tune.Result(metrics=rows[-1], checkpoint=manager.latest_checkpoint_result.checkpoint, error=None,
                       path=str(folder), metrics_dataframe=pd.DataFrame(rows),
                       best_checkpoints=[(r.checkpoint, r.metrics) for r in manager.best_checkpoint_results])


def test_tune_keeps_only_the_latest_of_tied_checkpoints(tmp_path):
    """Ray's fact behind the rule: with num_to_keep=1 the earlier of two equal scores is deleted
    (catches a Ray upgrade that keeps the earliest: then the rule must change)."""
    result = _result(tmp_path, num_to_keep=1)
    assert [m["training_iteration"] for _, m in result.best_checkpoints] == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000002", "checkpoint_000003"]  # + latest


@pytest.mark.parametrize("num_to_keep", [1, None])
def test_the_latest_tied_epoch_is_best_for_the_checkpoint_best_epoch_and_best_test_acc(tmp_path, num_to_keep):
    """Catches: best_checkpoint picking the earlier of tied epochs where both are kept (the
    checkpoint the sparsify stage and teacher.pt read, epoch 2), and results.csv's best_epoch /
    best_test_acc / best_val_acc following another rule than that checkpoint."""
    result = _result(tmp_path, num_to_keep)
    checkpoint, metrics = best_checkpoint(result, "val_acc")
    assert metrics["training_iteration"] == 3
    assert (Path(checkpoint.path) / "model.pt").read_text() == "3"  # what the sparsify stage loads
    row = _row("kd", result, "val_acc", params=10, seed=0)
    assert (row["best_epoch"], row["best_test_acc"], row["best_val_acc"]) == (3, 0.45, 0.50)
    assert (row["test_acc"], row["epochs"]) == (0.50, 4)
