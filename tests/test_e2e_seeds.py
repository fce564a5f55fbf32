"""End to end: seeds, a held-out validation split and a sweep in one run of the students stage,
without the sparsify/bench stack installed, killed once and resumed: ``--setups kd_feat --sweep
temperature=2,8 --seeds 2 --val-size 50 --tolerance 0.5`` on the smoke preset. One trial per
(variant, seed), each stopped by the rule on the validation split that decides; variants.csv with
Student-t intervals and Welch's test; the resume is Tune's restore of the same grid.

The run is the session fixture ``sweep_seeds_run`` (tests/conftest.py); ``SEEDS_RUN_DIR=<dir>``
checks an existing run of that command instead. What the sparsify stage takes from a sweep (the
winning variant's trial, its temperature in the recipe, the summary and the ONNX metadata) is
tests/test_sweep.py's."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from study import make_config
from driver.stats import SETUP_COLUMNS, welch_p
from trainables.stopper import plateau_epoch

CONFIG = make_config("smoke", setups=("kd_feat",), sweep=(("temperature", (2.0, 8.0)),), seeds=2, val_size=50,
                     tolerance=0.5, train_subset=150, test_subset=50)
TRIALS = [(t, seed) for t in (2.0, 8.0) for seed in (0, 1)]


@pytest.fixture(scope="module")
def run_dir(sweep_seeds_run) -> Path:
    return sweep_seeds_run


def _trials(run_dir):
    """(trial config, per-epoch metrics) of each student trial, read back through a ResultGrid (an
    epoch reported again after the restore: its last report)."""
    from ray import tune
    from ray.tune.result_grid import ResultGrid

    grid = ResultGrid(tune.ExperimentAnalysis(str(run_dir / "students")))
    return [(r.config, r.metrics_dataframe.sort_values("training_iteration")
             .drop_duplicates("training_iteration", keep="last")) for r in grid]


def test_one_trial_per_variant_and_seed_each_stopped_by_the_rule_on_val_acc(run_dir):
    """Catches: the grid not reaching Tune (a temperature or seed missing), a stopper that never
    fires or fires early, or one that reads test_acc when a validation split decides."""
    trials = _trials(run_dir)
    assert sorted((c["setup"], c["temperature"], c["seed"]) for c, _ in trials) == [
        ("kd_feat", t, seed) for t, seed in TRIALS]
    for config, frame in trials:
        assert {"val_acc", "test_acc"} <= set(frame.columns)
        # Every change of val_acc (0..1) is below 0.5: the rule fires at epoch 3, one below the
        # bound. A stopper that never fires (or fires early) gives another length.
        assert plateau_epoch(list(frame["val_acc"])[:3], CONFIG.tolerance, CONFIG.patience) == 3
        assert list(frame["training_iteration"]) == [1, 2, 3] and 3 < CONFIG.max_epochs, \
            (config["temperature"], config["seed"], list(frame["val_acc"]))


def test_the_training_stages_ran_without_the_sparsify_stack(run_dir):
    """The run above had every import of SparseML, DeepSparse, SparseZoo, ONNX and onnxruntime
    failing (conftest.py ``sweep_seeds_run``), in the driver and in Ray's workers, in both of its
    launches; it wrote the training stages' outputs and nothing of the later stages."""
    results = (run_dir / "results.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in results] == ["model", "teacher"] + ["kd_feat"] * 4
    assert (run_dir / "teacher.pt").is_file() and not (run_dir / "onnx").exists()


def test_results_have_a_row_per_variant_and_seed_with_val_columns(run_dir):
    """Catches: a swept value missing from results.csv, or a best epoch chosen by test_acc."""
    table = pd.read_csv(run_dir / "results.csv")
    assert list(table.columns) == ["model", "seed", "temperature", "test_acc", "best_test_acc", "val_acc",
                                   "best_val_acc", "best_epoch", "epochs", "params", "seconds", "weight_sparsity",
                                   "onnx_test_acc", "base", "started_at", "finished_at"]
    students = table[table["model"] == "kd_feat"]
    assert sorted(zip(students["temperature"], students["seed"])) == TRIALS
    assert table["val_acc"].between(0, 1).all() and table["best_val_acc"].between(0, 1).all()
    for config, frame in _trials(run_dir):  # the best epoch is the best val_acc, test_acc only reported
        row = students[(students["temperature"] == config["temperature"]) & (students["seed"] == config["seed"])]
        row = row.iloc[0]
        assert row["best_val_acc"] == frame["val_acc"].max() and row["epochs"] == 3
        at_best = frame[frame["training_iteration"] == row["best_epoch"]].iloc[0]
        assert (at_best["val_acc"], at_best["test_acc"]) == (row["best_val_acc"], row["best_test_acc"])
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["seeds"], config["val_size"], config["selection_metric"]) == (2, 50, "val_acc")
    assert config["decision_rule"].startswith("decision rule: val_acc on 50 training images")


