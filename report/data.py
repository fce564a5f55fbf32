"""Loading one run directory for the report: ``load_run`` reads only what the run wrote
(``config.json``, the ``teacher/`` and ``students/`` Ray Tune experiments as ResultGrids,
``results.csv``, ``setups.csv``, ``benchmark.csv``, ``sparsify/``), through ``study.RunLayout``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study import LOSS_TERMS, SETUP_INFO, SETUPS, RunLayout, selection_metric
from study.config import swept_fields, variant_label
from study.layout import QDQ_MODEL, SPARSE_MODELS

MODELS = ("teacher", *SETUPS, *SPARSE_MODELS)
#: The columns of the report's loss plot (``report.ipynb``) and their legends: the total, then one
#: ``loss_<term>`` per summand of ``study.LOSS_TERMS``.
LOSS_COLUMNS = {"train_loss": "total (mean of terms)", **{f"loss_{name}": term.label for name, term in LOSS_TERMS.items()}}


@dataclass
class RunData:
    """Everything the report shows, as loaded from one run directory.

    Attributes:
        run_dir: the run directory (absolute).
        config: ``config.json`` (the StudyConfig as a dict); ``{}`` if absent.
        results: ``results.csv`` (one row per model and seed; accuracies 0..1, seconds, unix times)
            or None.
        setups: the table over seeds: ``variants.csv`` of a ``--sweep`` run (one row per variant,
            the winner first; key column ``variant``), else ``setups.csv`` (one row per student
            setup: mean, std and 95 % interval over seeds; runs made before ``variants.csv`` have
            only it), or None (a run made before either existed).
        trials: label -> that trial's per-epoch metrics (one row per ``training_iteration``,
            sorted; columns ``setup`` and ``seed`` added), loaded through a Ray Tune ResultGrid.
            Labels (``trial_label``): "teacher", and per student trial its variant (its setup, "ce",
            ..., then its swept values, "kd temperature=2") when the run has one seed per
            variant, else "<variant> s<seed>" ("ce s0", "kd temperature=2 s1", ...).
        benchmark: ``benchmark.csv`` (items_per_sec in images/s, latencies in ms per batch) or None.
        layer_sparsity: ``sparsify/layer_sparsity.csv`` (layer, params, sparsity 0..1) or None.
        sparsify_history: ``sparsify/history.csv`` (per recipe epoch) or None.
        sparsify_summary: ``sparsify/summary.json`` or None.
        notes: one-line notes on what is absent (shown once, near the top of the report).
    """

    run_dir: Path
    config: dict
    results: Any = None
    setups: Any = None
    trials: dict = field(default_factory=dict)
    benchmark: Any = None
    layer_sparsity: Any = None
    sparsify_history: Any = None
    sparsify_summary: dict | None = None
    notes: list = field(default_factory=list)

    @property
    def swept(self) -> tuple:
        """The fields the run swept besides the setups (``--sweep``; () for none)."""
        return swept_fields(self.config)

    @property
    def has_sparsify(self) -> bool:
        """True when the sparsify stage left any output (rows in results.csv or sparsify/ files)."""
        rows = self.results is not None and self.results["model"].isin(SPARSE_MODELS).any()
        return bool(rows or self.layer_sparsity is not None or self.sparsify_history is not None)

    @property
    def metric(self) -> str:
        """The run's selection metric: ``"val_acc"`` with a validation split, else ``"test_acc"``."""
        return selection_metric(self.config)

    @property
    def seeds(self) -> int:
        """Seeds per student setup (``config.json``'s ``seeds``; 1 without a ``config.json``)."""
        return int(self.config.get("seeds", 1) or 1)

    @property
    def has_benchmark(self) -> bool:
        """True when ``benchmark.csv`` was found and has rows."""
        return self.benchmark is not None and len(self.benchmark) > 0

    @property
    def onnx_accuracy_engine(self) -> str:
        """The engine that measured ``onnx_test_acc`` (``onnx_accuracy.json``): "DeepSparse", or
        "onnxruntime" where the run's Python had none (the Python 3.12 profile: no DeepSparse row of
        ``benchmark.csv`` has an accuracy). Runs made before ``benchmark.csv`` had accuracies:
        "DeepSparse"."""
        bench = self.benchmark
        if bench is None or "accuracy" not in bench:
            return "DeepSparse"
        return "DeepSparse" if bench.loc[bench["engine"] == "deepsparse", "accuracy"].notna().any() else "onnxruntime"


