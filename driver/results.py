"""Rows of ``results.csv`` (one per trained model and seed, from the Tune experiments and the
sparsify summary), ``setups.csv`` (``driver.stats``) and the trial the sparsify stage takes."""

from __future__ import annotations

from pathlib import Path

from study import StudyConfig, decision_rule, selection_metric
from study.config import swept_fields, variant_label, variants
from study.layout import SPARSE_MODELS, STRUCTURED_KINDS

#: Columns of ``results.csv``, in order (docs/outputs.md): ``seed`` is the trial's seed;
#: ``best_test_acc``/``best_val_acc`` are the accuracies of the kept checkpoint, the best epoch
#: (``best_epoch``) by the selection metric (``study.selection_metric``; of tied epochs the latest:
#: ``best_checkpoint``); ``val_acc``/
#: ``best_val_acc`` are empty without ``--val-size``.
RESULT_COLUMNS = ("model", "seed", "test_acc", "best_test_acc", "val_acc", "best_val_acc", "best_epoch", "epochs",
                  "params", "seconds", "weight_sparsity", "onnx_test_acc", "base", "started_at", "finished_at")


def result_columns(config) -> tuple[str, ...]:
    """Columns of this run's ``results.csv``: ``RESULT_COLUMNS`` with one column per swept field
    (``--sweep``, in the order given) after ``seed``: the value the row's trial trained with (empty
    for the teacher; the sparsified rows: their parent's)."""
    return (*RESULT_COLUMNS[:2], *swept_fields(config), *RESULT_COLUMNS[2:])


def trial_variant(config, trial_config: dict) -> tuple[str, dict]:
    """``(setup, {swept field: value})`` of a student trial from its Tune config."""
    return trial_config["setup"], {name: trial_config[name] for name in swept_fields(config)}


def row_variant(config, row: dict) -> str:
    """The variant label (``study.config.variant_label``) of a student row of ``results.csv``."""
    return variant_label(row["model"], {name: row[name] for name in swept_fields(config)})


def best_checkpoint(result, metric: str):
    """``(Checkpoint, metrics)`` of the kept checkpoint of one trial (a ``ray.tune.Result``) with
    the highest ``metric``; among equal values the latest epoch (``training_iteration``).

    The tie rule is Tune's retention: with ``CheckpointConfig(num_to_keep=1,
    checkpoint_score_attribute=metric)`` (``driver.tuning.run_tuner``) Ray's ``_CheckpointManager``
    (``ray/train/_internal/checkpoint_manager.py``, Ray 2.49) inserts a new checkpoint to the right
    of equal scores and keeps the rightmost, so of tied epochs only the latest is still on disk.
    ``best_epoch``/``best_test_acc`` of ``results.csv``, ``teacher.pt`` and the checkpoint the
    sparsify stage reads all come from here. RuntimeError when no kept checkpoint has the metric."""
    kept = [(checkpoint, metrics) for checkpoint, metrics in result.best_checkpoints if metric in metrics]
    if not kept:
        raise RuntimeError(f"trial {result.path} has no checkpoint with {metric!r}")
    return max(kept, key=lambda item: (item[1][metric], item[1]["training_iteration"]))


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
    """One results row per trained model: the teacher, then one per (variant, seed) trial in
    grid order (``study.config.variants``: setups order, then the swept values as given), seeds
    ascending; a student row also holds the value of each swept field. test_acc/val_acc at the stop, best_test_acc/
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
    order = variants(config)
    trials = sorted(students, key=lambda r: (order.index(trial_variant(config, r.config)), r.config["seed"]))
    rows += [{**_row(r.config["setup"], r, metric, params, r.config["seed"]), **trial_variant(config, r.config)[1]}
             for r in trials]
    return rows


def per_seed_frame(config: StudyConfig, rows: list[dict]):
    """The student rows as the input of ``driver.stats.setup_table``: one row per (variant,
    seed) (columns ``setup``, ``variant``: its label), ``test_acc`` = the kept checkpoint's test accuracy, ``val_acc`` its validation accuracy."""
    import pandas as pd

    students = [r for r in rows if r["model"] in config.setups]
    return pd.DataFrame({"setup": [r["model"] for r in students],
                         "variant": [row_variant(config, r) for r in students], "seed": [r["seed"] for r in students],
                         "test_acc": [r["best_test_acc"] for r in students],
                         "val_acc": [r["best_val_acc"] for r in students]}).astype({"val_acc": float})


def setups_table(config: StudyConfig, rows: list[dict]):
    """``setups.csv`` (``driver.stats.SETUP_COLUMNS``) from the results rows."""
    from driver.stats import setup_table

    return setup_table(per_seed_frame(config, rows), config.setups, selection_metric(config))


#: Columns of ``variants.csv``: ``variant`` (``study.config.variant_label``), ``setup``, one column
#: per swept field, then ``driver.stats.SETUP_COLUMNS`` after its first; one row per variant, the
#: winner first, the others in grid order.
def variant_columns(config) -> tuple[str, ...]:
    from driver.stats import SETUP_COLUMNS

    return ("variant", "setup", *swept_fields(config), *SETUP_COLUMNS[1:])