def test_variants_csv_holds_means_student_t_intervals_and_welch_p(run_dir):
    """Catches: seeds of different temperatures pooled, an interval that is not Student-t's over
    the seeds, the winner not chosen by mean validation accuracy, or a wrong Welch p."""
    table = pd.read_csv(run_dir / "variants.csv")
    results = pd.read_csv(run_dir / "results.csv")
    assert list(table.columns) == ["variant", "setup", "temperature", *SETUP_COLUMNS[1:]]
    assert sorted(table["variant"]) == ["kd_feat temperature=2", "kd_feat temperature=8"]
    assert (table["seeds"] == 2).all() and not (run_dir / "setups.csv").exists()
    t = stats.t.ppf(0.975, 1)  # 12.7062
    for row in table.itertuples():
        mine = results[(results["model"] == "kd_feat") & (results["temperature"] == row.temperature)]
        accs = list(mine["best_test_acc"])
        mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / math.sqrt(2)
        assert row.test_acc_mean == pytest.approx(mean) and row.test_acc_std == pytest.approx(std)
        assert (row.ci95_low, row.ci95_high) == pytest.approx((mean - t * std / math.sqrt(2),
                                                              mean + t * std / math.sqrt(2)))
        assert row.val_acc_mean == pytest.approx(mine["best_val_acc"].mean())
    best = table.loc[table["val_acc_mean"].idxmax()]  # the winner by validation accuracy, listed first
    assert table["val_acc_mean"].iloc[0] == best["val_acc_mean"] and math.isnan(table["welch_p_vs_winner"].iloc[0])
    other = table.iloc[1]
    expected = welch_p(results.loc[results["temperature"] == other["temperature"], "best_test_acc"],
                       results.loc[results["temperature"] == table["temperature"].iloc[0], "best_test_acc"])
    assert (math.isnan(expected) and math.isnan(other["welch_p_vs_winner"])) or \
        other["welch_p_vs_winner"] == pytest.approx(expected)
    log = (run_dir / "orchestrate.log").read_text() if (run_dir / "orchestrate.log").exists() else ""
    if log:
        assert f"Winner by mean validation accuracy over 2 seeds: {table['variant'].iloc[0]}" in log
        assert "Decision rule: val_acc on 50 training images held out" in log
        assert ("skipped the sparsify and bench stage(s) (--stop-after students); run the same command with "
                "--stop-after bench\n") in log


def test_the_resume_restores_the_grid_and_runs_no_epoch_twice(run_dir):
    """The run was killed once the students' experiment state recorded a trial's 1st-epoch
    checkpoint. Catches a resume that is not Tune's restore of the same grid: a trial rerun from its
    start, or an epoch of a variant missing or run twice; or one that leaves other checkpoints than
    the best and the latest."""
    resumed = (run_dir / "orchestrate.log").read_text()
    assert "[students] restoring the experiment" in resumed
    continued = []
    for temperature in (2, 8):
        for seed in (0, 1):
            name = re.escape(f"[students kd_feat temperature={temperature} seed {seed}]")
            after = [int(e) for e in re.findall(rf"{name} epoch (\d+): ", resumed)]
            assert after == [1, 2, 3][3 - len(after):], (temperature, seed, after)  # no epoch twice
            continued.append(1 not in after)
    assert any(continued), "every trial ran again from epoch 1"
    # after the kill and the resume, each trial keeps the weights of its latest and its best epoch
    # (by val_acc, the latest of tied epochs) only
    from ray import tune
    from ray.tune.result_grid import ResultGrid

    for result in ResultGrid(tune.ExperimentAnalysis(str(run_dir / "students"))):
        kept = [int(c.name.split("_")[1]) + 1 for c in sorted(Path(result.path).glob("checkpoint_*"))]
        val = list(result.metrics_dataframe.sort_values("training_iteration")
                   .drop_duplicates("training_iteration", keep="last")["val_acc"])
        assert len(kept) <= 2 and len(val) in kept and len(val) - val[::-1].index(max(val)) in kept, (result.path, kept)
