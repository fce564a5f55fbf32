"""CPU benchmark of ONNX models with DeepSparse / ONNX Runtime, as a Ray actor.

Throughput and latency come from DeepSparse's own benchmark API,
``deepsparse.benchmark.benchmark_model.benchmark_model(model_path, batch_size,
num_cores=..., scenario="sync", time=..., warmup_time=..., engine=...)``
(DeepSparse 1.7), which supports ``engine="deepsparse"`` and ``engine="onnxruntime"``
(``ORTEngine``: ``intra_op_num_threads = num_cores`` and the batch axis overridden to
``batch_size``). With ``scenario="sync"`` it runs one stream: a warm-up for
``warmup_time`` s, then back-to-back ``engine.run`` calls for ``time`` s, and reports
``items_per_sec = batch_size * iterations / wall time`` and per-batch latency
percentiles in milliseconds (``benchmark_result["mean"]``, ``["median"]``, ``["99.0%"]``).

The core count is always set explicitly: the DeepSparse engine is compiled with
``num_cores`` and the Ray actor reserves the same number of CPUs
(:func:`make_cpu_benchmark_actor`), so results are comparable between models.

Every engine here reads a private copy of the model (:func:`private_copy`), never the exported
file: DeepSparse 1.7's ``ORTEngine`` rewrites the file's input batch size **in place**
(``deepsparse.utils.onnx.override_onnx_batch_size(path, batch_size)`` with its default
``inplace=True``, called unconditionally in ``ORTEngine.__init__``), and ``benchmark_model`` offers
no switch to turn that off. Measuring must not change the deliverable.

Without DeepSparse in this Python (the Python 3.12 profile: DeepSparse has no wheel past 3.11),
onnxruntime is timed by :func:`ort_benchmark`, a loop of the same shape (one stream, warm-up, then
back-to-back ``InferenceSession.run`` calls), and runs every model; DeepSparse runs only through
``--deepsparse-python PATH``: the ``deepsparse.benchmark`` command beside that Python 3.10/3.11
(:func:`deepsparse_command`). Each row of ``benchmark.csv`` names the engine version that ran it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, NamedTuple, Optional, Union

import numpy as np

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS before DeepSparse is imported)
from study.errors import error_line

__all__ = ["ENGINES", "ENGINE_INFO", "BASELINE_ENGINE", "Engine", "CPUBenchmark", "make_cpu_benchmark_actor",
           "onnx_accuracy", "cpu_isa", "ort_benchmark", "deepsparse_command", "foreign_python_env",
           "has_deepsparse"]


class Engine(NamedTuple):
    """One inference engine of the bench stage (``ARCHITECTURE.md``, "How to add a benchmark engine")."""

    #: the Python package it imports (checked up front: ``study.requirements.SPARSIFY_PACKAGES``)
    package: str
    #: whether it is benchmarked on the sparse models too (else on ``dense`` only)
    sparse: bool
    #: its place among a model's rows in the report's benchmark table (lower first)
    display_order: int
    #: whether its ``dense`` row is the report's speed-up baseline ("vs dense <engine>"); exactly one is
    baseline: bool = False


#: The engines, in the order ``run_benchmarks`` measures them (the rows of ``benchmark.csv``). Each
#: needs a branch in ``_accuracy`` and is timed by ``deepsparse.benchmark.benchmark_model``, which
#: knows ``deepsparse`` and ``onnxruntime`` (another engine needs its own timed loop in ``CPUBenchmark.run``).
ENGINE_INFO: Dict[str, Engine] = {
    "deepsparse": Engine(package="deepsparse", sparse=True, display_order=1),
    "onnxruntime": Engine(package="onnxruntime", sparse=False, display_order=0, baseline=True),
}
#: engine names accepted by :meth:`CPUBenchmark.run` and :func:`onnx_accuracy`
ENGINES = tuple(ENGINE_INFO)
#: the engine whose ``dense`` row the report's speed-ups are relative to
BASELINE_ENGINE = next(name for name, engine in ENGINE_INFO.items() if engine.baseline)


def _check_common(model_path: str, batch_size: Any, engine: str, num_cores: Any) -> None:
    if not os.path.isfile(model_path):
        raise ValueError(f"ONNX model not found: {model_path!r}")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not supported; allowed: {', '.join(ENGINES)}")
    if num_cores is not None and (
        not isinstance(num_cores, (int, np.integer)) or isinstance(num_cores, bool) or num_cores < 1
    ):
        raise ValueError(f"num_cores must be an int >= 1 or None, got {num_cores!r}")


def has_deepsparse() -> bool:
    """Whether this Python can import DeepSparse (not on the Python 3.12 profile)."""
    return importlib.util.find_spec("deepsparse") is not None


def _cpu_isa_from_proc(cpuinfo: Optional[str] = None) -> Dict[str, Any]:
    """:func:`cpu_isa` without DeepSparse, from ``/proc/cpuinfo`` (or the text ``cpuinfo``): isa
    "avx512" (avx512f), "avx2" or "unknown"; vnni: avx512_vnni or avx_vnni; physical cores: distinct
    (physical id, core id) pairs among the CPUs this process may run on."""
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    allowed = os.sched_getaffinity(0) if cpuinfo is None and hasattr(os, "sched_getaffinity") else None
    flags, cores, model, cpu = set(), set(), "", {}
    for block in text.strip().split("\n\n"):
        cpu = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        cpu = {k.strip(): v.strip() for k, v in cpu.items()}
        if allowed is not None and int(cpu.get("processor", -1)) not in allowed:
            continue
        flags = set(cpu.get("flags", "").split())
        model = cpu.get("model name", model)
        cores.add((cpu.get("physical id", "0"), cpu.get("core id", cpu.get("processor", "0"))))
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "unknown"
    return {"isa": isa, "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "num_cores": max(1, len(cores)),
            "vendor_model": model}


def cpu_isa() -> Dict[str, Any]:
    """What DeepSparse detects about this CPU (``deepsparse.cpu.cpu_architecture()``); without
    DeepSparse in this Python, the same keys read from ``/proc/cpuinfo``.

    Returns:
        ``{"isa": "avx2" | "avx512" | ..., "vnni": bool (int8 dot-product
        instructions; without them DeepSparse emulates INT8), "num_cores": physical
        cores available to this process, "vendor_model": str}``.
    """
    if not has_deepsparse():
        return _cpu_isa_from_proc()
    from deepsparse.cpu import cpu_architecture

    arch = cpu_architecture()
    return {
        "isa": str(arch.isa),
        "vnni": bool(arch.vnni),
        "num_cores": int(arch.num_available_physical_cores),
        "vendor_model": str(getattr(arch, "vendor_model", "")),
    }


@contextlib.contextmanager
def private_copy(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Yield the path of a copy of the ONNX file ``path`` in a new temporary folder, removed
    afterwards: engines that rewrite their model file (see the module docstring) rewrite the copy.
    Raises OSError when ``path`` cannot be read."""
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        copy = os.path.join(folder, os.path.basename(os.fspath(path)))
        shutil.copyfile(path, copy)
        yield copy


