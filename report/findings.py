"""The report's findings: sentences written from the numbers of one run."""

from __future__ import annotations

import math

from bench.engines import BASELINE_ENGINE
from report.data import (SETUP_INFO, SETUPS, SPARSE_MODELS, RunData, _base_setup, _results_row, _value, base_seed,
                         is_compressed)
from report.tables import overlap_sentence
from study import decision_rule
from study.config import variant_label


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


def fastest_model(bench, batch_size: int, markdown: bool = False) -> str:
    """One sentence naming the highest-throughput (model, engine) of ``bench`` (a
    ``benchmark.csv`` frame) at ``batch_size``: its images/s, p50 latency (ms) and its ratio to
    dense onnxruntime, the baseline a user would otherwise deploy (when that row exists).
    ``markdown`` sets the winner in bold. Rows whose benchmark failed (``status`` "error", no
    measurement) are left out. Raises ValueError when no measured row has that batch size."""
    rows = bench[(bench["batch_size"] == batch_size) & bench["items_per_sec"].notna()]  # failed rows: NaN
    if not len(rows):
        raise ValueError(f"no benchmark rows at batch {batch_size}")
    fastest = rows.loc[rows["items_per_sec"].idxmax()]
    name = f"{fastest['model']} on {fastest['engine']}"
    text = (f"At batch {batch_size}, {f'**{name}**' if markdown else name} is fastest: "
            f"{fastest['items_per_sec']:.0f} images/s (p50 latency {fastest['latency_p50_ms']:.1f} ms")
    ref = rows[(rows["model"] == "dense") & (rows["engine"] == BASELINE_ENGINE)]
    if len(ref) and not (fastest["model"] == "dense" and fastest["engine"] == BASELINE_ENGINE):
        r = ref.iloc[0]
        return text + (f"), {fastest['items_per_sec'] / r['items_per_sec']:.2f}× dense {BASELINE_ENGINE} "
                       f"({r['items_per_sec']:.0f} images/s).")
    return text + ")."


