"""End to end: ``--seeds 2 --val-size 100 --tolerance 0.5`` on the smoke preset (students stage),
without the sparsify/bench stack installed: one trial per (setup, seed), each stopped by the rule on
a held-out validation split that decides, and setups.csv with Student-t intervals.

The run is the session fixture ``smoke_seeds_run`` (tests/conftest.py); ``SEEDS_RUN_DIR=<dir>``
checks an existing run of that command instead."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from study import make_config
from driver.stats import SETUP_COLUMNS, welch_p
from trainables.stopper import plateau_epoch

CONFIG = make_config("smoke", seeds=2, val_size=100, tolerance=0.5)


@pytest.fixture(scope="module")
def run_dir(request) -> Path:
    if os.environ.get("SEEDS_RUN_DIR"):
        return Path(os.environ["SEEDS_RUN_DIR"])
    return request.getfixturevalue("smoke_seeds_run")


def _trials(run_dir):
    """(trial config, per-epoch metrics) of each student trial, read back through a ResultGrid."""
    from ray import tune
    from ray.tune.result_grid import ResultGrid

    grid = ResultGrid(tune.ExperimentAnalysis(str(run_dir / "students")))
    return [(r.config, r.metrics_dataframe.sort_values("training_iteration")) for r in grid]


def test_one_trial_per_setup_and_seed_each_stopped_by_the_rule_on_val_acc(run_dir):
    trials = _trials(run_dir)
    assert sorted((c["setup"], c["seed"]) for c, _ in trials) == [
        (s, seed) for s in ("ce", "kd", "kd_feat") for seed in (0, 1)]
    for config, frame in trials:
        frame = frame.sort_values("training_iteration")
        assert {"val_acc", "test_acc"} <= set(frame.columns)
        # Every change of val_acc (0..1, here 0.1-0.3) is below 0.5: the rule fires at epoch 3, one
        # below the bound. A stopper that never fires (or fires early) gives another length.
        assert plateau_epoch(list(frame["val_acc"])[:3], CONFIG.tolerance, CONFIG.patience) == 3
        assert len(frame) == 3 < CONFIG.max_epochs, (config["setup"], config["seed"], list(frame["val_acc"]))


def test_the_training_stages_ran_without_the_sparsify_stack(run_dir):
    """The run above had every import of SparseML, DeepSparse, SparseZoo, ONNX and onnxruntime
    failing (conftest.py ``smoke_seeds_run``), in the driver and in Ray's workers; it wrote the
    training stages' outputs and nothing of the later stages."""
    results = (run_dir / "results.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in results] == ["model", "teacher"] + [
        setup for setup in ("ce", "kd", "kd_feat") for _ in (0, 1)]
    assert (run_dir / "teacher.pt").is_file() and not (run_dir / "onnx").exists()


def test_results_have_a_row_per_setup_and_seed_with_val_columns(run_dir):
    table = pd.read_csv(run_dir / "results.csv")
    assert list(table.columns) == ["model", "seed", "test_acc", "best_test_acc", "val_acc", "best_val_acc",
                                   "best_epoch", "epochs", "params", "seconds", "weight_sparsity", "onnx_test_acc",
                                   "base", "started_at", "finished_at"]
    assert list(zip(table["model"], table["seed"])) == [("teacher", 0)] + [
        (s, seed) for s in ("ce", "kd", "kd_feat") for seed in (0, 1)]
    assert table["val_acc"].between(0, 1).all() and table["best_val_acc"].between(0, 1).all()
    for config, frame in _trials(run_dir):  # the best epoch is the best val_acc, test_acc only reported
        row = table[(table["model"] == config["setup"]) & (table["seed"] == config["seed"])].iloc[0]
        assert row["best_val_acc"] == frame["val_acc"].max()
        at_best = frame[frame["training_iteration"] == row["best_epoch"]].iloc[0]
        assert (at_best["val_acc"], at_best["test_acc"]) == (row["best_val_acc"], row["best_test_acc"])
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["seeds"], config["val_size"], config["selection_metric"]) == (2, 100, "val_acc")
    assert config["decision_rule"].startswith("decision rule: val_acc on 100 training images")


def test_setups_csv_holds_means_and_student_t_intervals(run_dir):
    setups = pd.read_csv(run_dir / "setups.csv")
    results = pd.read_csv(run_dir / "results.csv")
    assert tuple(setups.columns) == SETUP_COLUMNS and list(setups["setup"]) == ["ce", "kd", "kd_feat"]
    assert (setups["seeds"] == 2).all()
    t = stats.t.ppf(0.975, 1)  # 12.7062
    for row in setups.itertuples():
        accs = list(results.loc[results["model"] == row.setup, "best_test_acc"])
        mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / math.sqrt(2)
        assert row.test_acc_mean == pytest.approx(mean) and row.test_acc_std == pytest.approx(std)
        assert (row.ci95_low, row.ci95_high) == pytest.approx((mean - t * std / math.sqrt(2),
                                                              mean + t * std / math.sqrt(2)))
        vals = results.loc[results["model"] == row.setup, "best_val_acc"]
        assert row.val_acc_mean == pytest.approx(vals.mean())
    best = setups.loc[setups["val_acc_mean"].idxmax(), "setup"]  # the winner by validation accuracy
    assert math.isnan(setups.set_index("setup").loc[best, "welch_p_vs_winner"])
    for row in setups[setups["setup"] != best].itertuples():
        expected = welch_p(results.loc[results["model"] == row.setup, "best_test_acc"],
                           results.loc[results["model"] == best, "best_test_acc"])
        assert (math.isnan(expected) and math.isnan(row.welch_p_vs_winner)) or \
            row.welch_p_vs_winner == pytest.approx(expected)
    log = (run_dir / "orchestrate.log").read_text() if (run_dir / "orchestrate.log").exists() else ""
    if log:
        assert f"Winner by mean validation accuracy over 2 seeds: {best}" in log
        assert "Decision rule: val_acc on 100 training images held out" in log
        assert ("skipped the sparsify and bench stage(s) (--stop-after students); run the same command with "
                "--stop-after bench\n") in log
