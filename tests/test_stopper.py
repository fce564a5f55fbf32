"""Tests for trainables.stopper: the plateau rule, the Tune stopper, and one real Tuner run."""

import pickle

import pytest

from trainables.stopper import ABS_EPS, AccuracyPlateauStopper, MissingMetricError, plateau_epoch


def _feed(stopper, accs, trial_id="t0", metric="test_acc"):
    """Feed accs as epochs 1..n; return the 1-based epoch at which the stopper said stop, or None."""
    for epoch, acc in enumerate(accs, start=1):
        if stopper(trial_id, {"training_iteration": epoch, metric: acc}):
            return epoch
    return None


@pytest.mark.parametrize(
    "accs, expected",
    [
        ([0.50, 0.60, 0.605, 0.61], 4),
        ([0.50, 0.60, 0.605, 0.61, 0.612], 4),  # fires at the first epoch ending the run
        ([0.50, 0.505, 0.60, 0.605, 0.70], None),  # stable epochs not consecutive
        ([0.50, 0.505, 0.508], 3),  # earliest possible epoch = patience + 1
        ([0.57, 0.58, 0.59], None),  # exactly the tolerance (0.58-0.57 = 0.00999999999999989 in floats)
        ([0.5, 0.51, 0.52], None),  # exactly the tolerance (0.51-0.5 = 0.010000000000000009)
        ([0.57, 0.58, 0.59, 0.595, 0.6], 5),
        ([0.70, 0.695, 0.70], 3),  # decreases count through |d|
        ([0.5, float("nan"), 0.5, 0.5, 0.5], 5),  # NaN is never stable and resets the run
        ([], None),
        ([0.5], None),
    ],
)
def test_plateau_epoch_examples(accs, expected):
    assert plateau_epoch(accs) == expected
    assert _feed(AccuracyPlateauStopper(), accs) == expected


def test_exact_tolerance_float32_accuracies():
    # accuracies computed in float32 (e.g. (pred == y).float().mean().item()) are off by ~1e-8
    import torch

    accs = [torch.tensor(v, dtype=torch.float32).item() for v in (0.57, 0.58, 0.59)]
    assert abs(accs[1] - accs[0]) < 0.01  # the naive comparison would call it stable
    assert plateau_epoch(accs) is None
    # but a genuine sub-tolerance change on a 10k test set (99 images) is stable
    assert plateau_epoch([0.5, 0.5099, 0.5198]) == 3
    assert ABS_EPS < 1e-4


def test_patience_and_tolerance_parameters():
    accs = [0.5, 0.6, 0.61, 0.62, 0.625, 0.626, 0.627]
    assert plateau_epoch(accs, tolerance=0.02, patience=1) == 3
    assert plateau_epoch(accs, tolerance=0.02, patience=3) == 5
    assert plateau_epoch(accs, tolerance=0.01, patience=2) == 6
    assert _feed(AccuracyPlateauStopper(tolerance=0.02, patience=3), accs) == 5


def test_max_epochs():
    accs = [0.1, 0.3, 0.5, 0.7, 0.9]  # never plateaus
    assert _feed(AccuracyPlateauStopper(max_epochs=3), accs) == 3
    assert _feed(AccuracyPlateauStopper(max_epochs=10), accs) is None
    assert _feed(AccuracyPlateauStopper(max_epochs=10), [0.5, 0.5, 0.5]) == 3  # plateau before the cap


def test_interleaved_trials_have_independent_histories():
    stopper = AccuracyPlateauStopper()
    a = [0.50, 0.60, 0.605, 0.61]
    b = [0.20, 0.40, 0.405, 0.50]
    decisions = []
    for epoch, (xa, xb) in enumerate(zip(a, b), start=1):
        decisions.append((stopper("a", {"training_iteration": epoch, "test_acc": xa}),
                          stopper("b", {"training_iteration": epoch, "test_acc": xb})))
    assert decisions == [(False, False), (False, False), (False, False), (True, False)]
    assert stopper.history("a") == a and stopper.history("b") == b
    assert stopper.history("unknown") == []