def pareto_front(speed, accuracy):
    """Which points are on the Pareto front of (``speed``, ``accuracy``), both to be maximized:
    a point is on it unless another is at least as fast and at least as accurate, and strictly
    better in one. NaN points are never on it. Returns a numpy bool array (same order as given)."""
    import numpy as np

    x, y = np.asarray(speed, dtype=float), np.asarray(accuracy, dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    dominated = ((x[None, :] >= x[:, None]) & (y[None, :] >= y[:, None])
                 & ((x[None, :] > x[:, None]) | (y[None, :] > y[:, None])) & ok[None, :]).any(axis=1)
    return ok & ~dominated


#: the accuracy a compressed model may lose against its dense parent and still count as "as good"
WITHIN = 0.01


def compression_verdict(bench, batch_size: int, markdown: bool = False) -> list[str]:
    """Sentences on whether compression paid off at ``batch_size``, from ``benchmark.csv`` rows
    (``accuracy``, ``items_per_sec`` per model and engine; failed rows left out):

    * the fastest (model, engine) whose test accuracy in that engine is within 1 point (``WITHIN``)
      of its dense parent's (``dense`` on the same engine), its images/s, and its speed-up over the
      best dense INT8 peer (the fastest ``dense_int8`` row) and over dense ``BASELINE_ENGINE``;
    * one sentence per compressed model (``pruned*``, ``structured*``) whose fastest row is slower than the best
      ``dense_int8`` row and no more accurate than it: it loses to PTQ.

    Empty when the frame has no ``accuracy`` column or no measured row at that batch size."""
    if "accuracy" not in bench:
        return []
    rows = bench[(bench["batch_size"] == batch_size) & bench["items_per_sec"].notna()]
    if not len(rows):
        return []
    bold = (lambda t: f"**{t}**") if markdown else (lambda t: t)
    dense = rows[rows["model"] == "dense"].set_index("engine")["accuracy"]
    parent = rows["engine"].map(dense)
    good = rows[rows["accuracy"].notna() & parent.notna() & (rows["accuracy"] >= parent - WITHIN - 1e-12)]
    ptq = rows[rows["model"] == "dense_int8"]
    best_ptq = ptq.loc[ptq["items_per_sec"].idxmax()] if len(ptq) else None
    out = []
    if len(good):
        win = good.loc[good["items_per_sec"].idxmax()]
        text = (f"At batch {batch_size}, the fastest model within {100 * WITHIN:.0f} point of its dense parent's "
                f"accuracy is {bold(f'{win.model} on {win.engine}')}: {win.items_per_sec:.0f} images/s, accuracy "
                f"{win.accuracy:.3f} (dense on {win.engine}: {dense[win.engine]:.3f})")
        if best_ptq is not None and win.model == "dense_int8":
            text += " (the dense INT8 peer itself: post-training quantization, no retraining)"
        elif best_ptq is not None:
            text += (f", {win.items_per_sec / best_ptq.items_per_sec:.2f}× the best dense INT8 peer "
                     f"(dense_int8 on {best_ptq.engine}, {best_ptq.items_per_sec:.0f} images/s)")
        ref = rows[(rows["model"] == "dense") & (rows["engine"] == BASELINE_ENGINE)]
        if len(ref) and not (win.model == "dense" and win.engine == BASELINE_ENGINE):
            text += f" and {win.items_per_sec / ref.iloc[0].items_per_sec:.2f}× dense {BASELINE_ENGINE}"
        out.append(text + ".")
    else:
        out.append(f"At batch {batch_size}, no model kept its dense parent's accuracy within "
                   f"{100 * WITHIN:.0f} point (or none has an accuracy).")
    if best_ptq is not None:
        for model in dict.fromkeys(m for m in rows["model"] if is_compressed(m)):
            mine = rows[rows["model"] == model]
            top = mine.loc[mine["items_per_sec"].idxmax()]
            more_accurate = top.accuracy > best_ptq.accuracy if not (
                math.isnan(top.accuracy) or math.isnan(best_ptq.accuracy)) else False
            if top.items_per_sec < best_ptq.items_per_sec and not more_accurate:
                out.append(f"At batch {batch_size}, {bold(model)} loses to post-training quantization: at best "
                           f"{top.items_per_sec:.0f} images/s ({top.engine}, accuracy {top.accuracy:.3f}) against "
                           f"{best_ptq.items_per_sec:.0f} for dense_int8 on {best_ptq.engine} (accuracy "
                           f"{best_ptq.accuracy:.3f}), with no retraining.")
    return out


def _winner_one_run(run: RunData) -> str | None:
    """The winner sentence of a run without ``setups.csv`` (one trial per setup)."""
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
        return text
    return None


#: The recipe's loss (``sparsify/summary.json`` ``loss``, ``--sparsify-loss``) in words.
RECIPE_LOSS_WORDS = {setup: info.words for setup, info in SETUP_INFO.items()}


def findings(run: RunData) -> list[str]:
    """A few sentences, written from the numbers: which student setup won and by how much, what
    sparsification cost in accuracy, which model is fastest per batch size (and the factor vs dense
    onnxruntime), the CPU's ISA, whether the student trials overlapped in time; plus ``notes``."""
    import pandas as pd

    out = list(run.notes)
    # setups.csv (every run since --seeds): the winner by mean over seeds and the test of its lead
    text = _winner_over_seeds(run) if run.setups is not None else _winner_one_run(run)
    if text:
        out.append(text)
    base, seed = _base_setup(run), base_seed(run)
    variant = (run.sparsify_summary or {}).get("variant") or {}  # the winner's swept values (--sweep)
    # The dense starting point: the checkpoint the sparsify stage loaded (summary.json), else the
    # base setup's best epoch (that is the checkpoint the study keeps).
    dense = float((run.sparsify_summary or {}).get("test_acc_dense", math.nan))
    for column in ("best_test_acc", "test_acc"):
        if math.isnan(dense) and base:
            dense = _value(_results_row(run, base, seed, variant), column)
    rows = {m: _results_row(run, m) for m in SPARSE_MODELS}
    pruned, quant = rows["pruned"], rows["pruned_quantized"]  # the QDQ export shares quant's torch numbers
    if base and not math.isnan(dense) and (pruned is not None or quant is not None):
        parts = []
        if pruned is not None:
            sparsity = _value(pruned, "weight_sparsity")
            at = f" to {_pct(sparsity)} weight sparsity" if not math.isnan(sparsity) else ""
            parts.append(f"pruning{at} {_change(dense, _value(pruned, 'test_acc'))}")
        if quant is not None:
            parts.append(f"pruning + INT8 quantization-aware training {_change(dense, _value(quant, 'test_acc'))}")
        which = f"{variant_label(base, variant)} student" + ("" if seed is None or run.seeds <= 1 else f" (seed {seed}, its best seed)")
        # no "loss" key: a run from before --sparsify-loss, whose recipe trained with cross-entropy
        loss = run.sparsify_summary.get("loss", "ce") if run.sparsify_summary else None
        trained = f", fine-tuned with {RECIPE_LOSS_WORDS.get(loss, loss)}" if loss else ""
        text = f"Sparsifying the {which} ({_pct(dense)} dense, PyTorch{trained}): " + "; ".join(parts) + "."
        onnx = [f"{m} {_pct(_value(r, 'onnx_test_acc'))}"
                for m, r in ((f"dense {base}", _results_row(run, base, seed, variant)), *rows.items())
                if r is not None and not math.isnan(_value(r, "onnx_test_acc"))]
        if onnx:
            text += f" Exported to ONNX and run in {run.onnx_accuracy_engine}: {', '.join(onnx)}."
        out.append(text)
    bench = run.benchmark
    if run.has_benchmark:
        for batch in sorted(bench["batch_size"].unique()):
            out.append(fastest_model(bench, int(batch), markdown=True))
            out.extend(compression_verdict(bench, int(batch), markdown=True))
        first = bench.iloc[0]
        vnni = str(first.get("vnni", "")).strip().lower() in ("true", "1", "yes")
        cores = f"{int(first['num_cores'])} cores of " if "num_cores" in bench and not pd.isna(
            first["num_cores"]) else ""
        text = f"The benchmark ran on {cores}a CPU with ISA **{first.get('isa', '?')}** "
        text += "and VNNI (INT8 dot products in hardware)" if vnni else \
            "and no VNNI, so DeepSparse emulates INT8 arithmetic"
        amx = first.get("amx")
        text += f", AMX {amx}." if isinstance(amx, str) and amx else ", no AMX."
        out.append(text)
    sentence = overlap_sentence(run)
    if sentence:
        out.append(sentence)
    return out


def _winner_over_seeds(run: RunData) -> str:
    """The winner sentence of a run with ``setups.csv`` (``driver.stats.lead_sentence``), with
    the teacher's best-epoch test accuracy for comparison."""
    from driver.stats import lead, lead_sentence, table_key

    text = lead_sentence(run.setups, run.metric)
    info = lead(run.setups, run.metric)
    key = table_key(run.setups)
    best = info["winner"] if info else run.setups[key].iloc[0]
    top = float(run.setups.set_index(key).loc[best, "test_acc_mean"])
    best = run.setups.set_index(key).loc[best, "setup"] if key == "variant" else best
    t_acc = _value(_results_row(run, "teacher"), "best_test_acc")
    if not math.isnan(t_acc):
        side = "above" if top > t_acc else "below" if top < t_acc else "level with"
        gap = "" if top == t_acc else f"{_pp(top - t_acc)} "
        text += f" The teacher reached {_pct(t_acc)} at its best epoch; the winner's mean is {gap}{side} it"
        student_params, t_params = _value(_results_row(run, best), "params"), _value(_results_row(run, "teacher"),
                                                                                     "params")
        if t_params > 0 and not math.isnan(student_params):
            text += f" with {100 * student_params / t_params:.0f} % of the teacher's parameters"
        text += "."
    return text


def run_summary(run: RunData) -> str:
    """A markdown paragraph describing the run (from ``config.json``)."""
    c = run.config
    if not c:
        return f"Run directory `{run.run_dir}` (no config.json)."

    def count(n, full):
        return f"{n:,}" if n else f"all {full:,}"

    held = f" ({c['val_size']:,} of them held out for validation)" if c.get("val_size") else ""
    first = int(c.get("seed", 0))
    seeds = (f"seed {first}" if run.seeds == 1 else
             f"{run.seeds} seeds per setup ({first}..{first + run.seeds - 1}), each its own trial")

    return (f"Run directory `{run.run_dir}` · preset **{c.get('preset')}** · {c.get('arch')} teacher "
            f"(students: the same network with `layer3` cut to its first block) · "
            f"{count(c.get('train_subset', 0), 50000)} training{held} / {count(c.get('test_subset', 0), 10000)} "
            f"test images · Adam, batch {c.get('batch_size')}, lr {c.get('lr'):g} (teacher "
            f"{c.get('teacher_lr'):g}) · temperature {c.get('temperature'):g} · stop when "
            f"{'validation' if run.metric == 'val_acc' else 'test'} accuracy "
            f"changes by < {c.get('tolerance'):g} for {c.get('patience')} epochs in a row "
            f"(at most {c.get('max_epochs')} student / {c.get('teacher_max_epochs')} teacher epochs) · "
            f"{seeds} · **{decision_rule(c, capital=True)}**.")
