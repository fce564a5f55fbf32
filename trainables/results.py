"""Rows of ``results.csv``: one per model, from the Tune experiments and the sparsify summary."""

from __future__ import annotations

from pathlib import Path

from study import StudyConfig

#: Columns of ``results.csv``, in order (README, "Outputs").
RESULT_COLUMNS = ("model", "test_acc", "best_test_acc", "epochs", "params", "seconds", "weight_sparsity",
                  "onnx_test_acc", "base", "started_at", "finished_at")


def training_rows(config: StudyConfig, teacher_dir: Path, students) -> list[dict]:
    """One results row per trained model (teacher, then the setups in ``config.setups`` order):
    test_acc at the stop and best_test_acc (0..1), epochs, params, seconds (sum of epoch times),
    started_at/finished_at (unix seconds; they show whether the student trials overlapped).

    ``teacher_dir`` is the teacher's Tune experiment; ``students`` the students' ResultGrid."""
    from ray import tune

    from models import build_student, build_teacher, count_parameters

    def row(model, frame, params):
        return {"model": model, "test_acc": frame["test_acc"].iloc[-1],
                "best_test_acc": frame["test_acc"].max(), "epochs": int(frame["training_iteration"].iloc[-1]),
                "params": params, "seconds": float(frame["epoch_seconds"].sum()),
                "started_at": float(frame["trial_started_at"].iloc[0]),
                "finished_at": float(frame["timestamp"].iloc[-1])}

    teacher_frame = next(iter(tune.ExperimentAnalysis(str(teacher_dir)).trial_dataframes.values()))
    rows = [row("teacher", teacher_frame,
                count_parameters(build_teacher(config.arch, stem=config.stem, weights=None)))]
    student_params = count_parameters(build_student(config.arch, stem=config.stem))
    by_setup = {result.config["setup"]: result for result in students}
    rows += [row(setup, by_setup[setup].metrics_dataframe, student_params) for setup in config.setups]
    return rows


def sparsified_rows(summary: dict, rows: list[dict]) -> list[dict]:
    """Rows ``pruned`` and ``pruned_quantized`` from the sparsify summary: torch test accuracy,
    measured weight sparsity (0..1), recipe epochs, and the setup they came from (``base``)."""
    params = next(row["params"] for row in rows if row["model"] == summary["setup"])
    return [{"model": name, "test_acc": summary[f"test_acc_{name}"], "params": params,
             "weight_sparsity": summary[f"weight_sparsity_{name}"], "epochs": int(summary["recipe_epochs"])
             if float(summary["recipe_epochs"]).is_integer() else summary["recipe_epochs"],
             "base": summary["setup"]} for name in ("pruned", "pruned_quantized")]
