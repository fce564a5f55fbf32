"""Tables and one-line summaries the report notebook shows, computed from a ``RunData``."""

from __future__ import annotations

from report.data import MODELS, SETUPS, SPARSE_MODELS, RunData, _describe


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
