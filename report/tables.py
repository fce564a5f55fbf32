"""Tables and one-line summaries the report notebook shows, computed from a ``RunData``."""

from __future__ import annotations

import math

from bench.engines import BASELINE_ENGINE, ENGINE_INFO
from report.data import (MODELS, SETUPS, SPARSE_MODELS, RunData, _base_setup, _describe, _results_row, _value,
                         base_seed, is_compressed)
from study import ONNX_MODELS


def accuracy_table(run: RunData):
    """The accuracy table, one row per model (and seed) in ``MODELS`` order (then any other models).

    Columns: model, seed (runs with several seeds), trained with (loss terms; for the sparse models
    the student they start from), params (M), epochs, test acc (stop) / best test acc (at the best
    epoch by the run's selection metric) / val acc (best epoch; with a validation split) / ONNX test
    acc (fractions 0..1 as strings with 4 decimals), weight sparsity (%), time (s: training or
    recipe wall time); empty cells where a value does not apply, empty columns dropped. From
    ``results.csv``; without it, from the Tune trials."""
    import pandas as pd

    if run.results is not None:
        frame = run.results.copy()
    else:
        frame = pd.DataFrame([{"model": label, "test_acc": t["test_acc"].iloc[-1],
                               "best_test_acc": t["test_acc"].max(), "epochs": len(t),
                               "seconds": t["epoch_seconds"].sum()} for label, t in run.trials.items()])
    order = {m: i for i, m in enumerate(MODELS)}
    frame = frame.assign(_o=frame["model"].map(lambda m: order.get(m, len(order)))).sort_values("_o", kind="stable")
    show_seed = run.seeds > 1 and "seed" in frame

    def fmt(value, spec):
        return "" if value is None or pd.isna(value) else format(value, spec)

    rows = []
    for _, r in frame.iterrows():
        get = lambda c: r[c] if c in r.index else None  # noqa: E731
        params = get("params")
        rows.append({
            "model": r["model"], **({"seed": fmt(get("seed"), ".0f")} if show_seed else {}),
            **{name: fmt(get(name), "g") for name in run.swept if name in frame},  # --sweep: the variant
            "trained with": _describe(run, r["model"]),
            "params (M)": fmt(None if params is None or pd.isna(params) else params / 1e6, ".2f"),
            "epochs": fmt(get("epochs"), "g"),
            "test acc (stop)": fmt(get("test_acc"), ".4f"),
            "best test acc": fmt(get("best_test_acc"), ".4f"),
            "val acc (best epoch)": fmt(get("best_val_acc"), ".4f"),
            f"ONNX test acc ({run.onnx_accuracy_engine})": fmt(get("onnx_test_acc"), ".4f"),
            "weight sparsity (%)": fmt(None if get("weight_sparsity") is None or pd.isna(get("weight_sparsity"))
                                       else 100 * get("weight_sparsity"), ".1f"),
            "time (s)": fmt(get("seconds"), ".0f"),
        })
    table = pd.DataFrame(rows)
    empty = [c for c in table.columns if (table[c] == "").all()]
    return table.drop(columns=empty)


def accuracy_note(table, run: RunData | None = None) -> str:
    """The sentence under the accuracy table, naming only the columns ``table`` has (and, given
    the ``run``, the metric that picked each trial's best epoch)."""
    by = "" if run is None else f" (by {'validation' if run.metric == 'val_acc' else 'test'} accuracy)"
    where = ["at the stop epoch", f"at the best epoch{by}"]
    onnx = next((c for c in table.columns if c.startswith("ONNX test acc (")), None)
    if onnx:
        where.append(f"of the exported ONNX model run in {onnx[len('ONNX test acc ('):-1]}")
    text = ("Test accuracy as a fraction of the test images (0–1): " + ", ".join(where[:-1])
            + f" and {where[-1]}.")
    if "val acc (best epoch)" in table:
        text += (" Val acc: accuracy on the held-out validation images at the best epoch, the number the "
                 "stop rule and every choice read; test accuracy is only reported.")
    if "weight sparsity (%)" in table:
        text += " Weight sparsity: share of zero weights in the conv and linear layers."
    sparse_time = "time (s)" in table and (table.loc[table["model"].isin(SPARSE_MODELS), "time (s)"] != "").any()
    if "time (s)" in table:
        text += " Time: wall-clock seconds of training" + (
            " (for the sparse models: of the recipe)." if sparse_time else ".")
    return text


