"""``--sweep FIELD=V1,V2,...``: the command line, the students' grid, the variants table and its
winner, the trial the sparsify stage takes and the temperature its recipe uses, the fingerprint,
the report's pieces. The real run (a sweep with seeds, killed and resumed) is tests/test_e2e_seeds.py's."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import orchestrate
import stages.sparsify
from study import StudyError, make_config
from study.config import SWEEPABLE, variant_label, variants

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- the command line ---------------------------------------------------------------------------


def test_sweep_is_parsed_repeatable_and_recorded():
    """Catches: --sweep not repeatable (argparse keeps only the last), values left as text (the
    trial would train with "2" not 2.0), setups not folded into the setups axis, or the sweep
    missing from config.json."""
    config, _ = orchestrate.config_from_args(["--preset", "smoke", "--sweep", "temperature=2,8",
                                              "--sweep", "lr=1e-3,3e-3", "--sweep", "setups=kd,ce"])
    assert config.sweep == (("temperature", (2.0, 8.0)), ("lr", (0.001, 0.003)))
    assert config.setups == ("kd", "ce")
    from study.config import config_json

    assert json.loads(config_json(config))["sweep"] == [["temperature", [2.0, 8.0]], ["lr", [0.001, 0.003]]]
    assert orchestrate.config_from_args(["--preset", "smoke"])[0].sweep == ()


@pytest.mark.parametrize("argv, line", [
    (["--sweep", "batch_size=64,256"],
     "error: --sweep batch_size=64,256: --batch-size 64 is outside the allowed range 128..512"),
    (["--sweep", "arch=resnet18,resnet34"],
     "error: --sweep arch=resnet18,resnet34: 'arch' cannot be swept; sweepable: setups, temperature, lr, batch_size"),
    (["--sweep", "temperature=2,-1"], "error: --sweep temperature=2,-1: --temperature -1.0 must be > 0"),
    (["--sweep", "temperature=2,2"], "error: --sweep temperature=2,2: a value is given twice"),
    (["--sweep", "temperature=2", "--sweep", "temperature=8"],
     "error: --sweep temperature=8: temperature is swept twice; give all its values in one --sweep"),
    (["--sweep", "lr=fast"], "error: --sweep lr=fast: could not convert string to float: 'fast'"),
])
def test_a_bad_sweep_is_one_line_and_exit_code_2(argv, line, capsys):
    """Catches: a bad swept value reaching Tune (no check, or a check that does not name the value
    and the allowed range), an unknown field silently ignored or not listing the sweepable ones,
    or an argparse usage dump instead of one line."""
    assert orchestrate.main(["--preset", "smoke", "--data-root", "/nonexistent", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [line]


# --- the students' grid ---------------------------------------------------------------------------


def test_the_grid_is_setups_times_swept_values_times_seeds():
    """Catches: a swept field left as its scalar in param_space (every trial would train with the
    same value), or the resource rule counting setups x seeds instead of the whole grid (too many
    trials sharing too little)."""
    from ray import tune

    from driver.tuning import student_space, student_trials

    config = make_config("smoke", setups=("ce", "kd"), seeds=2, sweep=(("temperature", ("2", "8")),
                                                                      ("batch_size", (128, 256))))
    space = student_space(config, {"cpu": 1.0, "gpu": 0.0})
    grid = lambda values: {"grid_search": list(values)}  # noqa: E731
    assert space["setup"] == tune.grid_search(["ce", "kd"]) == grid(["ce", "kd"])
    assert space["temperature"] == grid([2.0, 8.0]) and space["batch_size"] == grid([128, 256])
    assert space["seed"] == grid([0, 1]) and space["lr"] == config.lr
    assert student_trials(config) == 2 * 2 * 2 * 2
    assert student_trials(make_config("smoke", seeds=3)) == 3 * 3  # no sweep: setups x seeds
    # no sweep: the param_space of before (so the smoke preset's trials, and accuracies, are unchanged)
    from driver.tuning import trial_config

    plain = make_config("smoke")
    resources = {"cpu": 1.0, "gpu": 0.0}
    assert student_space(plain, resources) == {**trial_config(plain, "student", resources),
                                               "setup": grid(plain.setups), "seed": grid([0])}


# --- variants.csv, the winner, the trial sparsified ---------------------------------------------


def _rows(values):
    """results rows of a kd sweep over temperature: ``values`` = {(temperature, seed): acc}."""
    return [{"model": "teacher", "seed": 0, "temperature": None, "best_test_acc": 0.5, "best_val_acc": None}] + [
        {"model": "kd", "seed": seed, "temperature": t, "best_test_acc": acc, "best_val_acc": None}
        for (t, seed), acc in values.items()]


def _trial(setup, seed, temperature, acc):
    """A stand-in for a ray.tune.Result of a student trial (config and kept checkpoints)."""
    return SimpleNamespace(config={"setup": setup, "seed": seed, "temperature": temperature, "batch_size": 128},
                           best_checkpoints=[("ckpt", {"test_acc": acc, "training_iteration": 1})],
                           path=f"/x/{setup}_t{temperature}_s{seed}")


SWEEP = (("temperature", (2.0, 8.0)),)


def test_variants_table_has_one_row_per_variant_with_intervals_the_winner_first():
    """Catches: seeds of different temperatures pooled into one setup row, no interval over a
    variant's seeds, or the winner not first."""
    from driver.results import variants_table

    config = make_config("smoke", setups=("kd",), seeds=2, sweep=SWEEP)
    table = variants_table(config, _rows({(2.0, 0): 0.30, (2.0, 1): 0.32, (8.0, 0): 0.40, (8.0, 1): 0.44}))
    assert list(table["variant"]) == ["kd temperature=8", "kd temperature=2"]
    assert list(table.columns[:3]) == ["variant", "setup", "temperature"] and list(table["temperature"]) == [8.0, 2.0]
    assert table["seeds"].tolist() == [2, 2] and table["test_acc_mean"].round(4).tolist() == [0.42, 0.31]
    assert (table["ci95_low"] < table["test_acc_mean"]).all() and (table["ci95_high"] > table["test_acc_mean"]).all()
    assert pd.isna(table["welch_p_vs_winner"].iloc[0]) and 0 < table["welch_p_vs_winner"].iloc[1] < 1


