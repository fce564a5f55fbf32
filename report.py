#!/usr/bin/env python
"""The study report: load one run directory, execute ``report.ipynb`` on it, render HTML and PDF.

Two halves:

* data helpers the notebook calls (``load_run``, ``accuracy_table``, ``findings`` ...): they read
  only what the run wrote (``config.json``, the ``teacher/`` and ``students/`` Ray Tune
  experiments, ``results.csv``, ``benchmark.csv``, ``sparsify/``), so every number in the report
  comes from the data;
* ``render_report(run_dir)``: executes the notebook with nbclient (kernel: this interpreter),
  writes ``<run_dir>/report.ipynb``, ``report.html`` (nbconvert, code hidden) and ``report.pdf``
  (headless Chromium prints the HTML).

Usage: ``python report.py RUN_DIR`` (re-render an existing run); ``orchestrate.py --report`` /
``--report-only`` call ``render_report``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrate import SETUPS  # the standard library only: cheap to import
from trainables.utils import atomic_output, atomic_write_text

PROJECT_DIR = Path(__file__).resolve().parent
NOTEBOOK = PROJECT_DIR / "report.ipynb"
SPARSE_MODELS = ("pruned", "pruned_quantized")
MODELS = ("teacher", *SETUPS, *SPARSE_MODELS)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "apt-get install -y chromium"
RUN_DIR_ENV = "REPORT_RUN_DIR"

__all__ = ["ReportError", "RunData", "load_run", "stop_epoch", "accuracy_table", "accuracy_note",
           "show_table", "benchmark_frame", "benchmark_table", "student_overlap", "overlap_sentence",
           "findings", "run_summary", "section", "use_print_style", "render_report", "main"]


class ReportError(RuntimeError):
    """The report could not be produced: a notebook cell raised, or Chromium failed."""


# ---------------------------------------------------------------------------------------------
# Loading a run


@dataclass
class RunData:
    """Everything the report shows, as loaded from one run directory.

    Attributes:
        run_dir: the run directory (absolute).
        config: ``config.json`` (the StudyConfig as a dict); ``{}`` if absent.
        results: ``results.csv`` (one row per model; accuracies 0..1, seconds, unix times) or None.
        trials: label ("teacher", "ce", "kd", "kd_feat") -> that trial's per-epoch metrics
            (one row per ``training_iteration``, sorted), loaded through a Ray Tune ResultGrid.
        benchmark: ``benchmark.csv`` (items_per_sec in images/s, latencies in ms per batch) or None.
        layer_sparsity: ``sparsify/layer_sparsity.csv`` (layer, params, sparsity 0..1) or None.
        sparsify_history: ``sparsify/history.csv`` (per recipe epoch) or None.
        sparsify_summary: ``sparsify/summary.json`` or None.
        notes: one-line notes on what is absent (shown once, near the top of the report).
    """

    run_dir: Path
    config: dict
    results: Any = None
    trials: dict = field(default_factory=dict)
    benchmark: Any = None
    layer_sparsity: Any = None
    sparsify_history: Any = None
    sparsify_summary: dict | None = None
    notes: list = field(default_factory=list)

    @property
    def has_sparsify(self) -> bool:
        """True when the sparsify stage left any output (rows in results.csv or sparsify/ files)."""
        rows = self.results is not None and self.results["model"].isin(SPARSE_MODELS).any()
        return bool(rows or self.layer_sparsity is not None or self.sparsify_history is not None)

    @property
    def has_benchmark(self) -> bool:
        """True when ``benchmark.csv`` was found and has rows."""
        return self.benchmark is not None and len(self.benchmark) > 0


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
    config_path = run_dir / "config.json"
    run = RunData(run_dir=run_dir, config=json.loads(config_path.read_text()) if config_path.is_file() else {})
    run.results = _read_csv(run_dir / "results.csv")
    for name in ("teacher", "students"):
        path = run_dir / name
        if not path.is_dir():
            continue
        for result in load_result_grid(path):
            if result.metrics_dataframe is None or not len(result.metrics_dataframe):
                continue
            label = "teacher" if name == "teacher" else str(result.config.get("setup"))
            run.trials[label] = _epochs(result.metrics_dataframe)
    order = {label: i for i, label in enumerate(MODELS)}
    run.trials = dict(sorted(run.trials.items(), key=lambda item: order.get(item[0], len(order))))
    run.benchmark = _read_csv(run_dir / "benchmark.csv")
    run.layer_sparsity = _read_csv(run_dir / "sparsify" / "layer_sparsity.csv")
    run.sparsify_history = _read_csv(run_dir / "sparsify" / "history.csv")
    summary = run_dir / "sparsify" / "summary.json"
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


# ---------------------------------------------------------------------------------------------
# Numbers derived from the data


def stop_epoch(run: RunData, label: str) -> tuple[int, str]:
    """The epoch trial ``label`` ("teacher", "ce", ...) stopped at and why:
    ``(epoch, "plateau" | "epoch limit" | "stopped")``.

    "plateau" when the project's stop rule (``trainables.stopper.plateau_epoch`` with the run's
    ``tolerance``/``patience``) fires exactly at the last epoch; "epoch limit" when the last epoch
    equals the configured maximum (``teacher_max_epochs`` for the teacher, ``max_epochs`` for a
    student); "stopped" otherwise (e.g. an interrupted trial). KeyError for an unknown label."""
    from trainables.stopper import plateau_epoch

    frame, config = run.trials[label], run.config
    epoch = int(frame["training_iteration"].iloc[-1])
    fired = plateau_epoch([float(a) for a in frame["test_acc"]], float(config.get("tolerance", 0.01)),
                          int(config.get("patience", 2)))
    if fired == epoch:
        return epoch, "plateau"
    limit = config.get("teacher_max_epochs" if label == "teacher" else "max_epochs")
    return epoch, "epoch limit" if epoch == limit else "stopped"


def _results_row(run: RunData, model: str):
    if run.results is None:
        return None
    rows = run.results[run.results["model"] == model]
    return rows.iloc[-1] if len(rows) else None


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
        "ce": "CE",
        "kd": "CE + soft CE",
        "kd_feat": "CE + soft CE + MSE",
        "pruned": f"{base}, pruned",
        "pruned_quantized": f"{base}, pruned + INT8",
    }.get(model, "")


def accuracy_table(run: RunData):
    """The accuracy table, one row per model in ``MODELS`` order (then any other models).

    Columns: model, trained with (loss terms; for the sparse models the student they start from),
    params (M), epochs, test acc (stop) / best test acc / ONNX test acc (fractions 0..1 as strings
    with 4 decimals), weight sparsity (%), time (s: training or recipe wall time); empty
    cells where a value does not apply. From ``results.csv``; without it, from the Tune trials."""
    import pandas as pd

    if run.results is not None:
        frame = run.results.copy()
    else:
        frame = pd.DataFrame([{"model": label, "test_acc": t["test_acc"].iloc[-1],
                               "best_test_acc": t["test_acc"].max(), "epochs": len(t),
                               "seconds": t["epoch_seconds"].sum()} for label, t in run.trials.items()])
    order = {m: i for i, m in enumerate(MODELS)}
    frame = frame.assign(_o=frame["model"].map(lambda m: order.get(m, len(order)))).sort_values("_o", kind="stable")

    def fmt(value, spec):
        return "" if value is None or pd.isna(value) else format(value, spec)

    rows = []
    for _, r in frame.iterrows():
        get = lambda c: r[c] if c in r.index else None  # noqa: E731
        params = get("params")
        rows.append({
            "model": r["model"], "trained with": _describe(run, r["model"]),
            "params (M)": fmt(None if params is None or pd.isna(params) else params / 1e6, ".2f"),
            "epochs": fmt(get("epochs"), "g"),
            "test acc (stop)": fmt(get("test_acc"), ".4f"),
            "best test acc": fmt(get("best_test_acc"), ".4f"),
            "ONNX test acc (DeepSparse)": fmt(get("onnx_test_acc"), ".4f"),
            "weight sparsity (%)": fmt(None if get("weight_sparsity") is None or pd.isna(get("weight_sparsity"))
                                       else 100 * get("weight_sparsity"), ".1f"),
            "time (s)": fmt(get("seconds"), ".0f"),
        })
    table = pd.DataFrame(rows)
    empty = [c for c in table.columns if (table[c] == "").all()]
    return table.drop(columns=empty)


def accuracy_note(table) -> str:
    """The sentence under the accuracy table, naming only the columns ``table`` has."""
    where = ["at the stop epoch", "at the best epoch"]
    if "ONNX test acc (DeepSparse)" in table:
        where.append("of the exported ONNX model run in DeepSparse")
    text = ("Test accuracy as a fraction of the test images (0–1): " + ", ".join(where[:-1])
            + f" and {where[-1]}.")
    if "weight sparsity (%)" in table:
        text += " Weight sparsity: share of zero weights in the conv and linear layers."
    sparse_time = "time (s)" in table and (table.loc[table["model"].isin(SPARSE_MODELS), "time (s)"] != "").any()
    if "time (s)" in table:
        text += " Time: wall-clock seconds of training" + (
            " (for the sparse models: of the recipe)." if sparse_time else ".")
    return text


def show_table(table, title: str, note: str | None = None) -> None:
    """Display ``table`` (a DataFrame of strings) under a level-2 heading ``title``, as one output
    with both text/markdown (heading + pipe table) and text/html; ``note`` is a sentence under it."""
    from html import escape

    from IPython.display import display

    markdown = f"## {title}\n\n" + table.to_markdown(index=False, disable_numparse=True)
    html = f"<h2>{escape(title)}</h2>\n" + table.to_html(index=False, escape=True, classes="report-table",
                                                         border=0)
    if note:
        markdown += f"\n\n{note}"
        html += f"\n<p>{escape(note)}</p>"
    display({"text/markdown": markdown, "text/html": html, "text/plain": markdown}, raw=True)


_BENCH_ORDER = {("dense", "onnxruntime"): 0, ("dense", "deepsparse"): 1, ("pruned", "deepsparse"): 2,
                ("pruned_quantized", "deepsparse"): 3}


def benchmark_frame(run: RunData):
    """``benchmark.csv`` sorted (batch size, then dense/onnxruntime, dense, pruned, pruned_quantized)
    with ``name`` ("model (engine)" on two lines), ``speedup`` (items_per_sec / that of dense on
    onnxruntime at the same batch size; NaN without that baseline) and ``speed_label`` (bar text)."""
    import pandas as pd

    b = run.benchmark.copy()
    b["_o"] = [_BENCH_ORDER.get((m, e), 9) for m, e in zip(b["model"], b["engine"])]
    b = b.sort_values(["batch_size", "_o", "model", "engine"]).drop(columns="_o").reset_index(drop=True)
    b["name"] = b["model"] + "\n(" + b["engine"] + ")"
    ref = b[(b["model"] == "dense") & (b["engine"] == "onnxruntime")].set_index("batch_size")["items_per_sec"]
    b["speedup"] = b["items_per_sec"] / b["batch_size"].map(ref)
    b["speed_label"] = [f"{ips:.0f}" + ("" if pd.isna(s) else f" ({s:.2f}×)")
                        for ips, s in zip(b["items_per_sec"], b["speedup"])]
    return b


def benchmark_table(run: RunData):
    """``benchmark.csv`` as a table of strings for display (throughput images/s, latencies ms)."""
    import pandas as pd

    b = benchmark_frame(run)
    return pd.DataFrame({
        "model": b["model"], "engine": b["engine"], "batch": b["batch_size"].astype(str),
        "cores": b["num_cores"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}") if "num_cores" in b else "",
        "images/s": b["items_per_sec"].map("{:.1f}".format),
        "vs dense onnxruntime": b["speedup"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}×"),
        "mean (ms)": b["latency_mean_ms"].map("{:.1f}".format),
        "p50 (ms)": b["latency_p50_ms"].map("{:.1f}".format),
        "p99 (ms)": b["latency_p99_ms"].map("{:.1f}".format),
    })


def student_overlap(run: RunData) -> dict | None:
    """When the student trials ran, from ``results.csv`` ``started_at``/``finished_at`` (unix s).

    Returns None without those columns, else ``{"start", "end"}`` (unix s, the interval in which
    all student trials ran at once; ``end <= start`` means none), ``"seconds"`` (its length, >= 0),
    ``"fraction"`` (of the longest student trial's wall time, 0..1), ``"trials"`` (setups used)."""
    if run.results is None or not {"started_at", "finished_at"} <= set(run.results.columns):
        return None
    rows = run.results[run.results["model"].isin(SETUPS)].dropna(subset=["started_at", "finished_at"])
    if len(rows) < 2:
        return None
    start, end = rows["started_at"].max(), rows["finished_at"].min()
    longest = (rows["finished_at"] - rows["started_at"]).max()
    seconds = max(0.0, float(end - start))
    return {"start": float(start), "end": float(end), "seconds": seconds,
            "fraction": seconds / longest if longest > 0 else 0.0, "trials": list(rows["model"])}


def overlap_sentence(run: RunData) -> str | None:
    """One sentence: did the student trials run at the same time (see ``student_overlap``)?"""
    lap = student_overlap(run)
    if lap is None:
        return None
    n = len(lap["trials"])
    if lap["seconds"] > 0:
        return (f"The {n} student trials overlapped in time: all {n} ran at once for {lap['seconds']:.0f} s, "
                f"{100 * lap['fraction']:.0f} % of the longest trial's wall time.")
    return f"The {n} student trials did not all run at the same time (they share no common interval)."


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _pp(delta: float) -> str:
    return f"{abs(100 * delta):.1f} percentage points"


def _change(before: float, after: float) -> str:
    if math.isnan(after):
        return "(no accuracy recorded)"
    if after < before:
        return f"cost {_pp(before - after)} (→ {_pct(after)})"
    if after > before:
        return f"gained {_pp(after - before)} (→ {_pct(after)})"
    return f"left accuracy unchanged ({_pct(after)})"


def _label(row) -> str:
    return f"{row['model']} on {row['engine']}"


def findings(run: RunData) -> list[str]:
    """A few sentences, written from the numbers: which student setup won and by how much, what
    sparsification cost in accuracy, which model is fastest per batch size (and the factor vs dense
    onnxruntime), the CPU's ISA, whether the student trials overlapped in time; plus ``notes``."""
    import pandas as pd

    out = list(run.notes)
    # The study keeps each trial's best checkpoint (and sparsifies the best of those), so a setup
    # "wins" by its best-epoch test accuracy; the accuracy at the stop epoch is mentioned if it disagrees.
    def accuracies(column):
        if run.results is not None and column in run.results:
            values = {s: _value(_results_row(run, s), column) for s in SETUPS}
        else:
            values = {s: float(run.trials[s]["test_acc"].max() if column == "best_test_acc"
                               else run.trials[s]["test_acc"].iloc[-1]) for s in SETUPS if s in run.trials}
        return {s: a for s, a in values.items() if not math.isnan(a)}

    best, last = accuracies("best_test_acc"), accuracies("test_acc")
    if best:
        ranked = sorted(best.items(), key=lambda kv: -kv[1])
        top = ranked[0][1]
        winners = [s for s, a in ranked if a == top]
        others = [f"{s} {_pct(a)} ({_pp(top - a)} behind)" for s, a in ranked if a != top]
        head = (f"**{winners[0]}** won among the students: {_pct(top)} test accuracy at its best epoch"
                if len(winners) == 1 else f"**{' and '.join(winners)}** tie for the best student at {_pct(top)}")
        text = head + (f"; then {', '.join(others)}." if others else ".")
        if last:
            final = max(last.values())
            leaders = [s for s, a in last.items() if a == final]
            if set(leaders) != set(winners):
                text += f" At the stop epoch instead, {' and '.join(leaders)} led ({_pct(final)})."
        teacher = _results_row(run, "teacher")
        t_acc = _value(teacher, "best_test_acc")
        if math.isnan(t_acc) and "teacher" in run.trials:
            t_acc = float(run.trials["teacher"]["test_acc"].max())
        if not math.isnan(t_acc):
            side = "above" if top > t_acc else "below" if top < t_acc else "level with"
            gap = "" if top == t_acc else f"{_pp(top - t_acc)} "
            text += f" The teacher reached {_pct(t_acc)} at its best epoch; the best student is {gap}{side} it"
            student_params = _value(_results_row(run, winners[0]), "params")
            t_params = _value(teacher, "params")
            if t_params > 0 and not math.isnan(student_params):
                text += f" with {100 * student_params / t_params:.0f} % of the teacher's parameters"
            text += "."
        out.append(text)
    base = _base_setup(run)
    # The dense starting point: the checkpoint the sparsify stage loaded (summary.json), else the
    # base setup's best epoch (that is the checkpoint the study keeps).
    dense = float((run.sparsify_summary or {}).get("test_acc_dense", math.nan))
    for column in ("best_test_acc", "test_acc"):
        if math.isnan(dense) and base:
            dense = _value(_results_row(run, base), column)
    pruned, quant = (_results_row(run, m) for m in SPARSE_MODELS)
    if base and not math.isnan(dense) and (pruned is not None or quant is not None):
        parts = []
        if pruned is not None:
            sparsity = _value(pruned, "weight_sparsity")
            at = f" to {_pct(sparsity)} weight sparsity" if not math.isnan(sparsity) else ""
            parts.append(f"pruning{at} {_change(dense, _value(pruned, 'test_acc'))}")
        if quant is not None:
            parts.append(f"pruning + INT8 quantization-aware training {_change(dense, _value(quant, 'test_acc'))}")
        text = f"Sparsifying the {base} student ({_pct(dense)} dense, PyTorch): " + "; ".join(parts) + "."
        onnx = [f"{m} {_pct(_value(r, 'onnx_test_acc'))}"
                for m, r in ((f"dense {base}", _results_row(run, base)), *zip(SPARSE_MODELS, (pruned, quant)))
                if r is not None and not math.isnan(_value(r, "onnx_test_acc"))]
        if onnx:
            text += f" Exported to ONNX and run in DeepSparse: {', '.join(onnx)}."
        out.append(text)
    bench = run.benchmark
    if run.has_benchmark:
        for batch, rows in bench.groupby("batch_size"):
            fastest = rows.loc[rows["items_per_sec"].idxmax()]
            ref = rows[(rows["model"] == "dense") & (rows["engine"] == "onnxruntime")]
            text = (f"At batch {batch}, **{_label(fastest)}** is fastest: "
                    f"{fastest['items_per_sec']:.0f} images/s (p50 latency {fastest['latency_p50_ms']:.1f} ms")
            if len(ref) and not (fastest["model"] == "dense" and fastest["engine"] == "onnxruntime"):
                r = ref.iloc[0]
                text += (f"), {fastest['items_per_sec'] / r['items_per_sec']:.2f}× dense onnxruntime "
                         f"({r['items_per_sec']:.0f} images/s).")
            else:
                text += ")."
            out.append(text)
        first = bench.iloc[0]
        vnni = str(first.get("vnni", "")).strip().lower() in ("true", "1", "yes")
        cores = f"{int(first['num_cores'])} cores of " if "num_cores" in bench and not pd.isna(
            first["num_cores"]) else ""
        text = f"The benchmark ran on {cores}a CPU with ISA **{first.get('isa', '?')}** "
        text += "and VNNI (INT8 dot products in hardware)." if vnni else \
            "and no VNNI, so DeepSparse emulates INT8 arithmetic."
        out.append(text)
    sentence = overlap_sentence(run)
    if sentence:
        out.append(sentence)
    return out


def run_summary(run: RunData) -> str:
    """A markdown paragraph describing the run (from ``config.json``)."""
    c = run.config
    if not c:
        return f"Run directory `{run.run_dir}` (no config.json)."

    def count(n, full):
        return f"{n:,}" if n else f"all {full:,}"

    return (f"Run directory `{run.run_dir}` · preset **{c.get('preset')}** · {c.get('arch')} teacher "
            f"(students: the same network with `layer3` cut to its first block) · "
            f"{count(c.get('train_subset', 0), 50000)} training / {count(c.get('test_subset', 0), 10000)} "
            f"test images · Adam, batch {c.get('batch_size')}, lr {c.get('lr'):g} (teacher "
            f"{c.get('teacher_lr'):g}) · temperature {c.get('temperature'):g} · stop when test accuracy "
            f"changes by < {c.get('tolerance'):g} for {c.get('patience')} epochs in a row "
            f"(at most {c.get('max_epochs')} student / {c.get('teacher_max_epochs')} teacher epochs).")


def section(available: bool, title: str, text: str = "") -> bool:
    """Display a level-2 heading ``title`` (and the paragraph ``text``) and return True when
    ``available``; otherwise display nothing and return False (the findings say, in one line,
    which stages' outputs are absent)."""
    from IPython.display import Markdown, display

    if not available:
        return False
    display(Markdown(f"## {title}\n\n{text}".strip()))
    return True


def use_print_style() -> None:
    """matplotlib settings for figures that read well on A4/Letter paper: SVG output, 10 pt text."""
    import matplotlib.pyplot as plt

    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("svg")
    except ImportError:  # plain python, no inline backend
        pass
    plt.rcParams.update({
        "figure.figsize": (7.0, 3.6), "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
        "legend.fontsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True,
        "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
        "svg.fonttype": "path", "figure.constrained_layout.use": True,
    })


# ---------------------------------------------------------------------------------------------
# Rendering


_HTML_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block notebook_css -%}
{{ super() }}
<style type="text/css">
  body.jp-Notebook { max-width: 60rem; margin: 0 auto; }
  .jp-OutputArea-output.jp-RenderedHTMLCommon { padding-left: var(--jp-code-padding); }
  .jp-OutputArea-output svg, .jp-OutputArea-output img { max-width: 100%; height: auto; }
  .jp-RenderedHTMLCommon table.report-table { border-collapse: collapse; font-size: 11px; margin: 0.5em 0;
    table-layout: auto; margin-left: 0; }
  table.report-table th, table.report-table td { padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
  table.report-table th { border-bottom: 1px solid #444; white-space: normal; vertical-align: bottom; }
  table.report-table td:first-child, table.report-table td:nth-child(2),
  table.report-table th:first-child, table.report-table th:nth-child(2) { text-align: left; }
  table.report-table tr:nth-child(even) { background: #f3f3f3; }
  @page { size: A4; margin: 12mm 12mm 14mm 12mm; }
  @media print {
    body.jp-Notebook { max-width: none; padding: 0; }
    .jp-Cell { padding: 0; }
    .jp-OutputArea-output, .jp-RenderedHTMLCommon { overflow: visible !important; }
    /* keep a section's heading, text and figure together; keep a heading cell with what follows */
    .jp-Cell-outputWrapper, .jp-OutputArea-child, svg, img, table, tr { break-inside: avoid; }
    .jp-MarkdownCell, h1, h2, h3 { break-after: avoid; }
  }
</style>
{%- endblock notebook_css -%}
"""


def _kernel_manager():
    """A KernelManager for the "python3" kernel that always runs *this* interpreter
    (``sys.executable -m ipykernel_launcher``), whatever kernelspecs the user has installed."""
    from ipykernel.kernelspec import get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            if kernel_name == "python3":
                return KernelSpec(resource_dir="", **get_kernel_dict())
            return super().get_kernel_spec(kernel_name)

    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())


def _cell_name(nb, index: int) -> str:
    cell = nb.cells[index]
    first = next((line for line in cell.source.splitlines() if line.strip()), "")
    return f"cell {index} (id {cell.get('id', '?')!r}: {first.strip()[:60]!r})"


def _check_errors(nb, notebook: Path) -> None:
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                raise ReportError(f"{notebook.name} {_cell_name(nb, index)} raised "
                                  f"{output.get('ename')}: {output.get('evalue')}")


def execute_notebook(notebook: Path, run_dir: Path, timeout: int):
    """Execute ``notebook`` with ``REPORT_RUN_DIR=run_dir`` in a python3 kernel of this interpreter,
    working directory = the notebook's folder. Returns ``(executed nb, kernel argv[0])``.
    Raises ReportError naming the first cell that raised."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(notebook, as_version=4)
    km = _kernel_manager()
    kernel_python = km.kernel_spec.argv[0]
    client = NotebookClient(nb, km=km, timeout=timeout, startup_timeout=120, allow_errors=False,
                            record_timing=False, extra_arguments=["--log-level=ERROR"],
                            resources={"metadata": {"path": str(notebook.parent)}})
    env = dict(os.environ, **{RUN_DIR_ENV: str(run_dir)}, MPLBACKEND="module://matplotlib_inline.backend_inline")
    env.setdefault("NM_DISABLE_ANALYTICS", "1")
    try:
        client.execute(env=env, cleanup_kc=True)  # cleanup_kc: shut the kernel down afterwards
    except CellExecutionError as err:
        _check_errors(nb, notebook)  # names the cell
        raise ReportError(f"{notebook.name}: a cell raised: {str(err).strip().splitlines()[-1]}") from err
    _check_errors(nb, notebook)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    return nb, kernel_python


def to_html(nb, title: str) -> str:
    """nbconvert HTML (lab template) of the executed notebook: code cells and prompts hidden, no
    scripts fetched from the network, print CSS (A4, no page breaks inside figures/tables)."""
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True,
                            extra_loaders=[jinja2.DictLoader({"report.html.j2": _HTML_TEMPLATE})])
    exporter.template_file = "report.html.j2"
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    return body


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH (chromium, chromium-browser, google-chrome) or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def print_pdf(chromium: str, html: Path, pdf: Path, timeout: int = 180) -> Path:
    """Print ``html`` to ``pdf`` with headless Chromium (atomic: temp file, then os.replace).
    Raises ReportError when Chromium fails or writes no PDF."""
    with atomic_output(pdf) as tmp, tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--no-pdf-header-footer", "--print-to-pdf-no-header",
               f"--user-data-dir={profile}", f"--print-to-pdf={tmp}", html.resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ReportError(f"{chromium} did not print {html.name} within {timeout} s") from None
        if proc.returncode != 0 or os.path.getsize(tmp) == 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ReportError(f"{chromium} failed to print {html.name} (exit {proc.returncode}): {tail[0]}")
    return pdf


def render_report(run_dir: str | os.PathLike, *, pdf: bool = True, timeout: int = 600,
                  notebook: str | os.PathLike | None = None) -> dict:
    """Execute the report notebook on ``run_dir`` and write it, as HTML, and as PDF, into ``run_dir``.

    Args:
        run_dir: a study's output directory (``config.json``, ``teacher/``, ``students/``, CSVs).
        pdf: also print ``report.pdf`` with headless Chromium. Without a Chromium binary, one line on
            stderr says why there is no PDF and how to install it; the .ipynb and .html are written.
        timeout: seconds each notebook cell may run.
        notebook: the notebook to execute (default: ``report.ipynb`` next to this file).

    Returns:
        ``{"notebook": Path, "html": Path, "pdf": Path | None, "kernel_python": str,
        "message": str | None}`` (``message``: the no-PDF line, if any).

    Raises:
        ValueError: ``run_dir`` or ``notebook`` does not exist.
        ReportError: a cell raised (the message names the cell), or Chromium failed.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    notebook = Path(notebook).resolve() if notebook is not None else NOTEBOOK
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist; pass the --output-dir of a study run")
    if not notebook.is_file():
        raise ValueError(f"notebook {notebook} does not exist")
    import nbformat

    nb, kernel_python = execute_notebook(notebook, run_dir, timeout)
    paths = {"notebook": run_dir / "report.ipynb", "html": run_dir / "report.html", "pdf": None,
             "kernel_python": kernel_python, "message": None}
    atomic_write_text(paths["notebook"], nbformat.writes(nb))
    atomic_write_text(paths["html"], to_html(nb, f"Study report: {run_dir.name}"))
    if pdf:
        chromium = find_chromium()
        if chromium is None:
            paths["message"] = (f"no PDF: Chromium not found (looked for {', '.join(CHROMIUM_NAMES)}); "
                                f"install it with: {INSTALL_HINT}")
            print(paths["message"], file=sys.stderr)
        else:
            paths["pdf"] = print_pdf(chromium, paths["html"], run_dir / "report.pdf")
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python report.py RUN_DIR [--no-pdf] [--timeout S]``; exit 0 ok, 2 on a report error."""
    parser = argparse.ArgumentParser(description="Execute report.ipynb on a run directory and render "
                                                 "report.ipynb / report.html / report.pdf into it.")
    parser.add_argument("run_dir", help="a study's --output-dir (e.g. runs/smoke)")
    parser.add_argument("--no-pdf", action="store_true", help="skip the PDF (no Chromium needed)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per notebook cell (default: 600)")
    args = parser.parse_args(argv)
    try:
        paths = render_report(args.run_dir, pdf=not args.no_pdf, timeout=args.timeout)
    except (ValueError, ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key in ("notebook", "html", "pdf"):
        if paths[key] is not None:
            print(f"{key}: {paths[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
