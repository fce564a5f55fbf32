"""Stage 5, report, and what a run prints at its end."""

from __future__ import annotations

from study import RunLayout, StudyConfig, StudyError

# Heavy packages are imported inside the functions: orchestrate.py imports this module before it
# has checked the Python version and the installed packages.


def stage_report(config: StudyConfig) -> int:
    """Stage 5: execute ``report.ipynb`` on the run and render it to HTML and PDF (``report``)."""
    from report import ReportError, render_report

    if not RunLayout(config.output_dir).results.exists():
        raise StudyError(f"no finished run in --output-dir {config.output_dir} (results.csv missing)")
    try:
        paths = render_report(config.output_dir)
    except (ReportError, ValueError) as err:
        raise StudyError(str(err)) from None
    print("report: " + ", ".join(str(paths[k]) for k in ("notebook", "html", "pdf") if paths.get(k)))
    return 0


def print_results(config: StudyConfig, table, setups, bench) -> None:
    """What a run prints at its end: ``driver.results.summary_text`` of the results and setups
    tables (DataFrames of ``results.csv``, ``setups.csv``) and, when the bench stage ran
    (``bench``: the ``benchmark.csv`` frame, else None), the throughput and latency table (its
    ``status``/``error`` columns only when a benchmark failed), the CPU's instruction set and
    VNNI, and per batch size which model is fastest (``report.fastest_model``)."""
    from driver.results import summary_text
    from report import fastest_model

    print(summary_text(config, table, setups))
    if bench is None:
        return
    from report import compression_verdict

    failed = bench["items_per_sec"].isna()  # rows of failed benchmarks (status "error")
    shown = bench.drop(columns=["isa", "vnni", "amx", "latency_p50_ms_rounds"], errors="ignore")
    if not (bench["status"] == "error").any():
        shown = shown.drop(columns=["status", "error"], errors="ignore")
    print("\nThroughput (items/s, median of the rounds), latency (ms), test accuracy in the engine, size (bytes):\n"
          + shown.to_markdown(index=False, floatfmt=".3f"))
    if not failed.all():
        cpu = bench[~failed].iloc[0]
        amx = cpu.get("amx")  # "" reads back from benchmark.csv as NaN
        print(f"CPU: {cpu['isa']}, VNNI {cpu['vnni']}, AMX {amx if isinstance(amx, str) and amx else 'none'}")
    for batch in sorted(set(bench[~failed]["batch_size"])):
        print(fastest_model(bench, batch))
        for sentence in compression_verdict(bench, batch):
            print(sentence)