def test_without_a_sweep_variants_csv_says_what_setups_csv_says():
    """Catches: a no-sweep run whose variants.csv disagrees with setups.csv (other numbers, winner
    or columns beyond the added variant column)."""
    from driver.results import setups_table, variants_table

    config = make_config("smoke", seeds=2)
    rows = [{"model": "teacher", "seed": 0, "best_test_acc": 0.5, "best_val_acc": None}] + [
        {"model": s, "seed": seed, "best_test_acc": acc, "best_val_acc": None}
        for s, accs in {"ce": (0.3, 0.31), "kd": (0.35, 0.37), "kd_feat": (0.2, 0.25)}.items()
        for seed, acc in enumerate(accs)]
    old, new = setups_table(config, rows), variants_table(config, rows)
    assert list(new["variant"]) == ["kd", "ce", "kd_feat"] and list(new["setup"]) == list(new["variant"])
    pd.testing.assert_frame_equal(new.drop(columns="variant").set_index("setup").loc[list(old["setup"])],
                                  old.set_index("setup"))


def _docs_winner(grid, config: dict):
    """Run docs/outputs.md's winner snippet (after the line ``grid = ...``) on ``grid`` and ``config``."""
    text = (REPO_ROOT / "docs" / "outputs.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "winner = max(" in b)
    code = block.replace('config = json.loads(Path("runs/smoke/config.json").read_text())\n', "")
    code = "\n".join(line for line in code.splitlines() if not line.startswith("print("))
    scope = {"grid": grid, "config": config, "Path": Path}
    exec(code, scope)  # noqa: S102
    return scope["winner"], scope["best"]


@pytest.mark.parametrize("accs, expected", [
    ({(2.0, 0): 0.30, (2.0, 1): 0.32, (8.0, 0): 0.40, (8.0, 1): 0.44}, (8.0, 1)),
    # a tie of the means: the first in grid order (temperature 2, as given); get_best_result would
    # name the single best trial (temperature 8, seed 0)
    ({(2.0, 0): 0.35, (2.0, 1): 0.35, (8.0, 0): 0.40, (8.0, 1): 0.30}, (2.0, 0)),
])
def test_the_winner_and_its_best_seed_are_the_same_everywhere(accs, expected):
    """Catches: the sparsified trial picked by setup alone (across temperatures) or by the single
    best trial; a tie broken differently in the printed/csv table, sparsify_trial and the docs'
    ResultGrid snippet."""
    from driver.results import sparsify_trial, variants_table, winning_variant
    from driver.stats import lead
    from study.config import config_json

    config = make_config("smoke", setups=("kd",), seeds=2, sweep=SWEEP)
    rows = _rows(accs)
    grid = [_trial("kd", seed, t, acc) for (t, seed), acc in accs.items()]
    best = sparsify_trial(config, grid, rows)
    assert (best.config["temperature"], best.config["seed"]) == expected
    label = variant_label("kd", {"temperature": expected[0]})
    table = variants_table(config, rows)
    assert winning_variant(config, rows) == label == table["variant"].iloc[0] == lead(table)["winner"]
    docs_winner, docs_best = _docs_winner(grid, json.loads(config_json(config)))
    assert docs_winner == label and docs_best is best


def test_grid_order_is_setups_then_swept_values_as_given():
    """Catches: a grid order (the tie rule) that sorts the values instead of keeping them as given."""
    config = make_config("smoke", setups=("kd", "ce"), sweep=(("temperature", ("8", "2")), ("lr", ("0.01", "0.001"))))
    assert [variant_label(*v) for v in variants(config)][:3] == [
        "kd temperature=8 lr=0.01", "kd temperature=8 lr=0.001", "kd temperature=2 lr=0.01"]
    assert len(variants(config)) == 8 and SWEEPABLE[0] == "setups"


# --- the recipe uses the trial's own hyperparameters ----------------------------------------------


def test_the_recipe_uses_the_sparsified_trials_own_temperature(tmp_path):
    """Catches: the recipe's loss run at the scalar --temperature (4) instead of the winning trial's
    (8); the trial's batch size not used; the variant not handed to the summary/metadata."""
    import torch

    teacher = tmp_path / "teacher.pt"
    torch.save({"stand-in": True}, teacher)
    config = make_config("smoke", setups=("kd",), seeds=2, sweep=(("temperature", ("2", "8")),
                                                                  ("batch_size", ("128", "256"))),
                         output_dir=str(tmp_path))
    best = SimpleNamespace(config={"setup": "kd", "seed": 1, "temperature": 8.0, "batch_size": 256},
                           path="/x/train_student_00003")
    settings, payload = stages.sparsify.sparsify_settings(config, best, teacher, threads=1)
    assert config.temperature == 4.0 and settings.temperature == 8.0 and settings.batch_size == 256
    assert settings.variant == {"temperature": 8.0, "batch_size": 256} and payload == {"stand-in": True}
    no_sweep = make_config("smoke", output_dir=str(tmp_path), temperature=3.0)
    plain, _ = stages.sparsify.sparsify_settings(no_sweep, SimpleNamespace(
        config={"setup": "kd", "seed": 0, "temperature": 3.0, "batch_size": 128}, path="/x/t"), teacher, threads=1)
    assert plain.temperature == 3.0 and plain.variant == {}


def test_onnx_metadata_records_the_variant_and_the_recipe_temperature():
    """Catches: exported models that do not say which variant they come from, or at which
    temperature the recipe distilled them."""
    from trainables.compress.export import model_metadata

    common = dict(arch="resnet18", stem="cifar", source_trial="t", setup="kd", recipe="r.yaml", recipe_epochs=2,
                  weight_sparsity=0.8, test_acc=0.4, source_variant={"temperature": 8.0})
    pruned = model_metadata(variant="pruned", recipe_loss="kd", recipe_temperature=8.0, **common)
    assert pruned["recipe_temperature"] == "8" and json.loads(pruned["source_variant"]) == {"temperature": 8.0}
    dense = model_metadata(variant="dense", recipe_loss=None, **common)
    assert "recipe_temperature" not in dense and json.loads(dense["source_variant"]) == {"temperature": 8.0}


# --- results.csv, fingerprints, the report ----------------------------------------------------------


def test_results_columns_and_the_sparsified_rows_carry_the_swept_values():
    """Catches: results.csv without a column per swept field, or the dense parent's ONNX accuracy
    set on the other temperature's row of the same (setup, seed)."""
    from driver.results import RESULT_COLUMNS, result_columns, set_onnx_accuracy, sparsified_rows

    config = make_config("smoke", setups=("kd",), seeds=2, sweep=SWEEP)
    assert result_columns(config) == (*RESULT_COLUMNS[:2], "temperature", *RESULT_COLUMNS[2:])
    assert result_columns(make_config("smoke")) == RESULT_COLUMNS
    rows = [{"model": "kd", "seed": 1, "temperature": t, "params": 10} for t in (2.0, 8.0)]
    summary = {"setup": "kd", "recipe_epochs": 2.0, **{f"{k}_{m}": 0.1 for k in ("test_acc", "weight_sparsity")
                                                       for m in ("pruned", "pruned_quantized", "pruned_quantized_qdq")}}
    rows += sparsified_rows(summary, rows, seed=1, values={"temperature": 8.0})
    set_onnx_accuracy(rows, {"dense": 0.4, "pruned": 0.3, "pruned_quantized": 0.2, "pruned_quantized_qdq": 0.25},
                      "kd", 1, {"temperature": 8.0})
    assert [r["model"] for r in rows[2:]] == ["pruned", "pruned_quantized", "pruned_quantized_qdq"]
    assert [r["onnx_test_acc"] for r in rows] == [None, 0.4, 0.3, 0.2, 0.25]
    assert [r["temperature"] for r in rows[2:]] == [8.0, 8.0, 8.0]


def test_the_sweep_is_an_input_of_the_students():
    """Catches: a changed --sweep skipping the students (old results under new settings)."""
    from study.config import config_json
    from stages.pipeline import BY_NAME
    from study.fingerprint import differences, make_fingerprint

    def fingerprint(**overrides):
        return make_fingerprint(BY_NAME["students"], json.loads(config_json(make_config("smoke", **overrides))), {}, {})

    plain = fingerprint()
    assert plain["fields"]["sweep"] == [] and differences(plain, fingerprint()) == []
    swept = fingerprint(sweep=SWEEP)
    assert differences(plain, swept) == ["sweep [] -> [['temperature', [2.0, 8.0]]]"]
    assert differences(swept, fingerprint(sweep=(("temperature", (2.0, 4.0)),))) == [
        "sweep [['temperature', [2.0, 8.0]]] -> [['temperature', [2.0, 4.0]]]"]


def test_the_report_names_variants_plots_each_swept_field_and_the_winner_sentence():
    """Catches: trial labels that drop the variant (two temperatures of one seed collide), no
    accuracy-against-value curve per swept field and setup, or a winner sentence without the
    variant and the significance verdict."""
    from driver.results import variants_table
    from report.data import RunData, trial_label
    from report.findings import _winner_over_seeds
    from report.tables import setups_table, sweep_curves, variant_seeds

    assert trial_label("kd", 1, 2, {"temperature": 8.0}) == "kd temperature=8 s1"
    assert trial_label("kd", 1, 1, {}) == "kd" and trial_label("kd", 1, 2) == "kd s1"
    config = make_config("smoke", setups=("ce", "kd"), seeds=2, sweep=SWEEP)
    accs = {("ce", 2.0): (0.2, 0.21), ("ce", 8.0): (0.22, 0.2), ("kd", 2.0): (0.3, 0.31), ("kd", 8.0): (0.5, 0.52)}
    rows = [{"model": "teacher", "seed": 0, "temperature": None, "best_test_acc": 0.6, "best_val_acc": None,
             "params": 100}] + [{"model": s, "seed": seed, "temperature": t, "best_test_acc": a, "best_val_acc": None,
                                 "params": 40} for (s, t), pair in accs.items() for seed, a in enumerate(pair)]
    from study.config import config_json

    run = RunData(run_dir=Path("."), config=json.loads(config_json(config)), results=pd.DataFrame(rows),
                  setups=variants_table(config, rows))
    curves = sweep_curves(run)
    assert list(curves) == ["temperature"] and list(curves["temperature"]) == ["ce", "kd"]
    kd = curves["temperature"]["kd"]
    assert kd["value"].tolist() == [2.0, 8.0] and kd["mean"].round(3).tolist() == [0.305, 0.51]
    assert (kd["low"] < kd["mean"]).all()
    assert setups_table(run)["variant"].iloc[0] == "kd temperature=8"
    from report.tables import accuracy_table

    shown = accuracy_table(run)
    assert shown["temperature"].tolist()[:3] == ["", "2", "2"]  # the teacher, then kd... of each variant
    assert variant_seeds(run, run.setups.iloc[0]).tolist() == [0.5, 0.52]
    sentence = _winner_over_seeds(run)
    assert sentence.startswith("Winner by mean test accuracy over 2 seeds: kd temperature=8 ")
    assert "ahead of kd temperature=2" in sentence and ": significant at the 0.05 level" in sentence


def test_the_sparsify_sentence_names_the_winning_variant_and_reads_its_rows():
    """Catches: a sentence on what sparsifying cost that names the setup but not the variant, or
    takes the dense ONNX accuracy from another temperature's row of the same setup and seed."""
    from report.data import RunData
    from report.findings import findings

    rows = [{"model": "kd", "seed": 0, "temperature": t, "best_test_acc": a, "test_acc": a, "onnx_test_acc": o}
            for t, a, o in ((2.0, 0.40, 0.39), (8.0, 0.50, 0.49))]
    rows += [{"model": m, "seed": 0, "temperature": 8.0, "test_acc": a, "weight_sparsity": 0.8, "onnx_test_acc": a}
             for m, a in (("pruned", 0.45), ("pruned_quantized", 0.44))]
    run = RunData(run_dir=Path("."), config={}, results=pd.DataFrame(rows),
                  sparsify_summary={"setup": "kd", "variant": {"temperature": 8.0}, "test_acc_dense": 0.5})
    sentence = next(line for line in findings(run) if line.startswith("Sparsifying"))
    assert sentence.startswith("Sparsifying the kd temperature=8 student (50.0 % dense"), sentence
    assert "dense kd 49.0 %" in sentence and "pruning to 80.0 % weight sparsity cost 5.0 percentage points" in sentence


def test_epoch_lines_name_the_variant():
    """Catches: progress lines of two temperatures of one setup and seed that read the same."""
    from driver.progress import EpochLines

    trial = SimpleNamespace(config={"setup": "kd", "seed": 1, "temperature": 8.0}, trial_id="t", error_file="e")
    assert EpochLines("students", True, ("temperature",))._name(trial) == "students kd temperature=8"
    assert EpochLines("students")._name(trial) == "students kd"  # no sweep: as before
