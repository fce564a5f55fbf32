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

Each engine is one class in ``bench/engines/`` (``REGISTRY``): it opens a model at a batch size and
core count, runs a batch and times itself. OpenVINO has no benchmark API of its own here:
``bench.engines.timed_loop`` times it the same way (warm-up, then back-to-back synchronous calls,
the same keys and percentiles).

:func:`run_benchmarks` measures every model on every engine at every batch size, ``rounds`` times
interleaved (round 1 of every job, then round 2, ...), each measurement one actor call that builds
its engine afresh; a row holds the medians over its rounds and the rounds themselves.

Every engine here reads a private copy of the model (:func:`private_copy`), never the exported
file: DeepSparse 1.7's ``ORTEngine`` rewrites the file's input batch size **in place**
(``deepsparse.utils.onnx.override_onnx_batch_size(path, batch_size)`` with its default
``inplace=True``, called unconditionally in ``ORTEngine.__init__``), and ``benchmark_model`` offers
no switch to turn that off. Measuring must not change the deliverable.

Without DeepSparse in this Python (the Python 3.12 profile: DeepSparse has no wheel past 3.11),
onnxruntime is timed by ``timed_loop`` (one stream, warm-up, then back-to-back
``InferenceSession.run`` calls), and runs every model; DeepSparse runs only through
``--deepsparse-python PATH``: the ``deepsparse.benchmark`` command beside that Python 3.10/3.11
(``bench.engines.deepsparse.deepsparse_command``). Each row of ``benchmark.csv`` names the engine
version that ran it.

Here: the worker (:class:`CPUBenchmark`) and the stage (:func:`run_benchmarks`). The rows of
``benchmark.csv`` are built in ``bench.rows``, the accuracy pass and the private copy live in
``bench.accuracy``, the CPU's features in ``bench.cpu``; their public names are importable from here.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional, Union

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS before DeepSparse is imported)
from bench.accuracy import check_args, onnx_accuracy, private_copy
from bench.cpu import _cpu_isa_from_proc, amx_flags, cpu_isa  # noqa: F401  (re-exported)
from bench.engines import ENGINE_INFO, REGISTRY
from bench.rows import BENCHMARK_COLUMNS, TIMED, bench_rows, graph_kind, model_cost, model_sizes  # noqa: F401
from study import requirements
from study.errors import error_line

__all__ = ["CPUBenchmark", "make_cpu_benchmark_actor", "onnx_accuracy", "cpu_isa", "amx_flags", "model_sizes", "model_cost",
           "graph_kind", "bench_rows", "run_benchmarks", "BENCHMARK_COLUMNS"]


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
        """Benchmark one model at one batch size with its engine's ``time`` (``bench.engines``).

        Args:
            model_path: ``.onnx`` file (dynamic or matching batch axis); a private copy is
                measured, the file itself is only read.
            batch_size: items per engine call (random inputs of the model's shape).
            engine: "deepsparse", "onnxruntime" or "openvino".
            num_cores: cores for the engine; default: the actor's ``num_cores``,
                else all physical cores DeepSparse sees. Always passed explicitly.
            warmup_s: seconds of untimed runs first (> 0).
            duration_s: seconds of timed runs (> 0).

        Returns:
            dict: ``model`` (path str), ``engine``, ``batch_size``, ``num_cores``,
            ``items_per_sec`` (images/s), ``latency_mean_ms``, ``latency_p50_ms``,
            ``latency_p99_ms`` (per batch call, milliseconds), ``iterations``,
            ``seconds_ran``, ``scenario`` ("singlestream"), ``isa`` ("avx2",
            "avx512", ...), ``vnni`` (bool), ``amx`` (str), ``precision`` (the engine's read-back,
            ``Engine.precision``: OpenVINO's; "" for the other engines), ``engine_version``
            (e.g. "deepsparse 1.7.0", "onnxruntime 1.19.2").

        Raises:
            ValueError: missing file, unknown engine, bad batch_size / num_cores /
                durations.
        """
        model_path = os.fspath(model_path)
        if num_cores is None:
            num_cores = self.num_cores if self.num_cores is not None else cpu_isa()["num_cores"]
        check_args(model_path, batch_size, engine, num_cores)
        for name, val in (("warmup_s", warmup_s), ("duration_s", duration_s)):
            if not isinstance(val, (int, float)) or isinstance(val, bool) or not val > 0:
                raise ValueError(f"{name} must be a number > 0 (seconds), got {val!r}")

        with private_copy(model_path) as copy:
            res = ENGINE_INFO[engine].time(copy, int(batch_size), int(num_cores), float(warmup_s), float(duration_s),
                                           self.thread_pinning, self.deepsparse_python)
        return _measurement(model_path, engine, int(batch_size), int(num_cores), res)

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


