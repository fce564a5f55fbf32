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
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import numpy as np

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS before DeepSparse is imported)
from bench.engines import ENGINE_INFO, ENGINES, REGISTRY
from study import requirements
from study.errors import error_line

__all__ = ["CPUBenchmark", "make_cpu_benchmark_actor", "onnx_accuracy", "cpu_isa", "amx_flags", "model_sizes", "model_cost",
           "graph_kind", "bench_rows", "run_benchmarks", "BENCHMARK_COLUMNS"]


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


def _cpu_isa_from_proc(cpuinfo: Optional[str] = None) -> Dict[str, Any]:
    """:func:`cpu_isa` without DeepSparse, from ``/proc/cpuinfo`` (or the text ``cpuinfo``): isa
    "avx512" (avx512f), "avx2" or "unknown"; vnni: avx512_vnni or avx_vnni; amx: the AMX flags
    (:func:`amx_flags`); physical cores: distinct (physical id, core id) pairs among the CPUs this
    process may run on."""
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
    return {"isa": isa, "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "amx": amx_flags(flags),
            "num_cores": max(1, len(cores)), "vendor_model": model}


def amx_flags(flags: Optional[set] = None) -> str:
    """The Intel AMX tile flags of this CPU (``amx_int8``, ``amx_bf16``, ``amx_fp16``, ...), sorted
    and space-separated, from ``flags`` or the first CPU of ``/proc/cpuinfo``; "" when none (AMD, or
    Intel before Sapphire Rapids). OpenVINO's INT8 and bf16 kernels use them where present."""
    if flags is None:
        text = Path("/proc/cpuinfo").read_text()
        line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "flags :")
        flags = set(line.split(":", 1)[1].split())
    return " ".join(sorted(f for f in flags if f.startswith("amx")))