def variants_table(config: StudyConfig, rows: list[dict]):
    """``variants.csv`` from the results rows: one row per variant (setup and swept values), the
    interval and Welch columns of ``setups.csv`` over its seeds, the winner first (best mean of the
    selection metric; ties: the first in grid order), the others in grid order. Without ``--sweep``
    each variant is a setup and the rows say what ``setups.csv`` says."""
    import pandas as pd

    from driver.stats import setup_table, winner

    metric = selection_metric(config)
    frame = per_seed_frame(config, rows)
    grid = variants(config)
    labels = [variant_label(setup, values) for setup, values in grid]
    table = setup_table(frame, labels, metric, key="variant")
    if not len(table):
        return pd.DataFrame(columns=list(variant_columns(config)))
    info = dict(zip(labels, grid))
    table.insert(1, "setup", [info[v][0] for v in table["variant"]])
    for i, name in enumerate(swept_fields(config)):
        table.insert(2 + i, name, [info[v][1][name] for v in table["variant"]])
    best = winner(frame, [v for v in labels if v in set(table["variant"])], metric, key="variant")
    table = pd.concat([table[table["variant"] == best], table[table["variant"] != best]], ignore_index=True)
    return table[list(variant_columns(config))]


def winning_variant(config: StudyConfig, rows: list[dict]) -> str:
    """The label of the winning variant: best mean of the selection metric over its seeds; ties:
    the first in grid order (``study.config.variants``)."""
    from driver.stats import winner

    labels = [variant_label(setup, values) for setup, values in variants(config)]
    frame = per_seed_frame(config, rows)
    return winner(frame, [v for v in labels if (frame["variant"] == v).any()], selection_metric(config),
                  key="variant")


def sparsify_trial(config: StudyConfig, students, rows: list[dict]):
    """The trial the sparsify stage starts from: the winning variant's best seed. The winner has the
    best mean of the selection metric over its seeds (``winning_variant``; ties: the first in grid
    order); its best seed the highest best-epoch value of that metric (ties: the lower seed)."""
    metric = selection_metric(config)
    best = winning_variant(config, rows)
    trials = [r for r in students if variant_label(*trial_variant(config, r.config)) == best]
    return max(trials, key=lambda r: (best_checkpoint(r, metric)[1][metric], -r.config["seed"]))


def sparsified_rows(summary: dict, rows: list[dict], seed=None, values: dict | None = None) -> list[dict]:
    """Rows ``<kind><tag>`` (``study.layout.SPARSE_MODELS``: pruned, pruned_quantized and
    pruned_quantized_qdq, the one QAT model's two exports sharing its torch numbers; and
    ``STRUCTURED_KINDS``, with their own parameter counts) of every
    target of the sparsify summary (``RunLayout.read_sparsify``; one without ``targets``: itself, a
    default run's; a kind it does not record is left out): torch test accuracy, measured weight sparsity (0..1), recipe epochs, the setup they came from
    (``base``), the seed of that trial and its swept values (``values``: field -> value)."""
    params = next(row["params"] for row in rows if row["model"] == summary["setup"])
    return [{"model": target.get("models", {}).get(kind, kind), "seed": seed, **(values or {}),
             "test_acc": target[f"test_acc_{kind}"], "params": target.get(f"params_{kind}", params),
             "weight_sparsity": target[f"weight_sparsity_{kind}"], "epochs": int(target["recipe_epochs"])
             if float(target["recipe_epochs"]).is_integer() else target["recipe_epochs"],
             "base": target["setup"]} for target in summary.get("targets", [summary])
            for kind in (*SPARSE_MODELS, *STRUCTURED_KINDS) if f"test_acc_{kind}" in target]


def set_onnx_accuracy(rows: list[dict], accuracies: dict, setup: str, seed, values: dict | None = None) -> None:
    """Set ``onnx_test_acc`` on every row of ``rows`` (in place): the test accuracy (0..1) of the
    row's exported ONNX model in DeepSparse, from ``accuracies`` (the bench stage's
    ``onnx_accuracy.json``: ONNX model name -> accuracy). The trial the sparsify stage started
    from (model ``setup``, seed ``seed``) is the ``dense`` export, the sparse rows
    (``study.layout.SPARSE_MODELS``) are their own models; every other row gets None."""
    for row in rows:
        parent = (row["model"], row["seed"]) == (setup, seed) and all(
            row.get(name) == value for name, value in (values or {}).items())
        row["onnx_test_acc"] = accuracies.get("dense" if parent else row["model"])


def summary_text(config: StudyConfig, table, setups) -> str:
    """What orchestrate prints at the end: the results table (without empty columns), the variants
    table (``variants.csv``, the winner first), the winner's lead and its significance, and the
    decision rule."""
    from driver.stats import lead_sentence

    shown = table.drop(columns=["started_at", "finished_at"]).dropna(axis=1, how="all")
    return ("\nAccuracy (0..1):\n" + shown.to_markdown(index=False, floatfmt=".4f")
            + "\n\nVariants over seeds (test accuracy of each seed's kept checkpoint, 0..1; variants.csv, "
            "the winner first):\n"
            + setups.dropna(axis=1, how="all").to_markdown(index=False, floatfmt=".4f")
            + f"\n{lead_sentence(setups, selection_metric(config))}\n{decision_rule(config, capital=True)}.")