def _measurement(model_path: str, engine: str, batch_size: int, num_cores: int,
                 res: Dict[str, Any]) -> Dict[str, Any]:
    """The dict :meth:`CPUBenchmark.run` returns: the job, the engine's timing ``res`` (its
    ``time``) as float/int, and this CPU (:func:`cpu_isa`, read now)."""
    isa = cpu_isa()
    return {
        "model": model_path,
        "engine": engine,
        "batch_size": batch_size,
        "num_cores": num_cores,
        "items_per_sec": float(res["items_per_sec"]),
        "latency_mean_ms": float(res["latency_mean_ms"]),
        "latency_p50_ms": float(res["latency_p50_ms"]),
        "latency_p99_ms": float(res["latency_p99_ms"]),
        "iterations": int(res["iterations"]),
        "seconds_ran": float(res["seconds_ran"]),
        "scenario": "singlestream",
        "isa": isa["isa"],
        "vnni": isa["vnni"],
        "amx": isa["amx"],
        "precision": res.get("precision", ""),
        "engine_version": res["engine_version"],
    }


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


def _first_line(err: BaseException) -> str:
    """The innermost cause of a Ray error (or ``err`` itself) as ``Type: first line``."""
    return error_line(getattr(err, "cause", None) or err, typed=True)


def run_benchmarks(onnx_paths: Dict[str, str], images_float32: Any, labels: Any, *, num_cores: int,
                   batch_sizes, warmup_s: float, duration_s: float, rounds: int = 1,
                   deepsparse_python: Optional[str] = None, **actor_options: Any):
    """Stage 4: one CPU-only Ray actor with ``num_cores`` cores benchmarks every model on every
    engine of ``bench.engines.REGISTRY`` at each batch size, one measurement at a time so they do not compete
    for the cores, in ``rounds`` interleaved rounds (each measurement its own actor call, its engine
    built afresh); then measures each (model, engine)'s test accuracy in that engine (batch 32) while
    threads read each file's size (``model_sizes``: gzip level 9, one file per core at a time).

    A combination that fails (the engine rejects the model, the actor dies, ...) becomes a row
    with ``status`` "error" and the error's first line (not timed again in later rounds); the
    others are still measured (a dead actor is replaced).

    Args:
        onnx_paths: model name (``study.layout.model_names``) -> ``.onnx`` path (only read: the
            engines get private copies), in report order.
        images_float32, labels: the normalized test set, (N, 3, 32, 32) float32 and (N,) int.
        num_cores: cores of the actor and of every engine.
        batch_sizes: batch sizes to benchmark (e.g. ``(1, 32)``).
        warmup_s, duration_s: seconds of warm-up and of timed runs per measurement.
        rounds: how many times the whole matrix is timed (>= 1).
        deepsparse_python: see :class:`CPUBenchmark`. Without it and without DeepSparse in this
            Python, DeepSparse is left out (one line says so). DeepSparse through it is timed only:
            its rows have no accuracy.
        **actor_options: ``ray.remote`` options of the actor, e.g. ``scheduling_strategy`` (the
            node it runs on; its ``num_cores`` must fit there).

    Returns:
        ``(table, accuracies)``: a DataFrame with ``BENCHMARK_COLUMNS`` (:func:`bench_rows`) and
        ``{model: test accuracy 0..1, or None}`` (``onnx_accuracy.json``): in DeepSparse, or in
        onnxruntime where this Python has no DeepSparse.
    """
    import pandas as pd

    actor = _Actor(num_cores, deepsparse_python, actor_options)
    in_process = requirements.has_deepsparse()
    engines = _engines(deepsparse_python)
    jobs = [(name, engine, batch) for name in onnx_paths
            for engine in engines
            for batch in batch_sizes]
    scope = f"{len(engines)} engines, {len(onnx_paths)} models, batch sizes {', '.join(map(str, batch_sizes))}"
    measured, errors = _time_jobs(actor, onnx_paths, jobs, rounds, warmup_s, duration_s, scope)
    # The timing is over: the files compress (zlib releases the GIL) while the engines run the test set.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        compressed = pool.map(model_sizes, onnx_paths.values())
        accuracy = _accuracies(actor, onnx_paths, jobs, images_float32, labels, deepsparse_python)
        sizes = dict(zip(onnx_paths, compressed))
    actor.kill()
    graphs = {name: graph_kind(path) for name, path in onnx_paths.items()}
    costs = {name: model_cost(path) for name, path in onnx_paths.items()}
    table = pd.DataFrame(bench_rows(jobs, measured, errors, accuracy, sizes, graphs, num_cores, costs),
                         columns=BENCHMARK_COLUMNS)
    reference = "deepsparse" if in_process else "onnxruntime"
    accuracies = {name: accuracy.get((name, reference)) if isinstance(accuracy.get((name, reference)), float)
                  else None for name in onnx_paths}
    return table, accuracies