def test_stop_all_is_false():
    stopper = AccuracyPlateauStopper()
    assert stopper.stop_all() is False
    _feed(stopper, [0.5, 0.5, 0.5])
    assert stopper.stop_all() is False


def test_replayed_iteration_overwrites():
    stopper = AccuracyPlateauStopper()
    for epoch, acc in [(1, 0.50), (2, 0.60), (3, 0.605)]:
        assert not stopper("t", {"training_iteration": epoch, "test_acc": acc})
    # trial restored from its epoch-1 checkpoint: epochs 2 and 3 are re-run with new values
    assert not stopper("t", {"training_iteration": 2, "test_acc": 0.70})
    assert stopper.history("t") == [0.50, 0.70]  # stale epoch 3 dropped, epoch 2 overwritten
    assert not stopper("t", {"training_iteration": 3, "test_acc": 0.80})
    assert not stopper("t", {"training_iteration": 4, "test_acc": 0.805})
    assert stopper("t", {"training_iteration": 5, "test_acc": 0.81})
    assert stopper.history("t") == [0.50, 0.70, 0.80, 0.805, 0.81]


def test_extra_keys_and_custom_metric():
    stopper = AccuracyPlateauStopper(metric="val/acc")
    accs = [0.50, 0.60, 0.605, 0.61]
    for epoch, acc in enumerate(accs, start=1):
        stop = stopper("t", {"training_iteration": epoch, "val/acc": acc, "loss": 1.0, "config": {}})
    assert stop


def test_stopper_is_picklable_with_state():
    stopper = AccuracyPlateauStopper()
    _feed(stopper, [0.50, 0.60, 0.605])
    clone = pickle.loads(pickle.dumps(stopper))
    assert clone.history("t0") == [0.50, 0.60, 0.605]
    assert clone("t0", {"training_iteration": 4, "test_acc": 0.61})


def test_missing_metric_names_metric_and_keys():
    stopper = AccuracyPlateauStopper()
    with pytest.raises(KeyError) as info:
        stopper("t", {"training_iteration": 1, "acc": 0.5})
    msg = str(info.value)
    assert "'test_acc'" in msg and "'acc'" in msg and "training_iteration" in msg and "\n" not in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, MissingMetricError)
    with pytest.raises(ValueError, match="training_iteration"):
        stopper("t", {"test_acc": 0.5})
    with pytest.raises(ValueError, match="not a number"):
        stopper("t", {"training_iteration": 1, "test_acc": None})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"tolerance": 0.0}, "tolerance"),
        ({"tolerance": -0.01}, "tolerance"),
        ({"tolerance": float("nan")}, "tolerance"),
        ({"patience": 0}, "patience"),
        ({"patience": 1.5}, "patience"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"max_epochs": 2.0}, "max_epochs"),
        ({"metric": ""}, "metric"),
    ],
)
def test_validation_errors(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        AccuracyPlateauStopper(**kwargs)
    assert "allowed" in str(info.value) and "\n" not in str(info.value)
    if set(kwargs) <= {"tolerance", "patience"}:
        with pytest.raises(ValueError, match=name):
            plateau_epoch([0.5, 0.5, 0.5], **kwargs)


# --- one real Ray Tune run ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_tuner_stops_trial_at_plateau_epoch(ray_local, tmp_path):
    from ray import tune

    sequences = {
        "plateau": [0.50, 0.60, 0.605, 0.61, 0.612, 0.613],  # stops after epoch 4
        "rising": [0.50, 0.505, 0.60, 0.605, 0.70],  # never plateaus: runs all 5
    }

    def trainable(config):  # nested: pickled by value, so Ray workers need not import this module
        for acc in sequences[config["name"]]:
            tune.report({"test_acc": acc})

    tuner = tune.Tuner(
        trainable,
        param_space={"name": tune.grid_search(list(sequences))},
        run_config=tune.RunConfig(
            name="stopper_test", storage_path=str(tmp_path), stop=AccuracyPlateauStopper(), verbose=0
        ),
    )
    results = tuner.fit()
    assert not results.errors
    last = {r.config["name"]: r.metrics["training_iteration"] for r in results}
    assert last == {"plateau": 4, "rising": 5}