def setups_table(run: RunData):
    """``setups.csv`` as strings for display: setup, seeds, test acc mean ± std, 95 % CI (Student
    t), val acc mean (with a validation split), Welch p vs the winner; accuracies in %. None
    without ``setups.csv``."""
    import pandas as pd

    if run.setups is None:
        return None

    def pct(v, spec=".1f"):
        return "" if v is None or pd.isna(v) else format(100 * v, spec)

    from driver.stats import table_key

    s = run.setups
    key = table_key(s)
    table = pd.DataFrame({
        key: s[key], "seeds": s["seeds"].astype(int).astype(str),
        "test acc mean (%)": [pct(m) + ("" if pd.isna(d) else f" ± {pct(d)}") for m, d in
                              zip(s["test_acc_mean"], s["test_acc_std"])],
        "95 % CI (%)": [("" if pd.isna(lo) else f"{pct(lo)} – {pct(hi)}")
                        for lo, hi in zip(s["ci95_low"], s["ci95_high"])],
        "val acc mean (%)": s["val_acc_mean"].map(pct) if "val_acc_mean" in s else "",
        "Welch p vs winner": s["welch_p_vs_winner"].map(lambda p: "" if pd.isna(p) else f"{p:.3g}"),
    })
    empty = [c for c in table.columns if (table[c] == "").all()]
    return table.drop(columns=empty)


def variant_seeds(run: RunData, row) -> "Any":
    """The kept checkpoints' test accuracies (``best_test_acc``, 0..1) of the seeds of one row of
    ``run.setups`` (a setup, or a variant: its setup and swept values), from ``results.csv``."""
    r = run.results
    if r is None:
        return []
    mask = r["model"] == row["setup"]
    for name in run.swept:
        if name in r:
            mask &= r[name] == row[name]
    return r.loc[mask, "best_test_acc"]


def sweep_curves(run: RunData) -> dict:
    """For each swept field (``--sweep``): ``{setup: DataFrame(value, mean, low, high)}``, the
    test accuracy (0..1) mean over seeds and its 95 % Student-t interval against the field's value,
    one curve per setup; a setup with several swept fields has the other fields' values in the
    curve's name (``"kd lr=0.001"``); curves in setups order. ``{}`` without a sweep or a variants table."""
    import pandas as pd

    s = run.setups
    if not run.swept or s is None or "variant" not in s:
        return {}
    out = {}
    for name in run.swept:
        others = [f for f in run.swept if f != name]
        curves = {}
        order = {setup: i for i, setup in enumerate(run.config.get("setups") or [])}
        in_grid = s.assign(_order=s["setup"].map(lambda v: order.get(v, len(order)))).sort_values("_order",
                                                                                                 kind="stable")
        for keys, group in in_grid.groupby(["setup", *others], sort=False):
            keys = keys if isinstance(keys, tuple) else (keys,)
            label = " ".join([str(keys[0]), *(f"{f}={v:g}" if isinstance(v, float) else f"{f}={v}"
                                              for f, v in zip(others, keys[1:]))])
            g = group.sort_values(name)
            curves[label] = pd.DataFrame({"value": g[name].to_numpy(), "mean": g["test_acc_mean"].to_numpy(),
                                          "low": g["ci95_low"].to_numpy(), "high": g["ci95_high"].to_numpy()})
        out[name] = curves
    return out


