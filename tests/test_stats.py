"""Seeds and decisions: the Student-t interval, Welch's t-test, setups.csv, the winner and the trial
the sparsify stage takes; the config options --seeds/--val-size and the validation split."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from study import StudyError, decision_rule, make_config, selection_metric
from trainables.batches import stratified_split, stratified_subset
from driver.results import best_checkpoint, per_seed_frame, set_onnx_accuracy, sparsify_trial
from driver.stats import SETUP_COLUMNS, lead, lead_sentence, mean_std, setup_table, t_interval, welch_p, winner

# --- the statistics, on numbers computed by hand ------------------------------------------------


def test_t_interval_hand_computed():
    # mean 0.46, s = 0.01 (deviations -0.01, 0.01, 0), t_{0.975, 2} = 4.302653 (Student-t table)
    low, high = t_interval([0.45, 0.47, 0.46])
    half = 4.302652729749464 * 0.01 / math.sqrt(3)
    assert (low, high) == pytest.approx((0.46 - half, 0.46 + half), abs=1e-12)
    assert (low, high) == pytest.approx((0.435159, 0.484841), abs=1e-6)
    # two seeds: t_{0.975, 1} = 12.7062; mean 0.40, s = sqrt(2) * 0.02 = 0.028284
    assert t_interval([0.38, 0.42]) == pytest.approx((0.40 - 12.706205 * 0.02, 0.40 + 12.706205 * 0.02), abs=1e-6)
    assert all(math.isnan(v) for v in t_interval([0.5]))  # one seed: no interval
    with pytest.raises(ValueError, match="confidence"):
        t_interval([0.1, 0.2], confidence=1.0)


def test_mean_std_sample_ddof_1():
    assert mean_std([0.45, 0.47, 0.46]) == pytest.approx((0.46, 0.01))
    mean, std = mean_std([0.3])
    assert mean == 0.3 and math.isnan(std)


def test_welch_p_hand_computed():
    # a: mean 0.46, var 1e-4; b: mean 0.416667, var 4.3333e-4 -> se^2 = (1e-4 + 4.3333e-4) / 3 = 1.7778e-4,
    # t = 0.043333 / 0.013333 = 3.25; Welch-Satterthwaite df = 2.8764; two-sided p = 0.050412
    assert welch_p([0.45, 0.47, 0.46], [0.40, 0.44, 0.41]) == pytest.approx(0.050412, abs=1e-6)
    # the cpu-preset numbers as two seeds each: kd (0.470, 0.441) vs ce (0.451, 0.385):
    # variances 4.205e-4 and 2.178e-3, se = sqrt((4.205e-4 + 2.178e-3) / 2) = 0.036045, t = 0.0375 / se = 1.0404,
    # df = se^4 / ((4.205e-4/2)^2 + (2.178e-3/2)^2) = 1.372 -> p = 0.4471: the "winner" is no finding
    assert welch_p([0.470, 0.441], [0.451, 0.385]) == pytest.approx(0.44711, abs=1e-5)
    assert math.isnan(welch_p([0.5], [0.4, 0.3]))  # one seed: not testable
    assert welch_p([0.4, 0.4], [0.3, 0.3]) == 0.0  # no spread, different means
    assert math.isnan(welch_p([0.4, 0.4], [0.4, 0.4]))


def _per_seed(**accs):
    rows = [{"setup": s, "seed": i, "test_acc": a, "val_acc": v}
            for s, values in accs.items() for i, (a, v) in enumerate(values)]
    return pd.DataFrame(rows)


def test_setup_table_columns_values_and_winner():
    per_seed = _per_seed(ce=[(0.451, 0.40), (0.385, 0.42)], kd=[(0.470, 0.45), (0.441, 0.44)],
                         kd_feat=[(0.469, 0.47), (0.452, 0.46)])
    table = setup_table(per_seed, ("ce", "kd", "kd_feat"))
    assert tuple(table.columns) == SETUP_COLUMNS == ("setup", "seeds", "test_acc_mean", "test_acc_std", "ci95_low",
                                                     "ci95_high", "val_acc_mean", "welch_p_vs_winner")
    row = table.set_index("setup").loc["kd_feat"]  # mean 0.4605: the winner by test accuracy
    assert row["seeds"] == 2 and row["test_acc_mean"] == pytest.approx(0.4605)
    assert row["test_acc_std"] == pytest.approx(0.017 / math.sqrt(2))
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((0.4605 - 12.706205 * 0.0085,
                                                                 0.4605 + 12.706205 * 0.0085), abs=1e-6)
    assert row["val_acc_mean"] == pytest.approx(0.465)
    assert math.isnan(row["welch_p_vs_winner"])
    assert table.set_index("setup").loc["kd", "welch_p_vs_winner"] == pytest.approx(
        welch_p([0.470, 0.441], [0.469, 0.452]))
    assert winner(per_seed, ("ce", "kd", "kd_feat")) == "kd_feat"
    info = lead(table)
    assert (info["winner"], info["runner_up"], info["significant"]) == ("kd_feat", "kd", False)
    assert info["lead"] == pytest.approx(0.4605 - 0.4555)
    assert "kd_feat" in lead_sentence(table) and "not significant at the 0.05 level" in lead_sentence(table)


def test_val_rule_picks_the_winner_by_validation_accuracy():
    # ce has the best test mean, kd the best validation mean: with --val-size, kd wins
    per_seed = _per_seed(ce=[(0.50, 0.30), (0.52, 0.32)], kd=[(0.40, 0.40), (0.42, 0.41)])
    assert winner(per_seed, ("ce", "kd"), "test_acc") == "ce"
    assert winner(per_seed, ("ce", "kd"), "val_acc") == "kd"
    table = setup_table(per_seed, ("ce", "kd"), "val_acc")
    assert math.isnan(table.set_index("setup").loc["kd", "welch_p_vs_winner"])
    info = lead(table, "val_acc")
    assert (info["winner"], info["runner_up"]) == ("kd", "ce") and info["lead"] == pytest.approx(-0.10)
    assert "behind ce by 10.0 percentage points" in lead_sentence(table, "val_acc")


def test_one_seed_is_not_testable_and_ties_go_to_the_first_setup():
    per_seed = _per_seed(ce=[(0.23, math.nan)], kd=[(0.19, math.nan)], kd_feat=[(0.23, math.nan)])
    table = setup_table(per_seed, ("ce", "kd", "kd_feat"))
    assert winner(per_seed, ("ce", "kd", "kd_feat")) == "ce"
    assert table["ci95_low"].isna().all() and table["welch_p_vs_winner"].isna().all()
    assert table["val_acc_mean"].isna().all()
    assert lead(table)["significant"] is None
    assert "not testable for significance (one seed per setup" in lead_sentence(table)


# --- which trial is sparsified ------------------------------------------------------------------


def _trial(setup, seed, epochs):
    """A stand-in for a ray.tune.Result: per kept checkpoint (name, metrics)."""
    kept = [(f"{setup}-{seed}-e{i}", dict(m, training_iteration=i)) for i, m in epochs]
    return SimpleNamespace(config={"setup": setup, "seed": seed}, best_checkpoints=kept, path=f"/x/{setup}_{seed}")


def test_best_checkpoint_ties_go_to_the_latest_epoch():
    trial = _trial("kd", 0, [(4, {"val_acc": 0.6, "test_acc": 0.5}), (5, {"val_acc": 0.6, "test_acc": 0.55}),
                             (2, {"val_acc": 0.5, "test_acc": 0.6})])
    assert best_checkpoint(trial, "val_acc")[0] == "kd-0-e5"  # Tune keeps the newer of tied checkpoints
    assert best_checkpoint(trial, "test_acc")[0] == "kd-0-e2"
    with pytest.raises(RuntimeError, match="no checkpoint with 'acc'"):
        best_checkpoint(trial, "acc")


def test_sparsify_trial_is_the_winning_setups_best_seed():
    config = make_config("smoke", seeds=2, val_size=100)
    rows = [{"model": "teacher", "seed": 0, "best_test_acc": 0.2, "best_val_acc": 0.2},
            {"model": "ce", "seed": 0, "best_test_acc": 0.30, "best_val_acc": 0.20},
            {"model": "ce", "seed": 1, "best_test_acc": 0.32, "best_val_acc": 0.22},
            {"model": "kd", "seed": 0, "best_test_acc": 0.20, "best_val_acc": 0.25},
            {"model": "kd", "seed": 1, "best_test_acc": 0.21, "best_val_acc": 0.30},
            {"model": "kd_feat", "seed": 0, "best_test_acc": 0.40, "best_val_acc": 0.10},
            {"model": "kd_feat", "seed": 1, "best_test_acc": 0.40, "best_val_acc": 0.40}]
    frame = per_seed_frame(config, rows)
    assert list(frame.columns) == ["setup", "variant", "seed", "test_acc", "val_acc"] and len(frame) == 6
    assert list(frame["variant"]) == list(frame["setup"])  # no --sweep: a variant is its setup
    trials = [_trial(r["model"], r["seed"], [(1, {"val_acc": r["best_val_acc"], "test_acc": r["best_test_acc"]})])
              for r in rows[1:]]
    # val means: ce 0.21, kd 0.275, kd_feat 0.25 -> kd; its best seed by val_acc is seed 1
    chosen = sparsify_trial(config, trials, rows)
    assert chosen.config == {"setup": "kd", "seed": 1}
    # the task's rule: test means ce 0.31, kd 0.205, kd_feat 0.40 -> kd_feat; seeds tie at 0.40 -> seed 0
    chosen = sparsify_trial(make_config("smoke", seeds=2), trials, rows)
    assert chosen.config == {"setup": "kd_feat", "seed": 0}


def test_onnx_accuracy_goes_to_the_sparsified_trial_and_its_pruned_rows():
    """The sparsified trial (setup and seed) is the dense export; another seed of the setup, or
    another setup with that seed, has no ONNX model."""
    rows = [{"model": "teacher", "seed": 0}, {"model": "kd", "seed": 0}, {"model": "kd", "seed": 1},
            {"model": "ce", "seed": 1}, {"model": "pruned", "seed": 1}, {"model": "pruned_quantized", "seed": 1}]
    set_onnx_accuracy(rows, {"dense": 0.30, "pruned": 0.28, "pruned_quantized": 0.27}, "kd", 1)
    assert [r["onnx_test_acc"] for r in rows] == [None, None, 0.30, None, 0.28, 0.27]


# --- config and data ----------------------------------------------------------------------------


def test_defaults_keep_the_tasks_rule():
    config = make_config("smoke")
    assert (config.seeds, config.val_size) == (1, 0)
    assert selection_metric(config) == "test_acc" and selection_metric({}) == "test_acc"
    assert selection_metric(make_config("smoke", val_size=100)) == "val_acc"
    assert selection_metric({"val_size": 100}) == "val_acc"
    assert decision_rule(config).startswith("decision rule: test_acc (the task's rule)")
    assert decision_rule({"val_size": 100}).startswith("decision rule: val_acc on 100 training images held out")


@pytest.mark.parametrize("overrides, message", [
    ({"seeds": 0}, "--seeds 0 must be >= 1"),
    ({"val_size": 5}, "--val-size 5 must be 0 (no validation split) or between 10 (one image per class) and 299 "
                      "(the training images minus one)"),
    ({"val_size": 300}, "--val-size 300 must be 0 (no validation split) or between 10 (one image per class) and 299 "
                        "(the training images minus one)"),
])
def test_bad_seeds_and_val_size_are_one_line(overrides, message):
    with pytest.raises(StudyError) as info:
        make_config("smoke", **overrides)
    assert str(info.value) == message


def test_student_space_is_a_grid_over_setup_and_seed():
    from driver.tuning import student_space, trial_seeds

    assert trial_seeds(make_config("smoke")) == [0]
    assert trial_seeds(make_config("smoke", seed=5, seeds=3)) == [5, 6, 7]
    space = student_space(make_config("smoke", seed=5, seeds=3), {"cpu": 0.5, "gpu": 0.0})
    assert space["setup"] == {"grid_search": ["ce", "kd", "kd_feat"]}
    assert space["seed"] == {"grid_search": [5, 6, 7]} and space["threads"] == 1


def test_stratified_split_holds_out_a_balanced_disjoint_part():
    labels = torch.arange(10).repeat_interleave(6)  # 10 classes x 6
    images = torch.arange(60, dtype=torch.uint8).view(60, 1, 1, 1).expand(60, 3, 2, 2).contiguous()
    (rest_x, rest_y), (held_x, held_y) = stratified_split(images, labels, 20, seed=3)
    assert torch.bincount(held_y, minlength=10).tolist() == [2] * 10
    assert torch.bincount(rest_y, minlength=10).tolist() == [4] * 10
    held_ids, rest_ids = held_x[:, 0, 0, 0].tolist(), rest_x[:, 0, 0, 0].tolist()
    assert sorted(held_ids + rest_ids) == list(range(60))
    assert rest_ids == sorted(rest_ids)  # the rest keeps the input order
    sub_x, sub_y = stratified_subset(images, labels, 20, seed=3)
    assert torch.equal(sub_x, held_x) and torch.equal(sub_y, held_y)
    with pytest.raises(ValueError, match="leaves none to train on"):
        stratified_split(images, labels, 60, seed=3)


def test_val_size_zero_leaves_the_training_set_unchanged(cifar_root):
    from trainables.batches import study_data

    tree = dict(data_root=str(cifar_root), train_subset=150, test_subset=100)  # helpers.SMOKE
    plain = study_data(make_config("smoke", **tree))
    held = study_data(make_config("smoke", **tree, val_size=50))
    assert plain.val_images is None and plain.val_labels is None
    assert len(plain.train_labels) == 150 and len(held.train_labels) == 100 and len(held.val_labels) == 50
    assert torch.bincount(held.val_labels, minlength=10).tolist() == [5] * 10
    assert torch.equal(plain.test_images, held.test_images)
    # the same subset as before the option existed (seeded by config.seed), split into two disjoint parts
    full = torch.cat([held.train_images, held.val_images]).flatten(1)
    assert sorted(map(tuple, full.tolist())) == sorted(map(tuple, plain.train_images.flatten(1).tolist()))


def test_cli_bad_val_size_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(repo / "orchestrate.py"), "--preset", "smoke", "--seeds", "2",
                           "--val-size", "300", "--output-dir", str(tmp_path / "run")],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --val-size 300 must be 0 (no validation split) or between 10 (one image "
                                   "per class) and 299 (the training images minus one)")
    assert not (tmp_path / "run").exists()
