"""--val-size under Ray Tune: ``run_tuner`` stops each trial by the plateau rule on ``val_acc`` and
keeps checkpoints by ``val_acc``; without it, by ``test_acc`` (one real Tuner run each)."""

from __future__ import annotations

import pytest

from study import make_config
from driver.results import best_checkpoint
from trainables.stopper import plateau_epoch

# per trial: (val_acc, test_acc) per epoch
SEQUENCES = {
    # val plateaus at epoch 4 (changes 0.005, 0.005); test never does (0.71 - 0.70 is not < 0.01)
    "val_plateau": [(0.30, 0.20), (0.40, 0.30), (0.405, 0.50), (0.41, 0.70), (0.50, 0.71), (0.60, 0.72)],
    # test plateaus at epoch 3; val rises by 0.10 every epoch
    "test_plateau": [(0.10, 0.5), (0.20, 0.5), (0.30, 0.5), (0.40, 0.5), (0.50, 0.5), (0.60, 0.5)],
    # val: stable at epochs 2, 4, 5 -> fires at 5; val_acc 0.6 ties at epochs 3-5
    "val_ties": [(0.5, 0.1), (0.5, 0.2), (0.6, 0.3), (0.6, 0.4), (0.6, 0.5), (0.6, 0.6)],
}


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _run(tmp_path, val_size: int):
    from ray import tune

    from driver.tuning import run_tuner

    sequences = SEQUENCES

    def trainable(config):  # nested: pickled by value, so Ray workers need not import this module
        import os
        import tempfile

        for val, test in sequences[config["name"]]:
            with tempfile.TemporaryDirectory() as folder:
                with open(os.path.join(folder, "epoch"), "w") as f:
                    f.write(str(val))
                tune.report({"val_acc": val, "test_acc": test},
                            checkpoint=tune.Checkpoint.from_directory(folder))

    config = make_config("smoke", output_dir=str(tmp_path), val_size=val_size, max_epochs=6)
    grid = run_tuner(config, "rule", trainable, {"name": tune.grid_search(list(SEQUENCES))},
                     {"cpu": 0.5, "gpu": 0.0}, config.max_epochs)
    return {r.config["name"]: r for r in grid}


def test_val_size_stops_and_keeps_by_val_acc(ray_local, tmp_path):
    results = _run(tmp_path, val_size=100)
    stops = {name: int(r.metrics["training_iteration"]) for name, r in results.items()}
    assert stops == {"val_plateau": 4, "test_plateau": 6, "val_ties": 5}
    for name, result in results.items():  # the rule applied to val_acc, trial by trial
        vals = list(result.metrics_dataframe["val_acc"])
        assert stops[name] == (plateau_epoch(vals) or 6)
    _, best = best_checkpoint(results["val_plateau"], "val_acc")
    assert (best["training_iteration"], best["val_acc"], best["test_acc"]) == (4, 0.41, 0.70)
    # ties in val_acc (0.6 at epochs 3-5): Tune keeps one best checkpoint (num_to_keep=1) besides
    # the latest, and of equal scores the later epoch takes the place; that is the one chosen, as
    # Result.get_best_checkpoint says too
    assert [m["training_iteration"] for _, m in results["val_ties"].best_checkpoints] == [5]
    checkpoint, best = best_checkpoint(results["val_ties"], "val_acc")
    assert (best["training_iteration"], best["test_acc"]) == (5, 0.5)
    assert checkpoint.path == results["val_ties"].get_best_checkpoint("val_acc", "max").path


def test_default_stops_and_keeps_by_test_acc(ray_local, tmp_path):
    results = _run(tmp_path, val_size=0)
    stops = {name: int(r.metrics["training_iteration"]) for name, r in results.items()}
    assert stops == {"val_plateau": 6, "test_plateau": 3, "val_ties": 6}
    _, best = best_checkpoint(results["val_plateau"], "test_acc")
    assert (best["training_iteration"], best["test_acc"]) == (6, 0.72)


def test_out_of_memory_is_one_line(ray_local, tmp_path, monkeypatch):
    from ray import tune

    from study import StudyError
    from driver.tuning import run_tuner

    def fit(self):  # what Tune raises when Ray's memory monitor kills a trial's actor as it starts
        raise RuntimeError("Caught unexpected exception: Task was killed due to the node running low on memory.\n"
                           "Memory on the node ... was 22.39GB / 23.54GB (0.951069)")

    monkeypatch.setattr(tune.Tuner, "fit", fit)
    config = make_config("smoke", output_dir=str(tmp_path), seeds=3)
    with pytest.raises(StudyError) as info:
        run_tuner(config, "students", lambda c: None, {}, {"cpu": 0.5, "gpu": 0.0}, 3)
    assert str(info.value) == ("the machine ran out of memory during the students stage (Ray killed a trial); run "
                               "the same command again to resume it, with a larger --cpus-per-trial to run fewer "
                               "trials at once")
