"""Rows of ``results.csv`` (one per trained model and seed, from the Tune experiments and the
sparsify summary), ``setups.csv`` (``driver.stats``) and the trial the sparsify stage takes."""

from __future__ import annotations

from pathlib import Path

from study import StudyConfig, decision_rule, selection_metric

#: Columns of ``results.csv``, in order (README, "Outputs"): ``seed`` is the trial's seed;
#: ``best_test_acc``/``best_val_acc`` are the accuracies of the kept checkpoint, the best epoch
#: (``best_epoch``) by the selection metric (``study.selection_metric``); ``val_acc``/
#: ``best_val_acc`` are empty without ``--val-size``.
RESULT_COLUMNS = ("model", "seed", "test_acc", "best_test_acc", "val_acc", "best_val_acc", "best_epoch", "epochs",
                  "params", "seconds", "weight_sparsity", "onnx_test_acc", "base", "started_at", "finished_at")


def best_checkpoint(result, metric: str):
    """``(Checkpoint, metrics)`` of the kept checkpoint of one trial (a ``ray.tune.Result``) with
    the highest ``metric``; among equal values the earliest epoch (``training_iteration``), which
    is what ``Result.get_best_checkpoint(metric, "max")`` returns too (Tune keeps its checkpoints
    sorted by score, ties in time order). RuntimeError when no kept checkpoint has the metric."""
    kept = [(checkpoint, metrics) for checkpoint, metrics in result.best_checkpoints if metric in metrics]
    if not kept:
        raise RuntimeError(f"trial {result.path} has no checkpoint with {metric!r}")
    return max(kept, key=lambda item: (item[1][metric], -item[1]["training_iteration"]))


def _row(model: str, result, metric: str, params: int, seed) -> dict:
    frame = result.metrics_dataframe
    frame = frame.sort_values("training_iteration").drop_duplicates("training_iteration", keep="last")
    best = best_checkpoint(result, metric)[1]
    has_val = "val_acc" in frame
    return {"model": model, "seed": seed, "test_acc": frame["test_acc"].iloc[-1],
            "best_test_acc": best["test_acc"], "val_acc": frame["val_acc"].iloc[-1] if has_val else None,
            "best_val_acc": best.get("val_acc"), "best_epoch": int(best["training_iteration"]),
            "epochs": int(frame["training_iteration"].iloc[-1]), "params": params,
            "seconds": float(frame["epoch_seconds"].sum()),
            "started_at": float(frame["trial_started_at"].iloc[0]), "finished_at": float(frame["timestamp"].iloc[-1])}


def training_rows(config: StudyConfig, teacher_dir: Path, students) -> list[dict]:
    """One results row per trained model: the teacher, then one per (setup, seed) trial in
    ``config.setups`` order, seeds ascending. test_acc/val_acc at the stop, best_test_acc/
    best_val_acc at the best epoch (0..1), best_epoch, epochs, params, seconds (sum of epoch
    times), started_at/finished_at (unix seconds; they show whether the student trials overlapped).

    ``teacher_dir`` is the teacher's Tune experiment; ``students`` the students' ResultGrid."""
    from ray import tune
    from ray.tune.result_grid import ResultGrid

    from models import build_student, build_teacher, count_parameters

    metric = selection_metric(config)
    teacher = ResultGrid(tune.ExperimentAnalysis(str(teacher_dir)))[0]
    rows = [_row("teacher", teacher, metric, count_parameters(build_teacher(config.arch, stem=config.stem,
                                                                            weights=None)), config.seed)]
    params = count_parameters(build_student(config.arch, stem=config.stem))
    trials = sorted(students, key=lambda r: (config.setups.index(r.config["setup"]), r.config["seed"]))
    rows += [_row(r.config["setup"], r, metric, params, r.config["seed"]) for r in trials]
    return rows


