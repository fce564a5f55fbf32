"""The study report: load one run directory, execute ``report.ipynb`` on it, render HTML and PDF.

* ``report.data``: ``load_run`` reads only what the run wrote (through ``study.RunLayout``), so
  every number in the report comes from the data;
* ``report.tables``, ``report.charts`` and ``report.findings``: the tables, the benchmark figures
  and the sentences the notebook shows;
* ``report.render``: ``render_report(run_dir)`` executes the notebook with nbclient (kernel: this
  interpreter) and writes ``report.ipynb``, ``report.html`` and ``report.pdf`` into the run.

Usage: ``python -m report RUN_DIR`` (re-render an existing run); ``orchestrate.py --report`` /
``--report-only`` call ``render_report``. The notebook does ``import report`` and uses the names
below.
"""

from report.charts import pareto_chart, speed_chart, use_print_style
from report.data import (LOSS_COLUMNS, MODELS, SETUPS, SPARSE_MODELS, RunData, base_seed, load_result_grid, load_run, stop_epoch,
                         trial_label)
from report.findings import compression_verdict, fastest_model, findings, pareto_front, run_summary
from report.render import ReportError, main, render_report
from report.tables import (accuracy_note, accuracy_table, benchmark_frame, benchmark_table, engine_versions,
                           overlap_sentence, section, setups_table, show_table, sparse_table, student_overlap, sweep_curves, variant_seeds)

__all__ = ["LOSS_COLUMNS", "MODELS", "SETUPS", "SPARSE_MODELS", "ReportError", "RunData", "load_result_grid", "load_run",
           "stop_epoch", "trial_label", "base_seed", "setups_table", "sparse_table", "accuracy_table", "accuracy_note", "show_table", "benchmark_frame",
           "benchmark_table", "engine_versions", "pareto_chart", "speed_chart", "pareto_front", "compression_verdict", "student_overlap", "overlap_sentence", "fastest_model", "findings",
           "run_summary", "section", "sweep_curves", "variant_seeds", "use_print_style", "render_report", "main"]