class _Actor:
    """The one :class:`CPUBenchmark` actor of :func:`run_benchmarks`; one that died is replaced."""

    def __init__(self, num_cores: int, deepsparse_python: Optional[str], options: Dict[str, Any]):
        self._start = lambda: make_cpu_benchmark_actor(num_cores, deepsparse_python=deepsparse_python, **options)
        self.handle = self._start()

    def call(self, method: str, *args, **kwargs):
        """``actor.<method>(...)``; replaces the actor when it died, then re-raises."""
        import ray

        try:
            return ray.get(getattr(self.handle, method).remote(*args, **kwargs))
        except ray.exceptions.RayActorError:
            self.handle = self._start()
            raise

    def kill(self) -> None:
        """``ray.kill`` the actor."""
        import ray

        ray.kill(self.handle)


def _failures() -> tuple:
    """The errors that make one measurement a row with ``status`` "error" instead of ending the stage."""
    import ray

    return (ray.exceptions.RayError, ValueError, OSError, RuntimeError)


def _engines(deepsparse_python: Optional[str]) -> list:
    """Names of the engines of ``REGISTRY`` that run here (``Engine.available``), in its order; one
    line when DeepSparse is not among them."""
    engines = [engine.name for engine in REGISTRY if engine.available(deepsparse_python)]
    if "deepsparse" not in engines:
        print("[bench] deepsparse: not installed in this Python (none past 3.11); left out. To run it, pass "
              "--deepsparse-python PATH (a Python 3.10/3.11 with deepsparse==1.7.0)", flush=True)
    return engines


def _time_jobs(actor: _Actor, onnx_paths: Dict[str, str], jobs: list, rounds: int, warmup_s: float,
               duration_s: float, scope: str) -> tuple:
    """Time every ``(model, engine, batch)`` job ``rounds`` times, interleaved: one line per failure
    (that job is not timed again), per round and, with ``--verbose``, per measurement (``scope``:
    what the round line says was measured). Returns ``(measured, errors)``: job -> the
    :meth:`CPUBenchmark.run` results of its rounds, job -> its error line."""
    from study.noise import verbose

    measured: Dict[tuple, list] = {job: [] for job in jobs}
    errors: Dict[tuple, str] = {}
    for round_ in range(1, int(rounds) + 1):
        started = time.perf_counter()
        for job in jobs:
            if job in errors:
                continue
            name, engine, batch = job
            where = f"[bench] round {round_}/{rounds} {name:22s} {engine:11s} batch {batch:3d}"
            try:
                row = actor.call("run", str(onnx_paths[name]), batch, engine=engine, warmup_s=warmup_s,
                                 duration_s=duration_s)
            except _failures() as err:
                errors[job] = _first_line(err)
                print(f"{where}: failed, {errors[job]}", flush=True)
                continue
            measured[job].append(row)
            if verbose():  # else one line per round (below); failures always
                print(f"{where}: {row['items_per_sec']:9.1f} items/s, p50 {row['latency_p50_ms']:.2f} ms", flush=True)
        print(f"[bench] round {round_}/{rounds}: {sum(len(m) >= round_ for m in measured.values())} of {len(jobs)} "
              f"measurements ({scope}) in {time.perf_counter() - started:.0f} s", flush=True)
    return measured, errors


def _accuracies(actor: _Actor, onnx_paths: Dict[str, str], jobs: list, images_float32: Any, labels: Any,
                deepsparse_python: Optional[str]) -> Dict[tuple, Any]:
    """Test accuracy of each model in each engine of ``jobs`` that measures it (batch 32):
    ``(model, engine)`` -> 0..1, or the error line (str) when it failed (one line says so)."""
    accuracy: Dict[tuple, Any] = {}
    print(f"[bench] test accuracy of each model in each engine, {len(labels)} images at batch 32", flush=True)
    for name in onnx_paths:
        for engine in dict.fromkeys(engine for _, engine, _ in jobs):
            if not ENGINE_INFO[engine].measures_accuracy(deepsparse_python):
                continue  # e.g. the deepsparse.benchmark command times a model; it does not run the test set
            try:
                accuracy[(name, engine)] = float(actor.call("accuracy", str(onnx_paths[name]), images_float32, labels,
                                                            32, engine=engine))
            except _failures() as err:
                accuracy[(name, engine)] = _first_line(err)
                print(f"[bench] accuracy of {name} on {engine}: failed, {accuracy[(name, engine)]}", flush=True)
    return accuracy