def per_seed_frame(config: StudyConfig, rows: list[dict]):
    """The student rows as the input of ``driver.stats.setup_table``: one row per (setup,
    seed), ``test_acc`` = the kept checkpoint's test accuracy, ``val_acc`` its validation accuracy."""
    import pandas as pd

    students = [r for r in rows if r["model"] in config.setups]
    return pd.DataFrame({"setup": [r["model"] for r in students], "seed": [r["seed"] for r in students],
                         "test_acc": [r["best_test_acc"] for r in students],
                         "val_acc": [r["best_val_acc"] for r in students]}).astype({"val_acc": float})


def setups_table(config: StudyConfig, rows: list[dict]):
    """``setups.csv`` (``driver.stats.SETUP_COLUMNS``) from the results rows."""
    from driver.stats import setup_table

    return setup_table(per_seed_frame(config, rows), config.setups, selection_metric(config))


def sparsify_trial(config: StudyConfig, students, rows: list[dict]):
    """The trial the sparsify stage starts from: the winning setup's best seed. The winner has the
    best mean of the selection metric over its seeds (``driver.stats.winner``); its best seed
    the highest best-epoch value of that metric (ties: the lower seed). With one seed per setup this
    is the trial with the highest value of any epoch, as ``ResultGrid.get_best_result(metric, "max",
    scope="all")`` picks it."""
    from driver.stats import winner

    metric = selection_metric(config)
    best_setup = winner(per_seed_frame(config, rows), config.setups, metric)
    trials = [r for r in students if r.config["setup"] == best_setup]
    return max(trials, key=lambda r: (best_checkpoint(r, metric)[1][metric], -r.config["seed"]))


def sparsified_rows(summary: dict, rows: list[dict], seed=None) -> list[dict]:
    """Rows ``pruned`` and ``pruned_quantized`` from the sparsify summary: torch test accuracy,
    measured weight sparsity (0..1), recipe epochs, the setup they came from (``base``) and the
    seed of that trial."""
    params = next(row["params"] for row in rows if row["model"] == summary["setup"])
    return [{"model": name, "seed": seed, "test_acc": summary[f"test_acc_{name}"], "params": params,
             "weight_sparsity": summary[f"weight_sparsity_{name}"], "epochs": int(summary["recipe_epochs"])
             if float(summary["recipe_epochs"]).is_integer() else summary["recipe_epochs"],
             "base": summary["setup"]} for name in ("pruned", "pruned_quantized")]


def set_onnx_accuracy(rows: list[dict], accuracies: dict, setup: str, seed) -> None:
    """Set ``onnx_test_acc`` on every row of ``rows`` (in place): the test accuracy (0..1) of the
    row's exported ONNX model in DeepSparse, from ``accuracies`` (the bench stage's
    ``onnx_accuracy.json``: ONNX model name -> accuracy). The trial the sparsify stage started
    from (model ``setup``, seed ``seed``) is the ``dense`` export, the ``pruned`` and
    ``pruned_quantized`` rows are their own models; every other row gets None."""
    for row in rows:
        parent = (row["model"], row["seed"]) == (setup, seed)
        row["onnx_test_acc"] = accuracies.get("dense" if parent else row["model"])


def summary_text(config: StudyConfig, table, setups) -> str:
    """What orchestrate prints at the end: the results table (without empty columns), the setups
    table (``setups.csv``), the winner's lead and its significance, and the decision rule."""
    from driver.stats import lead_sentence

    shown = table.drop(columns=["started_at", "finished_at"]).dropna(axis=1, how="all")
    return ("\nAccuracy (0..1):\n" + shown.to_markdown(index=False, floatfmt=".4f")
            + "\n\nSetups over seeds (test accuracy of each seed's kept checkpoint, 0..1; setups.csv):\n"
            + setups.dropna(axis=1, how="all").to_markdown(index=False, floatfmt=".4f")
            + f"\n{lead_sentence(setups, selection_metric(config))}\n{decision_rule(config, capital=True)}.")
