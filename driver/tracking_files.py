"""What the MLflow tracker (``driver.tracking``) reads from a run directory: a Tune trial's params
and per-epoch results, the metrics of a result or of a recipe history row, which trials of a Tune
experiment are its final ones, and the digest that keys a run by what it mirrors. No MLflow here."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path

#: Per-epoch metrics of a teacher or student trial (besides every ``loss_<term>``).
TRIAL_METRICS = ("test_acc", "val_acc", "train_loss", "epoch_seconds", "train_images_per_sec")


def as_number(value) -> float | None:
    """``value`` as a finite float, or None (strings, NaN, missing)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return {"true": 1.0, "false": 0.0}.get(value.lower())
        return number if math.isfinite(number) else None
    return None


def read_trial(trial_dir: Path) -> tuple[dict, list[dict]]:
    """A Tune trial folder's config (``params.json``) and its results (``result.json``, one JSON
    object per line), one per ``training_iteration`` (the last line of an epoch wins)."""
    params_file = trial_dir / "params.json"
    params = json.loads(params_file.read_text()) if params_file.exists() else {}
    by_epoch: dict[int, dict] = {}
    for line in (trial_dir / "result.json").read_text().splitlines():
        if line.strip():
            result = json.loads(line)
            by_epoch[int(result["training_iteration"])] = result
    return params, [by_epoch[k] for k in sorted(by_epoch)]


def trial_metrics(result: dict) -> dict[str, float]:
    """The metrics of one epoch's result that a trial run logs."""
    keys = [k for k in result if k in TRIAL_METRICS or k.startswith("loss_")]
    return {k: v for k in keys if (v := as_number(result[k])) is not None}


def history_metrics(row: dict) -> dict[str, float]:
    """The metrics of one row of ``sparsify/history.csv``: every numeric column but ``epoch``,
    ``quantized`` as 0/1, ``precision`` (float32, int8) as ``precision_bits``."""
    metrics = {k: v for k, text in row.items() if k not in ("epoch", "precision")
               and (v := as_number(text)) is not None}
    bits = re.search(r"\d+", row.get("precision") or "")
    if bits:
        metrics["precision_bits"] = float(bits.group())
    return metrics


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def json_digest(value) -> str:
    """sha256 (hex) of ``value`` as canonical JSON: a run's ``key`` from what it mirrors."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def final_trials(experiment: Path) -> set[str] | None:
    """The trial ids of the Tune experiment in ``experiment`` (``tune.ExperimentAnalysis``: one per
    trial of the grid; for a trial that errored and was restarted, the restarted one's). None when
    the folder holds no experiment state (a folder not written by Tune): then every trial folder
    counts."""
    if not any(experiment.glob("experiment_state-*.json")):
        return None
    from ray import tune

    return {trial.trial_id for trial in tune.ExperimentAnalysis(str(experiment)).trials}