def _to_numpy_f32(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # torch tensor
        images = images.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    return arr


def onnx_accuracy(
    path: Union[str, os.PathLike],
    images_float32: Any,
    labels: Any,
    batch_size: int,
    engine: str = "deepsparse",
    num_cores: Optional[int] = None,
) -> float:
    """Top-1 accuracy of an exported classifier on a labelled image set.

    Args:
        path: ``.onnx`` file; one input (B, C, H, W) float32, first output logits
            (B, num_classes).
        images_float32: (N, C, H, W) float32, already normalized exactly as the model
            was trained (numpy array or torch tensor).
        labels: (N,) integer class ids (numpy or torch).
        batch_size: engine batch size. DeepSparse compiles for a fixed batch size, so
            the last partial batch is zero-padded to ``batch_size`` and the padded
            rows are dropped (ONNX Runtime is fed the same way).
        engine: "deepsparse" (``deepsparse.Engine``) or "onnxruntime"
            (``onnxruntime.InferenceSession``, CPU provider).
        num_cores: cores for the engine (DeepSparse ``num_cores``, ORT
            ``intra_op_num_threads``); None = the engine's default (all).

    Returns:
        Fraction 0..1 of images whose argmax logit equals the label.

    Raises:
        ValueError: missing file, unknown engine, bad batch_size/num_cores, images
            not 4-D, or images/labels of different length or empty.
    """
    path = os.fspath(path)
    _check_common(path, batch_size, engine, num_cores)
    x = _to_numpy_f32(images_float32)
    y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    y = y.astype(np.int64).reshape(-1)
    if x.ndim != 4:
        raise ValueError(f"images_float32 must be (N, C, H, W), got shape {x.shape}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as images (> 0), got {len(x)} images and {len(y)} labels")

    with private_copy(path) as copy:
        return _accuracy(copy, x, y, int(batch_size), engine, num_cores)


def _latency_stats(latencies_ms: list, batch_size: int, seconds: float) -> Dict[str, Any]:
    """The keys ``deepsparse.benchmark`` reports, from per-call latencies (ms) over ``seconds``."""
    arr = np.asarray(latencies_ms, dtype=np.float64)
    return {"items_per_sec": batch_size * len(arr) / seconds, "mean": float(arr.mean()),
            "median": float(np.median(arr)), "99.0%": float(np.percentile(arr, 99)),
            "iterations": len(arr), "seconds_ran": seconds, "scenario": "singlestream"}


def ort_benchmark(path: str, batch_size: int, num_cores: int, warmup_s: float, duration_s: float) -> Dict[str, Any]:
    """Time onnxruntime (CPU provider, ``intra_op_num_threads = num_cores``) on random float32
    inputs of the model's shape at ``batch_size`` (the batch axis must be dynamic or equal it):
    ``warmup_s`` s of untimed calls, then back-to-back calls for ``duration_s`` s.

    Returns ``deepsparse.benchmark``'s keys: ``items_per_sec`` (images/s), ``mean``, ``median``,
    ``99.0%`` (ms per call), ``iterations``, ``seconds_ran``, ``scenario`` ("singlestream")."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(num_cores)
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {inp.name: rng.standard_normal((batch_size,) + tuple(int(d) for d in inp.shape[1:])).astype(np.float32)
             for inp in sess.get_inputs()}
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        sess.run(None, feeds)
    latencies, start = [], time.perf_counter()
    while not latencies or time.perf_counter() - start < duration_s:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        latencies.append((time.perf_counter() - t0) * 1000.0)
    return _latency_stats(latencies, batch_size, time.perf_counter() - start)


def foreign_python_env() -> Dict[str, str]:
    """This process's environment for another Python (``--deepsparse-python``): without
    ``PYTHONPATH``, ``VIRTUAL_ENV`` and ``PYTHONHOME``, which would point it at this Python's
    packages, and with ``NM_DISABLE_ANALYTICS=1``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return dict(env, NM_DISABLE_ANALYTICS="1")


def deepsparse_command(python: str, path: str, batch_size: int, num_cores: int, warmup_s: float,
                       duration_s: float, thread_pinning: str = "core") -> Dict[str, Any]:
    """Run the ``deepsparse.benchmark`` command that lies beside ``python`` (a Python 3.10/3.11 env
    with deepsparse 1.7) on ``path``: engine deepsparse, scenario sync, its JSON export read back.
    The command takes whole seconds: ``warmup_s`` and ``duration_s`` are rounded up.

    Returns ``deepsparse.benchmark``'s ``benchmark_result`` keys (as :func:`ort_benchmark`) plus
    ``version`` (DeepSparse's). Raises RuntimeError with the command's last stderr line when it fails."""
    command = Path(python).parent / "deepsparse.benchmark"
    with tempfile.TemporaryDirectory(prefix="deepsparse-") as folder:
        export = os.path.join(folder, "result.json")
        args = [str(command), path, "--batch_size", str(batch_size), "--num_cores", str(num_cores),
                "--scenario", "sync", "--time", str(max(1, math.ceil(duration_s))),
                "--warmup_time", str(max(1, math.ceil(warmup_s))), "--thread_pinning", thread_pinning,
                "--engine", "deepsparse", "--quiet", "--export_path", export]
        proc = subprocess.run(args, capture_output=True, text=True, env=foreign_python_env(),
                              timeout=duration_s + warmup_s + 600)
        if proc.returncode != 0 or not os.path.isfile(export):
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{command} exited with code {proc.returncode}: {last}")
        with open(export) as fh:
            result = json.load(fh)
    return {**result["benchmark_result"], "version": str(result["version"])}


def _accuracy(path: str, x: np.ndarray, y: np.ndarray, batch_size: int, engine: str,
              num_cores: Optional[int]) -> float:
    """The loop of :func:`onnx_accuracy` on checked inputs (``path`` may be rewritten)."""
    if engine == "deepsparse":
        from deepsparse import Engine

        eng = Engine(model=path, batch_size=batch_size, num_cores=num_cores)

        def run(batch: np.ndarray) -> np.ndarray:
            return eng.run([batch])[0]

    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if num_cores is not None:
            opts.intra_op_num_threads = int(num_cores)
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        in_name = sess.get_inputs()[0].name

        def run(batch: np.ndarray) -> np.ndarray:
            return sess.run(None, {in_name: batch})[0]

    correct = 0
    n = len(x)
    for start in range(0, n, batch_size):
        batch = x[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            pad = np.zeros((batch_size - real,) + batch.shape[1:], dtype=np.float32)
            batch = np.concatenate([batch, pad], axis=0)
        logits = np.asarray(run(np.ascontiguousarray(batch)))[:real]
        correct += int((logits.argmax(axis=1) == y[start : start + real]).sum())
    return correct / n


class CPUBenchmark:
    """CPU-only benchmark worker; meant to run as a Ray actor with a fixed core count.

    Usage::

        actor = make_cpu_benchmark_actor(num_cores=2)          # Ray actor handle
        row = ray.get(actor.run.remote("pruned.onnx", 32))

    or ``ray.remote(num_gpus=0, num_cpus=n)(CPUBenchmark).remote(num_cores=n)``.
    Plain (non-Ray) use works as well: ``CPUBenchmark(2).run(...)``.

    Args:
        num_cores: default core count for :meth:`run` / :meth:`accuracy`; None =
            all physical cores DeepSparse sees.
        thread_pinning: DeepSparse thread pinning, "core" (its default), "numa" or
            "none"; applied by ``benchmark_model`` through NM_BIND_THREADS_* env vars.
        deepsparse_python: a Python 3.10/3.11 with deepsparse 1.7 (``--deepsparse-python``): the
            deepsparse engine runs through its ``deepsparse.benchmark`` command; None: in this Python.
    """

    def __init__(self, num_cores: Optional[int] = None, thread_pinning: str = "core",
                 deepsparse_python: Optional[str] = None):
        if num_cores is not None and (not isinstance(num_cores, int) or num_cores < 1):
            raise ValueError(f"num_cores must be an int >= 1 or None, got {num_cores!r}")
        if thread_pinning not in ("core", "numa", "none"):
            raise ValueError(f"thread_pinning {thread_pinning!r} not allowed; use core, numa or none")
        self.num_cores = num_cores
        self.thread_pinning = thread_pinning
        self.deepsparse_python = deepsparse_python

    def cpu(self) -> Dict[str, Any]:
        """:func:`cpu_isa` as seen from this worker's process."""
        return cpu_isa()

    def run(
        self,
        model_path: Union[str, os.PathLike],
        batch_size: int,
        engine: str = "deepsparse",
        num_cores: Optional[int] = None,
        warmup_s: float = 2.0,
        duration_s: float = 10.0,
    ) -> Dict[str, Any]:
        """Benchmark one model at one batch size with ``deepsparse.benchmark``.

        Args:
            model_path: ``.onnx`` file (dynamic or matching batch axis); a private copy is
                measured, the file itself is only read.
            batch_size: items per engine call (random inputs of the model's shape).
            engine: "deepsparse" or "onnxruntime".
            num_cores: cores for the engine; default: the actor's ``num_cores``,
                else all physical cores DeepSparse sees. Always passed explicitly.
            warmup_s: seconds of untimed runs first (> 0).
            duration_s: seconds of timed runs (> 0).

        Returns:
            dict: ``model`` (path str), ``engine``, ``batch_size``, ``num_cores``,
            ``items_per_sec`` (images/s), ``latency_mean_ms``, ``latency_p50_ms``,
            ``latency_p99_ms`` (per batch call, milliseconds), ``iterations``,
            ``seconds_ran``, ``scenario`` ("singlestream"), ``isa`` ("avx2",
            "avx512", ...), ``vnni`` (bool), ``engine_version`` (e.g. "deepsparse 1.7.0",
            "onnxruntime 1.19.2").

        Raises:
            ValueError: missing file, unknown engine, bad batch_size / num_cores /
                durations.
        """
        model_path = os.fspath(model_path)
        if num_cores is None:
            num_cores = self.num_cores if self.num_cores is not None else cpu_isa()["num_cores"]
        _check_common(model_path, batch_size, engine, num_cores)
        for name, val in (("warmup_s", warmup_s), ("duration_s", duration_s)):
            if not isinstance(val, (int, float)) or isinstance(val, bool) or not val > 0:
                raise ValueError(f"{name} must be a number > 0 (seconds), got {val!r}")

        with private_copy(model_path) as copy:
            if engine == "deepsparse" and self.deepsparse_python:
                res = deepsparse_command(self.deepsparse_python, copy, int(batch_size), int(num_cores),
                                         float(warmup_s), float(duration_s), self.thread_pinning)
                version = f"deepsparse {res['version']}"
            elif not has_deepsparse():
                if engine == "deepsparse":
                    raise ValueError("deepsparse is not installed in this Python; pass --deepsparse-python")
                import onnxruntime

                res = ort_benchmark(copy, int(batch_size), int(num_cores), float(warmup_s), float(duration_s))
                version = f"onnxruntime {onnxruntime.__version__}"
            else:
                from deepsparse import __version__ as ds_version
                from deepsparse.benchmark.benchmark_model import benchmark_model

                res = benchmark_model(
                    model_path=copy,
                    batch_size=int(batch_size),
                    num_cores=int(num_cores),
                    scenario="sync",
                    time=float(duration_s),
                    warmup_time=float(warmup_s),
                    engine=engine,
                    thread_pinning=self.thread_pinning,
                    quiet=True,
                )["benchmark_result"]
                version = f"deepsparse {ds_version}"
                if engine == "onnxruntime":
                    import onnxruntime

                    version = f"onnxruntime {onnxruntime.__version__} (timed by deepsparse {ds_version})"
        isa = cpu_isa()
        return {
            "model": model_path,
            "engine": engine,
            "batch_size": int(batch_size),
            "num_cores": int(num_cores),
            "items_per_sec": float(res["items_per_sec"]),
            "latency_mean_ms": float(res["mean"]),
            "latency_p50_ms": float(res["median"]),
            "latency_p99_ms": float(res["99.0%"]),
            "iterations": int(res["iterations"]),
            "seconds_ran": float(res["seconds_ran"]),
            "scenario": str(res["scenario"]),
            "isa": isa["isa"],
            "vnni": isa["vnni"],
            "engine_version": version,
        }

    def accuracy(
        self,
        path: Union[str, os.PathLike],
        images_float32: Any,
        labels: Any,
        batch_size: int,
        engine: str = "deepsparse",
        num_cores: Optional[int] = None,
    ) -> float:
        """:func:`onnx_accuracy` inside the worker; ``num_cores`` defaults to the
        actor's ``num_cores``."""
        if num_cores is None:
            num_cores = self.num_cores
        return onnx_accuracy(path, images_float32, labels, batch_size, engine=engine, num_cores=num_cores)


def make_cpu_benchmark_actor(num_cores: int, *, thread_pinning: str = "core",
                             deepsparse_python: Optional[str] = None, **options: Any):
    """Start a :class:`CPUBenchmark` Ray actor that reserves ``num_cores`` CPUs and no GPU.

    Args:
        num_cores: CPUs reserved in Ray (``num_cpus``) and cores given to the engine.
        thread_pinning, deepsparse_python: see :class:`CPUBenchmark`.
        **options: extra ``ray.remote`` / ``.options`` keywords (e.g. ``name``).

    Returns:
        The actor handle (call ``ray.get(handle.run.remote(path, batch_size))``).
        ``ray.init`` must have been called (or is auto-started by Ray).

    Raises:
        ValueError: ``num_cores`` is not an int >= 1.
    """
    import ray

    if not isinstance(num_cores, int) or isinstance(num_cores, bool) or num_cores < 1:
        raise ValueError(f"num_cores must be an int >= 1, got {num_cores!r}")
    cls = ray.remote(num_gpus=0, num_cpus=num_cores)(CPUBenchmark)
    if options:
        cls = cls.options(**options)
    return cls.remote(num_cores, thread_pinning, deepsparse_python)


#: Columns of ``benchmark.csv``, in order. ``status`` is "ok" or "error"; ``error`` is the first
#: line of what went wrong (empty when ok); a failed row's measurements are empty (NaN).
#: ``engine_version``: the engine and version that ran the row (e.g. "deepsparse 1.7.0").
BENCHMARK_COLUMNS = ["model", "engine", "batch_size", "num_cores", "items_per_sec", "latency_mean_ms",
                     "latency_p50_ms", "latency_p99_ms", "isa", "vnni", "status", "error", "engine_version"]


def _first_line(err: BaseException) -> str:
    """The innermost cause of a Ray error (or ``err`` itself) as ``Type: first line``."""
    return error_line(getattr(err, "cause", None) or err, typed=True)


def run_benchmarks(onnx_paths: Dict[str, str], images_float32: Any, labels: Any, *, num_cores: int,
                   batch_sizes, warmup_s: float, duration_s: float, deepsparse_python: Optional[str] = None,
                   **actor_options: Any):
    """Stage 4: one CPU-only Ray actor with ``num_cores`` cores benchmarks every exported model
    (each engine of ``ENGINE_INFO`` that runs sparse models; all of them on ``dense``) at each batch size, one run at a time so runs do
    not compete for the cores, then measures each model's test accuracy in DeepSparse.

    A combination that fails (the engine rejects the model, the actor dies, ...) becomes a row
    with ``status`` "error" and the error's first line; the others are still measured (a dead
    actor is replaced). A failed accuracy is None.

    Args:
        onnx_paths: model name (``study.ONNX_MODELS``) -> ``.onnx`` path (only read: the engines
            get private copies).
        images_float32, labels: the normalized test set, (N, 3, 32, 32) float32 and (N,) int.
        num_cores: cores of the actor and of every engine.
        batch_sizes: batch sizes to benchmark (e.g. ``(1, 32)``).
        warmup_s, duration_s: seconds of warm-up and of timed runs per benchmark.
        deepsparse_python: see :class:`CPUBenchmark`. Without it and without DeepSparse in this
            Python, DeepSparse is left out (one line says so), onnxruntime runs every model and
            measures the accuracies.
        **actor_options: ``ray.remote`` options of the actor, e.g. ``scheduling_strategy`` (the
            node it runs on; its ``num_cores`` must fit there).

    Returns:
        ``(table, accuracies)``: a DataFrame with ``BENCHMARK_COLUMNS`` (items_per_sec in
        images/s, latencies in ms per batch call) and ``{model: test accuracy 0..1 or None}``.
    """
    import pandas as pd
    import ray

    actor = make_cpu_benchmark_actor(num_cores, deepsparse_python=deepsparse_python, **actor_options)
    in_process = has_deepsparse()
    engines = [e for e in ENGINES if e != "deepsparse" or in_process or deepsparse_python]
    if "deepsparse" not in engines:
        print("[bench] deepsparse: not installed in this Python (none past 3.11); left out. To run it, pass "
              "--deepsparse-python PATH (a Python 3.10/3.11 with deepsparse==1.7.0)", flush=True)

    def call(method: str, *args, **kwargs):
        """``actor.<method>(...)``; replaces the actor when it died, then re-raises."""
        nonlocal actor
        try:
            return ray.get(getattr(actor, method).remote(*args, **kwargs))
        except ray.exceptions.RayActorError:
            actor = make_cpu_benchmark_actor(num_cores, deepsparse_python=deepsparse_python, **actor_options)
            raise

    # without DeepSparse in this Python, onnxruntime is the engine here: it runs the sparse models too
    jobs = [(name, engine, batch) for name in onnx_paths
            for engine in engines if name == "dense" or ENGINE_INFO[engine].sparse or not in_process
            for batch in batch_sizes]
    rows = []
    for name, engine, batch in jobs:
        where = f"[bench] {name:16s} {engine:11s} batch {batch:3d}"
        try:
            row = call("run", str(onnx_paths[name]), batch, engine=engine, warmup_s=warmup_s,
                       duration_s=duration_s)
        except (ray.exceptions.RayError, ValueError, OSError) as err:
            rows.append({"model": name, "engine": engine, "batch_size": batch, "num_cores": num_cores,
                         "status": "error", "error": _first_line(err)})
            print(f"{where}: failed, {rows[-1]['error']}", flush=True)
            continue
        rows.append({**row, "model": name, "status": "ok", "error": ""})
        print(f"{where}: {row['items_per_sec']:9.1f} items/s, p50 {row['latency_p50_ms']:.2f} ms", flush=True)
    accuracies = {}
    for name, path in onnx_paths.items():
        try:
            accuracies[name] = call("accuracy", str(path), images_float32, labels, 32,
                                    engine="deepsparse" if in_process else "onnxruntime")
        except (ray.exceptions.RayError, ValueError, OSError) as err:
            accuracies[name] = None
            print(f"[bench] accuracy of {name}: failed, {_first_line(err)}", flush=True)
    ray.kill(actor)
    return pd.DataFrame(rows, columns=BENCHMARK_COLUMNS), accuracies
