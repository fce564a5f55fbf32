"""The report's benchmark figures and table on A4, from a made-up benchmark.csv of 12 or 24 rows
per batch size (the smoke run's four models, or eight with more sparsity targets)."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib
import pytest

import report
from bench.engines import ENGINE_INFO
from report.charts import MAX_FIGURE_INCHES
from report.data import RunData

matplotlib.use("Agg")

FOUR = ("dense", "dense_int8", "pruned", "pruned_quantized")
EIGHT = (*FOUR, "pruned_s50", "pruned_quantized_s50", "pruned_s90", "pruned_quantized_s90")
ENGINES = ("onnxruntime", "deepsparse", "openvino")


def _run(models, sizes=(1, 32), versions=None) -> RunData:
    """A RunData whose benchmark.csv has one row per (batch size, model, engine); throughputs
    and accuracies vary by row (images/s 50..., accuracy 0.10...)."""
    import pandas as pd

    rows = []
    for i, (size, model, engine) in enumerate(itertools.product(sizes, models, ENGINES)):
        ips = 50.0 + 37 * (i % 11)
        rows.append({"model": model, "engine": engine, "batch_size": size, "num_cores": 2, "items_per_sec": ips,
                     "latency_mean_ms": 1e3 * size / ips, "latency_p50_ms": 1e3 * size / ips,
                     "latency_p99_ms": 1.2e3 * size / ips, "accuracy": 0.10 + 0.01 * (i % 7),
                     "size_bytes": 4e7, "size_gzip_bytes": 3e7, "graph": "FP32", "status": "ok", "error": "",
                     "engine_version": (versions or {}).get(engine, f"{engine} 1.0")})
    return RunData(run_dir=Path("."), config={}, benchmark=pd.DataFrame(rows))


def _overlaps(boxes) -> list:
    """Pairs of matplotlib Bboxes that intersect (by more than half a pixel)."""
    return [(a, b) for a, b in itertools.combinations(boxes, 2)
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5]


@pytest.mark.parametrize("models", [FOUR, EIGHT], ids=["12-rows", "24-rows"])
def test_speed_chart_labels_do_not_overlap(models):
    """One figure per batch size, as tall as its rows need and at most MAX_FIGURE_INCHES; its
    two-line row labels ("model" over "(engine)") do not overlap one another."""
    run = _run(models)
    fig = report.speed_chart(run, 32)
    fig.canvas.draw()
    labels = fig.axes[0].get_yticklabels()
    assert [t.get_text() for t in labels] == [f"{m}\n({e})" for m in sorted(models, key=report.tables.model_order)
                                              for e in ENGINES]
    assert fig.get_size_inches()[1] <= MAX_FIGURE_INCHES
    renderer = fig.canvas.get_renderer()
    assert _overlaps([t.get_window_extent(renderer) for t in labels]) == []


@pytest.mark.parametrize("models", [FOUR, EIGHT], ids=["4-models", "8-models"])
def test_pareto_chart_names_points_in_a_legend_not_on_the_points(models):
    """The Pareto chart writes no text next to its points (labels that overlapped): colour names
    the model and marker the engine, in one legend; one panel per batch size, each fully drawn."""
    run = _run(models)
    fig = report.pareto_chart(run)
    assert [ax.get_title() for ax in fig.axes] == ["batch 1", "batch 32"]
    assert [len(ax.texts) for ax in fig.axes] == [0, 0]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [*sorted(models, key=report.tables.model_order),
                                                           *(f"on {e}" for e in ENGINE_INFO), "Pareto front (ringed)"]
    assert fig.get_size_inches()[1] <= MAX_FIGURE_INCHES
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert _overlaps([ax.get_tightbbox(renderer) for ax in fig.axes] + [legend.get_window_extent(renderer)]) == []


def test_engine_versions_in_one_phrase_or_a_column():
    """One version per engine: named once (display order), no column; an engine in two
    versions: the table keeps its per-row column."""
    run = _run(FOUR, sizes=(1,))
    assert report.engine_versions(run) == "onnxruntime 1.0; deepsparse 1.0; openvino 1.0"
    assert "engine version" not in report.benchmark_table(run)
    run.benchmark.loc[0, "engine_version"] = "onnxruntime 2.0"
    assert report.engine_versions(run) == ""
    assert report.benchmark_table(run)["engine version"].iloc[0] == "onnxruntime 2.0"


def test_the_benchmark_table_says_which_precision_openvino_ran():
    """The graph cell carries OpenVINO's read-back precision (``benchmark.csv`` ``precision``);
    rows without one (DeepSparse, onnxruntime, runs made before the column) show the graph alone."""
    run = _run(FOUR, sizes=(1,))
    run.benchmark["precision"] = [{"openvino": "u8"}.get(engine, "") for engine in run.benchmark["engine"]]
    table = report.benchmark_table(run).set_index("engine")
    assert set(table.loc["openvino", "graph (ran as)"]) == {"FP32 (u8)"}
    assert set(table.loc["onnxruntime", "graph (ran as)"]) == {"FP32"}
    assert set(report.benchmark_table(_run(FOUR, sizes=(1,)))["graph (ran as)"]) == {"FP32"}
