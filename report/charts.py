"""The report's benchmark figures and print style, sized for an A4 page (7 in wide, 186 mm at the
report's margins): each figure's height grows with the number of rows it draws."""

from __future__ import annotations

from bench.engines import ENGINE_INFO
from report.data import RunData
from report.tables import benchmark_frame, model_order

#: Inches of figure height per bar of the speed chart: its two-line labels ("model" over
#: "(engine)") at 8 pt take about 0.26 in.
SPEED_ROW_INCHES = 0.30
#: Inches of figure height for one batch size's panel of the Pareto chart (less when many batch
#: sizes must share one page).
PARETO_PANEL_INCHES = 2.8
#: The most a figure may be tall, in inches: an A4 page's text height at the report's margins is
#: about 10.7 in, less a section's heading and paragraph (about 1.3 in), which stay on its page.
MAX_FIGURE_INCHES = 9.0
_MARKERS = dict(zip(ENGINE_INFO, "osD^v"))


def speed_chart(run: RunData, batch_size: int):
    """Throughput (images/s, bars labelled with the speed-up over dense onnxruntime) and latency
    per batch call (p50 and p99, ms) of every (model, engine) of ``benchmark.csv`` at
    ``batch_size``, one row each in ``benchmark_frame`` order; ``SPEED_ROW_INCHES`` of height per
    row, less (and smaller labels) when the rows would pass ``MAX_FIGURE_INCHES``. Returns the
    matplotlib Figure (two axes: throughput, latency)."""
    import matplotlib.pyplot as plt

    b = benchmark_frame(run)
    d = b[b["batch_size"] == batch_size].reset_index(drop=True)
    row = min(SPEED_ROW_INCHES, (MAX_FIGURE_INCHES - 1.1) / max(1, len(d)))
    font = 8 * row / SPEED_ROW_INCHES  # points
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(7.0, 1.1 + row * len(d)), sharey=True, width_ratios=(3, 2),
                                     layout="constrained")
    y = list(range(len(d)))
    colors = d["engine"].map({"onnxruntime": "tab:gray"}).fillna("tab:blue")
    bars = ax_t.barh(y, d["items_per_sec"], color=colors)
    ax_t.bar_label(bars, labels=d["speed_label"], padding=2, fontsize=font - 1)
    ax_t.set_yticks(y, d["name"], fontsize=font)
    ax_t.set(title=f"Throughput, batch {batch_size}", xlabel="images / s",
             xlim=(0, 1.45 * d["items_per_sec"].max()))
    for offset, column, shade in ((-0.2, "latency_p50_ms", "tab:green"), (0.2, "latency_p99_ms", "darkgreen")):
        bars = ax_l.barh([i + offset for i in y], d[column], height=0.4, color=shade, label=column[8:11])
        ax_l.bar_label(bars, fmt="%.1f", padding=2, fontsize=font - 1)
    ax_l.set(title=f"Latency per call, batch {batch_size}", xlabel="ms per batch",
             xlim=(0, 1.35 * d["latency_p99_ms"].max()))
    ax_l.legend(loc="lower right", fontsize=8)
    ax_t.set_ylim(len(d) - 0.5, -0.5)  # first row on top (shared by both axes)
    return fig


def pareto_chart(run: RunData):
    """The accuracy-against-throughput figure: one panel per batch size, stacked, one point per
    (model, engine) of ``benchmark.csv`` with an accuracy and a measurement (colour by model,
    marker by engine, named in the legend below), the Pareto front (``findings.pareto_front``:
    nothing both faster and more accurate) drawn as a step line through its points, which are
    ringed. Returns the matplotlib Figure (one axes per batch size, in ascending order)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from report.findings import pareto_front

    b = benchmark_frame(run)
    b = b[b["items_per_sec"].notna() & b["accuracy"].notna()] if "accuracy" in b else b.iloc[0:0]
    sizes = sorted(b["batch_size"].unique()) or [None]
    models = sorted(b["model"].unique(), key=model_order)
    palette = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    colors = {model: palette(i % palette.N) for i, model in enumerate(models)}
    engines = [e for e in ENGINE_INFO if e in set(b["engine"])]
    legend_rows = -(-(len(models) + len(engines) + 1) // 4)
    panel = min(PARETO_PANEL_INCHES, (MAX_FIGURE_INCHES - 0.6 - 0.22 * legend_rows) / len(sizes))
    fig, axes = plt.subplots(len(sizes), 1, figsize=(7.0, 0.6 + panel * len(sizes) + 0.22 * legend_rows),
                             squeeze=False, layout="constrained")
    for ax, size in zip(axes[:, 0], sizes):
        d = b[b["batch_size"] == size].reset_index(drop=True)
        for _, r in d.iterrows():
            ax.scatter(r["items_per_sec"], r["accuracy"], marker=_MARKERS.get(r["engine"], "x"), s=36,
                       color=colors[r["model"]], edgecolors="white", linewidths=0.5, zorder=3)
        front = d[pareto_front(d["items_per_sec"], d["accuracy"])].sort_values("items_per_sec")
        if len(front):
            ax.step(front["items_per_sec"], front["accuracy"], where="post", color="black", lw=1,
                    label="Pareto front")
            ax.scatter(front["items_per_sec"], front["accuracy"], s=110, facecolors="none", edgecolors="black")
        ax.set_xscale("log")
        ax.set(title=f"batch {size}", xlabel="images/s (log scale)", ylabel="test accuracy in that engine")
    handles = ([Line2D([], [], ls="", marker="o", color=colors[m], label=m) for m in models]
               + [Line2D([], [], ls="", marker=_MARKERS.get(e, "x"), color="black", mfc="none", label=f"on {e}")
                  for e in engines]
               + [Line2D([], [], color="black", lw=1, marker="o", mfc="none", label="Pareto front (ringed)")])
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8)
    return fig


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
