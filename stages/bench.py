"""Stage 4, bench: every exported model on every engine, on one node's CPU-only Ray actor."""

from __future__ import annotations

import json

from study import RunLayout, StudyConfig, StudyError

# Heavy packages are imported inside the functions: orchestrate.py imports this module before it
# has checked the Python version and the installed packages.


def stage_bench(config: StudyConfig, data, summary: dict, reruns) -> tuple:
    """Stage 4: ``bench.benchmark.run_benchmarks`` on every exported model, unless
    ``benchmark.csv`` and ``onnx_accuracy.json`` exist; the models' sha256 (``summary``, the
    sparsify stage's) are checked before and after. It runs on one node
    (``study.resources.bench_node``) with ``--bench-cores`` or that node's physical cores.
    Returns (benchmark table,
    {model: onnx_test_acc})."""
    import pandas as pd

    from bench.benchmark import cpu_isa, run_benchmarks
    from study.files import atomic_write_text
    from study.resources import bench_cores, bench_node
    from trainables.batches import normalize
    from driver.cluster import cluster_nodes, on_node, run_on_node

    from study.layout import model_names, sparsity_targets

    layout = RunLayout(config.output_dir)
    models = model_names(sparsity_targets(config.sparsities, config.recipe, config.channel_ratios))
    reruns.begin("bench")  # may turn a skip into a rerun
    if reruns.action("bench") == "skip":
        reruns.done("bench")
        print(f"[bench] {layout.benchmark} exists: skipping the benchmark stage", flush=True)
        return pd.read_csv(layout.benchmark), json.loads(layout.onnx_accuracy.read_text())
    node = bench_node(cluster_nodes(), config.bench_cores)
    cores = config.bench_cores or bench_cores(node, run_on_node(node, cpu_isa)["num_cores"])
    print(f"[bench] {cores} cores on node {node.name}", flush=True)
    try:
        layout.check_onnx(summary, models)
        table, accuracies = run_benchmarks(
            {name: layout.onnx(name) for name in models}, normalize(data.test_images).numpy(),
            data.test_labels.numpy(), num_cores=cores, batch_sizes=config.bench_batch_sizes,
            warmup_s=config.bench_warmup_seconds, duration_s=config.bench_seconds, rounds=config.bench_rounds,
            deepsparse_python=config.deepsparse_python, scheduling_strategy=on_node(node))
        layout.check_onnx(summary, models)  # measuring changed nothing
    except ValueError as err:
        raise StudyError(str(err)) from None
    atomic_write_text(layout.onnx_accuracy, json.dumps(accuracies, indent=2))
    atomic_write_text(layout.benchmark, table.to_csv(index=False))
    reruns.done("bench")
    return table, accuracies


def check_deepsparse_python(python: str) -> str:
    """The DeepSparse version that ``--deepsparse-python`` imports, printed in one line; StudyError
    when that Python cannot import deepsparse (before any training)."""
    import subprocess

    from bench.engines.deepsparse import foreign_python_env

    proc = subprocess.run([python, "-c", "import deepsparse; print(deepsparse.__version__)"], capture_output=True,
                          text=True, env=foreign_python_env(), timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StudyError(f"--deepsparse-python {python}: cannot import deepsparse there ({last}); give a Python "
                         "3.10/3.11 with deepsparse==1.7.0 installed")
    version = proc.stdout.strip().splitlines()[-1]
    print(f"[bench] deepsparse {version} from {python} (its deepsparse.benchmark command)", flush=True)
    return version