def load_result_grid(path: str | os.PathLike):
    """The ``ray.tune.ResultGrid`` of the Tune experiment stored at ``path`` (no Ray cluster
    is started: ``ResultGrid(ExperimentAnalysis(path))`` only reads the experiment files).

    Raises ValueError if ``path`` holds no Tune experiment."""
    import logging
    import warnings

    # In a notebook kernel, importing Ray Tune prints a tqdm "IProgress not found" warning and a
    # Ray INFO line about ipywidgets (rich widget output); neither matters for a static report.
    logging.getLogger("ray.widgets.util").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        from ray import tune
        from ray.tune.result_grid import ResultGrid

    if not tune.Tuner.can_restore(str(path)):
        raise ValueError(f"{path} holds no Ray Tune experiment (no experiment_state-*.json)")
    return ResultGrid(tune.ExperimentAnalysis(str(path)))


def trial_label(setup: str, seed, seeds: int, values: dict | None = None) -> str:
    """The report's name of one trial: ``"teacher"``; a student's variant (its setup, then its
    swept values ``values``: ``"kd temperature=2"``) when the run has one seed per variant
    (``seeds`` 1), else ``"<variant> s<seed>"``."""
    if setup == "teacher":
        return setup
    name = variant_label(setup, values or {})
    if seeds <= 1 or seed is None:
        return name
    return f"{name} s{int(seed)}"


def _epochs(frame):
    """Per-epoch rows of a trial's metrics dataframe: one per training_iteration, in order."""
    frame = frame.sort_values("training_iteration").drop_duplicates("training_iteration", keep="last")
    frame = frame.reset_index(drop=True)
    frame["training_iteration"] = frame["training_iteration"].astype(int)
    return frame


def _read_csv(path: Path):
    import pandas as pd

    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    return frame if len(frame) else None


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Load a run directory written by ``orchestrate.py`` (see the module docstring).

    Missing stages are not errors: their attributes stay None and ``notes`` says, in one line,
    what is absent. Raises ValueError if ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist; pass the --output-dir of a study run")
    layout = RunLayout(run_dir)
    run = RunData(run_dir=run_dir,
                  config=json.loads(layout.config.read_text()) if layout.config.is_file() else {})
    run.results = _read_csv(layout.results)
    for path in (layout.teacher_dir, layout.students_dir):
        if not path.is_dir():
            continue
        for result in load_result_grid(path):
            if result.metrics_dataframe is None or not len(result.metrics_dataframe):
                continue
            setup = "teacher" if path == layout.teacher_dir else str(result.config.get("setup"))
            seed = result.config.get("seed", run.config.get("seed"))
            values = {} if setup == "teacher" else {name: result.config.get(name) for name in run.swept}
            frame = _epochs(result.metrics_dataframe).assign(setup=setup, seed=seed, **values)
            run.trials[trial_label(setup, seed, run.seeds, values)] = frame
    order = {label: i for i, label in enumerate(MODELS)}
    run.trials = dict(sorted(run.trials.items(), key=lambda item: (
        order.get(item[1]["setup"].iloc[0], len(order)), item[1]["seed"].iloc[0] or 0)))
    run.setups = _read_csv(layout.variants) if run.swept or not layout.setups.is_file() else _read_csv(layout.setups)
    run.benchmark = _read_csv(layout.benchmark)
    run.layer_sparsity = _read_csv(layout.layer_sparsity)
    run.sparsify_history = _read_csv(layout.sparsify_history)
    summary = layout.sparsify_summary
    run.sparsify_summary = json.loads(summary.read_text()) if summary.is_file() else None
    if run.results is None:
        run.notes.append("No results.csv in this run directory: the accuracy table is limited to the "
                         "Tune trials found.")
    if not run.has_sparsify and not run.has_benchmark:
        run.notes.append("No sparsify or benchmark outputs in this run (it stopped after the students "
                         "stage): the sparsity and speed sections are skipped.")
    elif not run.has_benchmark:
        run.notes.append("No benchmark.csv in this run (it stopped after the sparsify stage): "
                         "the speed section is skipped.")
    elif not run.has_sparsify:
        run.notes.append("No sparsify outputs in this run: the sparsity sections are skipped.")
    return run