def cpu_isa() -> Dict[str, Any]:
    """What DeepSparse detects about this CPU (``deepsparse.cpu.cpu_architecture()``); without
    DeepSparse in this Python, the same keys read from ``/proc/cpuinfo``.

    Returns:
        ``{"isa": "avx2" | "avx512" | ..., "vnni": bool (int8 dot-product
        instructions; without them DeepSparse emulates INT8), "amx": :func:`amx_flags`,
        "num_cores": physical cores available to this process, "vendor_model": str}``.
    """
    if not requirements.has_deepsparse():
        return _cpu_isa_from_proc()
    from deepsparse.cpu import cpu_architecture

    arch = cpu_architecture()
    return {
        "isa": str(arch.isa),
        "vnni": bool(arch.vnni),
        "amx": amx_flags(),
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
        engine: "deepsparse" (``deepsparse.Engine``), "onnxruntime"
            (``onnxruntime.InferenceSession``, CPU provider) or "openvino" (compiled for the CPU at
            ``batch_size``).
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


def _accuracy(path: str, x: np.ndarray, y: np.ndarray, batch_size: int, engine: str,
              num_cores: Optional[int]) -> float:
    """The loop of :func:`onnx_accuracy` on checked inputs (``path`` may be rewritten)."""
    run = ENGINE_INFO[engine].open(path, batch_size, num_cores).run
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


def model_sizes(path: Union[str, os.PathLike]) -> tuple[int, int]:
    """``(raw, gzip)``: the file's size on disk and gzip-compressed (level 9, ``gzip.compress``), in
    bytes. Zeros compress, so a pruned model's gzip size shows its sparsity. OSError when unreadable."""
    data = open(os.fspath(path), "rb").read()
    return len(data), len(gzip.compress(data, compresslevel=9))


def model_cost(path: Union[str, os.PathLike]) -> tuple[Optional[int], Optional[int]]:
    """``(MACs, parameters)`` per image of the ONNX model at ``path``, as its ``metadata_props``
    ``macs``/``params`` record them (``trainables.compress.export.model_cost`` at export); None
    for a value the file does not record or a file that is not an ONNX model."""
    import onnx

    try:
        meta = {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props}
        return tuple(int(meta[key]) if key in meta else None for key in ("macs", "params"))
    except Exception:  # noqa: BLE001 - protobuf's DecodeError, OSError, ...: graph_kind says "unreadable"
        return None, None


def graph_kind(path: Union[str, os.PathLike]) -> str:
    """Which graph an ONNX file holds, from its op types: ``"ConvInteger INT8"`` (SparseML's
    ``convert_qat`` export: ConvInteger/MatMulInteger), ``"QLinearConv INT8"``, ``"QDQ INT8"``
    (QuantizeLinear/DequantizeLinear around float Conv/Gemm), ``"FP32"``, or ``"unreadable"`` when
    the file is not an ONNX model (its benchmark rows carry the engines' errors)."""
    import onnx

    try:
        ops = {node.op_type for node in onnx.load(os.fspath(path), load_external_data=False).graph.node}
    except Exception:  # noqa: BLE001 - protobuf's DecodeError, OSError, ...: the rows say what failed
        return "unreadable"
    if ops & {"ConvInteger", "MatMulInteger"}:
        return "ConvInteger INT8"
    if ops & {"QLinearConv", "QLinearMatMul"}:
        return "QLinearConv INT8"
    if "DequantizeLinear" in ops:
        return "QDQ INT8"
    return "FP32"


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
        _check_common(model_path, batch_size, engine, num_cores)
        for name, val in (("warmup_s", warmup_s), ("duration_s", duration_s)):
            if not isinstance(val, (int, float)) or isinstance(val, bool) or not val > 0:
                raise ValueError(f"{name} must be a number > 0 (seconds), got {val!r}")

        with private_copy(model_path) as copy:
            res = ENGINE_INFO[engine].time(copy, int(batch_size), int(num_cores), float(warmup_s), float(duration_s),
                                           self.thread_pinning, self.deepsparse_python)
        isa = cpu_isa()
        return {
            "model": model_path,
            "engine": engine,
            "batch_size": int(batch_size),
            "num_cores": int(num_cores),
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


#: Columns of ``benchmark.csv``, in order: the pair's test ``accuracy`` (0..1) in that engine, the
#: model file's ``size_bytes`` and ``size_gzip_bytes``, its ``graph`` (:func:`graph_kind`), how many
#: ``rounds`` were timed; ``macs``/``params``: multiply-accumulates per image and parameter elements
#: of the model (:func:`model_cost`; an unstructured-pruned model counts its zeros); throughput (images/s) and latencies (ms per batch call) are medians over
#: the rounds, ``items_per_sec_rounds`` / ``latency_p50_ms_rounds`` the rounds themselves (JSON
#: lists). ``status`` is "ok" or "error"; ``error`` is the first line of what went wrong (empty when
#: ok); a failed measurement is empty (NaN), the others stay. ``engine_version``: the engine and
#: version that ran the row (e.g. "deepsparse 1.7.0"). ``isa``, ``vnni``, ``amx``: the CPU
#: (:func:`cpu_isa`). ``precision``: what OpenVINO compiled the model's convolutions to, read back
#: (``OpenVINO.precision``); empty for DeepSparse and onnxruntime, which expose no read-back
#: (onnxruntime's CPU provider runs the graph's own types).
BENCHMARK_COLUMNS = ["model", "engine", "batch_size", "num_cores", "accuracy", "size_bytes", "size_gzip_bytes",
                     "macs", "params", "graph", "rounds", "items_per_sec", "latency_mean_ms", "latency_p50_ms", "latency_p99_ms",
                     "items_per_sec_rounds", "latency_p50_ms_rounds", "isa", "vnni", "amx", "precision",
                     "status", "error", "engine_version"]
#: the timed keys of a measurement whose median a row holds
TIMED = ("items_per_sec", "latency_mean_ms", "latency_p50_ms", "latency_p99_ms")


def _first_line(err: BaseException) -> str:
    """The innermost cause of a Ray error (or ``err`` itself) as ``Type: first line``."""
    return error_line(getattr(err, "cause", None) or err, typed=True)


def bench_rows(jobs, measured: dict, errors: dict, accuracy: dict, sizes: dict, graphs: dict, num_cores: int,
               costs: Optional[dict] = None):
    """The rows of ``benchmark.csv`` (dicts with ``BENCHMARK_COLUMNS``), one per job, in job order.

    Args:
        jobs: ``(model, engine, batch_size)`` tuples.
        measured: job -> list of :meth:`CPUBenchmark.run` results, one per round that ran.
        errors: job -> first error line of its timing (absent/empty: none).
        accuracy: ``(model, engine)`` -> test accuracy 0..1, or an error line (str) when it failed.
        sizes: model -> ``(raw, gzip)`` bytes; graphs: model -> :func:`graph_kind`; costs: model ->
            ``(MACs, params)`` per image (:func:`model_cost`; absent: unknown).

    A row's timings are the medians of its rounds (``statistics.median``); a row with a timing or
    accuracy error has ``status`` "error" and both errors in ``error``, its other values kept."""
    rows = []
    for job in jobs:
        model, engine, batch = job
        runs = measured.get(job, [])
        acc = accuracy.get((model, engine))
        problems = [e for e in (errors.get(job), None if not isinstance(acc, str) else f"accuracy: {acc}") if e]
        row = {"model": model, "engine": engine, "batch_size": batch, "num_cores": num_cores,
               "accuracy": acc if isinstance(acc, float) else None,
               "size_bytes": sizes.get(model, (None, None))[0], "size_gzip_bytes": sizes.get(model, (None, None))[1],
               "macs": (costs or {}).get(model, (None, None))[0], "params": (costs or {}).get(model, (None, None))[1],
               "graph": graphs.get(model), "rounds": len(runs), "status": "error" if problems else "ok",
               "error": "; ".join(problems)}
        if runs:
            row.update({key: statistics.median(r[key] for r in runs) for key in TIMED})
            row["items_per_sec_rounds"] = json.dumps([round(r["items_per_sec"], 3) for r in runs])
            row["latency_p50_ms_rounds"] = json.dumps([round(r["latency_p50_ms"], 4) for r in runs])
            row.update({key: runs[0][key] for key in ("isa", "vnni", "amx", "precision", "engine_version")})
        rows.append(row)
    return rows


def run_benchmarks(onnx_paths: Dict[str, str], images_float32: Any, labels: Any, *, num_cores: int,
                   batch_sizes, warmup_s: float, duration_s: float, rounds: int = 1,
                   deepsparse_python: Optional[str] = None, **actor_options: Any):
    """Stage 4: one CPU-only Ray actor with ``num_cores`` cores benchmarks every model on every
    engine of ``bench.engines.REGISTRY`` at each batch size, one measurement at a time so they do not compete
    for the cores, in ``rounds`` interleaved rounds (each measurement its own actor call, its engine
    built afresh); then measures each (model, engine)'s test accuracy in that engine (batch 32).

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
    import ray

    actor = make_cpu_benchmark_actor(num_cores, deepsparse_python=deepsparse_python, **actor_options)
    in_process = requirements.has_deepsparse()
    engines = [engine.name for engine in REGISTRY if engine.available(deepsparse_python)]
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

    failures = (ray.exceptions.RayError, ValueError, OSError, RuntimeError)
    jobs = [(name, engine, batch) for name in onnx_paths
            for engine in engines
            for batch in batch_sizes]
    measured: Dict[tuple, list] = {job: [] for job in jobs}
    errors: Dict[tuple, str] = {}
    from study.noise import verbose

    for round_ in range(1, int(rounds) + 1):
        started = time.perf_counter()
        for job in jobs:
            if job in errors:
                continue
            name, engine, batch = job
            where = f"[bench] round {round_}/{rounds} {name:22s} {engine:11s} batch {batch:3d}"
            try:
                row = call("run", str(onnx_paths[name]), batch, engine=engine, warmup_s=warmup_s,
                           duration_s=duration_s)
            except failures as err:
                errors[job] = _first_line(err)
                print(f"{where}: failed, {errors[job]}", flush=True)
                continue
            measured[job].append(row)
            if verbose():  # else one line per round (below); failures always
                print(f"{where}: {row['items_per_sec']:9.1f} items/s, p50 {row['latency_p50_ms']:.2f} ms", flush=True)
        print(f"[bench] round {round_}/{rounds}: {sum(len(m) >= round_ for m in measured.values())} of {len(jobs)} "
              f"measurements ({len(engines)} engines, {len(onnx_paths)} models, batch sizes "
              f"{', '.join(map(str, batch_sizes))}) in {time.perf_counter() - started:.0f} s", flush=True)
    accuracy: Dict[tuple, Any] = {}
    print(f"[bench] test accuracy of each model in each engine, {len(labels)} images at batch 32", flush=True)
    for name in onnx_paths:
        for engine in dict.fromkeys(engine for _, engine, _ in jobs):
            if not ENGINE_INFO[engine].measures_accuracy(deepsparse_python):
                continue  # e.g. the deepsparse.benchmark command times a model; it does not run the test set
            try:
                accuracy[(name, engine)] = float(call("accuracy", str(onnx_paths[name]), images_float32, labels, 32,
                                                      engine=engine))
            except failures as err:
                accuracy[(name, engine)] = _first_line(err)
                print(f"[bench] accuracy of {name} on {engine}: failed, {accuracy[(name, engine)]}", flush=True)
    ray.kill(actor)
    sizes = {name: model_sizes(path) for name, path in onnx_paths.items()}
    graphs = {name: graph_kind(path) for name, path in onnx_paths.items()}
    costs = {name: model_cost(path) for name, path in onnx_paths.items()}
    table = pd.DataFrame(bench_rows(jobs, measured, errors, accuracy, sizes, graphs, num_cores, costs),
                         columns=BENCHMARK_COLUMNS)
    reference = "deepsparse" if in_process else "onnxruntime"
    accuracies = {name: accuracy.get((name, reference)) if isinstance(accuracy.get((name, reference)), float)
                  else None for name in onnx_paths}
    return table, accuracies