def sparse_table(run: RunData):
    """The compressed models (every sparsity and structured target's, ``results.csv`` order) next to
    their dense parent (the trial the sparsify stage started from): model, from, test acc (PyTorch, %), change vs the dense parent (percentage points),
    ONNX test acc (%, ``RunData.onnx_accuracy_engine``), weight sparsity (%). None without sparse rows."""
    import pandas as pd

    base, seed = _base_setup(run), base_seed(run)
    compressed = [] if run.results is None else [m for m in run.results["model"] if is_compressed(m)]
    sparse = [(m, _results_row(run, m)) for m in dict.fromkeys(compressed)]
    if not base or all(row is None for _, row in sparse):
        return None
    parent = _results_row(run, base, seed)
    dense = float((run.sparsify_summary or {}).get("test_acc_dense", _value(parent, "best_test_acc")))
    label = base if seed is None or run.seeds <= 1 else f"{base} s{seed}"

    def pct(v):
        return "" if v is None or math.isnan(v) else f"{100 * v:.1f}"

    rows = [{"model": f"dense {label} (best epoch)", "from": "", "test acc (%)": pct(dense), "vs dense (pp)": "",
             "ONNX test acc (%)": pct(_value(parent, "onnx_test_acc")), "weight sparsity (%)": ""}]
    for model, row in sparse:
        if row is not None:
            acc = _value(row, "test_acc")
            rows.append({"model": model, "from": label, "test acc (%)": pct(acc),
                         "vs dense (pp)": "" if math.isnan(acc) else f"{100 * (acc - dense):+.1f}",
                         "ONNX test acc (%)": pct(_value(row, "onnx_test_acc")),
                         "weight sparsity (%)": pct(_value(row, "weight_sparsity"))})
    table = pd.DataFrame(rows)
    return table.drop(columns=[c for c in table.columns if (table[c] == "").all()])


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


def model_order(model: str) -> tuple:
    """Sort key of a benchmark model: ``dense``, ``dense_int8``, then by sparsity target (the tag's
    percent; the untagged target, the recipe's own, as 80), its models in ``SPARSE_MODELS`` order
    (pruned, pruned_quantized, pruned_quantized_qdq); then the structured targets by channel ratio
    (``structured_c<percent>``, then its ``_int8``)."""
    import re

    if model in ("dense", "dense_int8"):
        return (0.0, ("dense", "dense_int8").index(model))
    structured = re.match(r"^structured_c(\d+)(?:p(\d+))?(_int8)?$", str(model))
    if structured:
        return (1000.0 + float(f"{structured.group(1)}.{structured.group(2) or 0}"), int(bool(structured.group(3))))
    m = re.match(rf"^({'|'.join(SPARSE_MODELS)})(?:_s(\d+)(?:p(\d+))?)?$", str(model))
    if not m:
        return (1e9, 0)
    percent = float(f"{m.group(2)}.{m.group(3) or 0}") if m.group(2) else 80.0
    return (percent, SPARSE_MODELS.index(m.group(1)))


def bench_order(model: str, engine: str) -> tuple:
    """Sort key of a benchmark row: ``model_order``, then ``Engine.display_order``."""
    info = ENGINE_INFO.get(engine)
    return (*model_order(model), info.display_order if info else len(ENGINE_INFO))


#: Rows of the benchmark table for the untagged models (``study.ONNX_MODELS`` and ``dense_int8``):
#: their ``bench_order`` rank.
_BENCH_ORDER = {key: rank for rank, key in enumerate(sorted(
    ((model, engine) for model in (*ONNX_MODELS, "dense_int8") for engine in ENGINE_INFO),
    key=lambda k: bench_order(*k)))}