def stop_epoch(run: RunData, label: str) -> tuple[int, str]:
    """The epoch trial ``label`` ("teacher", "ce", ...) stopped at and why:
    ``(epoch, "plateau" | "epoch limit" | "stopped")``.

    "plateau" when the project's stop rule (``trainables.stopper.plateau_epoch`` with the run's
    ``tolerance``/``patience``, on the run's selection metric ``RunData.metric``) fires exactly at
    the last epoch; "epoch limit" when the last epoch
    equals the configured maximum (``teacher_max_epochs`` for the teacher, ``max_epochs`` for a
    student); "stopped" otherwise (e.g. an interrupted trial). KeyError for an unknown label."""
    from trainables.stopper import plateau_epoch

    frame, config = run.trials[label], run.config
    epoch = int(frame["training_iteration"].iloc[-1])
    fired = plateau_epoch([float(a) for a in frame[run.metric]], float(config.get("tolerance", 0.01)),
                          int(config.get("patience", 2)))
    if fired == epoch:
        return epoch, "plateau"
    limit = config.get("teacher_max_epochs" if label == "teacher" else "max_epochs")
    return epoch, "epoch limit" if epoch == limit else "stopped"


def _results_row(run: RunData, model: str, seed=None, variant: dict | None = None):
    """The last ``results.csv`` row of ``model`` (of that ``seed`` when given and the file has
    a ``seed`` column; of that ``variant``, ``{swept field: value}``, when given), or None."""
    if run.results is None:
        return None
    rows = run.results[run.results["model"] == model]
    if seed is not None and "seed" in rows:
        rows = rows[rows["seed"] == seed]
    for name, value in (variant or {}).items():
        if name in rows:
            rows = rows[rows[name] == value]
    return rows.iloc[-1] if len(rows) else None


def base_seed(run: RunData):
    """The seed of the trial the sparsify stage started from (the ``seed`` of the sparse rows of
    ``results.csv``), or None."""
    for model in SPARSE_MODELS:
        row = _results_row(run, model)
        if row is not None and "seed" in row.index and not _isnan(row["seed"]):
            return int(row["seed"])
    return None


def is_compressed(model) -> bool:
    """Whether ``model`` (a model name) is one of the study's compressed models: unstructured
    (``pruned*``: a sparsity target's) or structured (``structured*``: a channel ratio's)."""
    return str(model).startswith(("pruned", "structured"))


def _isnan(value) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return value is None


def _value(row, column: str) -> float:
    """A float cell of a results row, NaN when the row/column is absent or the cell empty."""
    if row is None or column not in row.index:
        return math.nan
    try:
        return float(row[column])
    except (TypeError, ValueError):
        return math.nan


def _base_setup(run: RunData) -> str | None:
    """The student setup the sparsify stage started from (summary.json, else the ``base`` column)."""
    if run.sparsify_summary and run.sparsify_summary.get("setup"):
        return str(run.sparsify_summary["setup"])
    for model in SPARSE_MODELS:
        row = _results_row(run, model)
        if row is not None and "base" in row.index and isinstance(row["base"], str) and row["base"]:
            return row["base"]
    return None


def _describe(run: RunData, model: str) -> str:
    cfg = run.config
    base = _base_setup(run) or "best student"
    return {
        "teacher": f"{cfg.get('arch', '?')}, CE",
        **{setup: info.formula for setup, info in SETUP_INFO.items()},
        "pruned": f"{base}, pruned",
        "pruned_quantized": f"{base}, pruned + INT8",
        QDQ_MODEL: f"{base}, pruned + INT8 (QDQ export)",
    }.get(model, "")
