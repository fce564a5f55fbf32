"""Stage 4, bench: every exported model on every engine, on one node's CPU-only Ray actor."""

from __future__ import annotations

import json

from study import RunLayout, StudyConfig, StudyError
from stages.base import Context, Stage

# Heavy packages are imported inside the methods: orchestrate.py imports this module before it
# has checked the Python version and the installed packages.


class Bench(Stage):
    """Stage 4: ``bench.benchmark.run_benchmarks`` on every exported model, on one node
    (``study.resources.bench_node``) with ``--bench-cores`` or that node's physical cores; the
    models' sha256 (``ctx.summary``, the sparsify stage's) are checked before and after. Writes
    ``benchmark.csv`` and ``onnx_accuracy.json`` atomically at its end, so a rerun writes in place.
    ``load``: (benchmark table, {model: onnx_test_acc})."""

    name = "bench"
    fields = ("bench_cores", "bench_batch_sizes", "bench_warmup_seconds", "bench_seconds", "bench_rounds")
    data = ("test",)
    code = ("stages.bench", "bench.benchmark", "trainables.batches")
    outputs = ("benchmark.csv", "onnx_accuracy.json")
    staged = False

    def files(self, config) -> dict[str, str]:
        """Every ONNX model of the run."""
        return {f"{name}.onnx": f"onnx/{name}.onnx" for name in _models(config)}

    def extra_fields(self, config) -> dict:
        """``deepsparse: True`` when DeepSparse runs (``study.requirements.runs_deepsparse``):
        recorded only then, so a bench made without it reruns once DeepSparse is there
        (``--deepsparse-python``), and one made with it is kept when a later run has none."""
        from study.requirements import runs_deepsparse

        return {"deepsparse": True} if runs_deepsparse(config.deepsparse_python) else {}

    def keep(self, ctx: Context) -> str:
        return f"[bench] {ctx.layout.benchmark} exists: skipping the benchmark stage"

    def run(self, ctx: Context, out: RunLayout, action: str, changed: frozenset[str]) -> None:
        """Measure every model of the run; StudyError (one line) for a changed ONNX file or a
        benchmark's ValueError."""
        from bench.benchmark import cpu_isa, run_benchmarks
        from driver.cluster import cluster_nodes, on_node, run_on_node
        from study.files import atomic_write_text
        from study.resources import bench_cores, bench_node
        from trainables.batches import normalize

        config, layout, data = ctx.config, ctx.layout, ctx.data
        models = _models(config)
        node = bench_node(cluster_nodes(), config.bench_cores)
        cores = config.bench_cores or bench_cores(node, run_on_node(node, cpu_isa)["num_cores"])
        print(f"[bench] {cores} cores on node {node.name}", flush=True)
        try:
            layout.check_onnx(ctx.summary, models)
            table, accuracies = run_benchmarks(
                {name: layout.onnx(name) for name in models}, normalize(data.test_images).numpy(),
                data.test_labels.numpy(), num_cores=cores, batch_sizes=config.bench_batch_sizes,
                warmup_s=config.bench_warmup_seconds, duration_s=config.bench_seconds, rounds=config.bench_rounds,
                deepsparse_python=config.deepsparse_python, scheduling_strategy=on_node(node))
            layout.check_onnx(ctx.summary, models)  # measuring changed nothing
        except ValueError as err:
            raise StudyError(str(err)) from None
        atomic_write_text(out.onnx_accuracy, json.dumps(accuracies, indent=2))
        atomic_write_text(out.benchmark, table.to_csv(index=False))

    def load(self, ctx: Context) -> tuple:
        import pandas as pd

        return pd.read_csv(ctx.layout.benchmark), json.loads(ctx.layout.onnx_accuracy.read_text())


STAGE = Bench()


def _models(config: StudyConfig) -> list[str]:
    from study.layout import model_names, sparsity_targets

    return model_names(sparsity_targets(config.sparsities, config.recipe, config.channel_ratios))


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