def benchmark_frame(run: RunData):
    """``benchmark.csv`` sorted (batch size, then ``bench_order``: dense, dense_int8, each target's
    ``SPARSE_MODELS``, engines in display order)
    with ``name`` ("model (engine)" on two lines), ``speedup`` (items_per_sec / that of dense on
    onnxruntime at the same batch size; NaN without that baseline) and ``speed_label`` (bar text)."""
    import pandas as pd

    b = run.benchmark.copy()
    b["_o"] = [bench_order(m, e) for m, e in zip(b["model"], b["engine"])]
    b = b.sort_values(["batch_size", "_o", "model", "engine"]).drop(columns="_o").reset_index(drop=True)
    b["name"] = b["model"] + "\n(" + b["engine"] + ")"
    ref = b[(b["model"] == "dense") & (b["engine"] == BASELINE_ENGINE)].set_index("batch_size")["items_per_sec"]
    b["speedup"] = b["items_per_sec"] / b["batch_size"].map(ref)
    b["speed_label"] = [f"{ips:.0f}" + ("" if pd.isna(s) else f" ({s:.2f}×)")
                        for ips, s in zip(b["items_per_sec"], b["speedup"])]
    return b


def benchmark_table(run: RunData):
    """``benchmark.csv`` as a table of strings for display (throughput images/s, latencies ms).
    The engine version that ran each row (runs whose benchmark.csv records it) is a column only
    when one engine ran in several versions; otherwise ``engine_versions`` names them once."""
    import pandas as pd

    b = benchmark_frame(run)
    table = pd.DataFrame({
        "model": b["model"], "engine": b["engine"], "batch": b["batch_size"].astype(str),
        "cores": b["num_cores"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}") if "num_cores" in b else "",
        "accuracy": b["accuracy"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}") if "accuracy" in b else "",
        "MB (gzip)": [("" if pd.isna(r) else f"{r / 1e6:.1f} ({g / 1e6:.1f})") for r, g in
                      zip(b["size_bytes"], b["size_gzip_bytes"])] if "size_bytes" in b else "",
        # with the precision OpenVINO ran its layers in, read back from the compiled model (docs/outputs.md)
        "graph (ran as)": [g if not p else f"{g} ({p})" for g, p in
                           b.reindex(columns=["graph", "precision"]).fillna("").itertuples(index=False)],
        "images/s": b["items_per_sec"].map("{:.1f}".format),
        f"vs dense {BASELINE_ENGINE}": b["speedup"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}×"),
        "mean (ms)": b["latency_mean_ms"].map("{:.1f}".format),
        "p50 (ms)": b["latency_p50_ms"].map("{:.1f}".format),
        "p99 (ms)": b["latency_p99_ms"].map("{:.1f}".format),
    })
    if "engine_version" in b and not engine_versions(run):
        table["engine version"] = b["engine_version"].fillna("")
    return table


def engine_versions(run: RunData) -> str:
    """The engine versions of ``benchmark.csv`` as one phrase, one per engine in display order
    (``"onnxruntime 1.19.2; deepsparse 1.7.0; openvino 2026.4.1"``); ``""`` when the run did
    not record them, or when an engine ran in more than one version (the table then has a column)."""
    b = run.benchmark
    if b is None or "engine_version" not in b:
        return ""
    versions = b.dropna(subset=["engine_version"]).groupby("engine", sort=False)["engine_version"].unique()
    if not len(versions) or any(len(v) > 1 for v in versions):
        return ""
    order = sorted(versions.index, key=lambda e: bench_order("dense", e))
    return "; ".join(versions[engine][0] for engine in order)


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
    """Display a level-2 heading ``title`` (and the plain-text paragraph ``text``) and return True
    when ``available``; otherwise display nothing and return False (the findings say, in one line,
    which stages' outputs are absent). One output with text/markdown and text/html; the HTML is
    a ``<div class="keep-with-next">``, which the report's print CSS keeps on the page of the
    figure that follows."""
    from html import escape

    from IPython.display import display

    if not available:
        return False
    markdown = f"## {title}\n\n{text}".strip()
    html = f'<div class="keep-with-next"><h2>{escape(title)}</h2>' + (f"<p>{escape(text)}</p>" if text else "") + "</div>"
    display({"text/markdown": markdown, "text/html": html, "text/plain": markdown}, raw=True)
    return True
