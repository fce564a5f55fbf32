"""The rows of ``benchmark.csv``: its columns (``BENCHMARK_COLUMNS``), a row per measured job with
the medians over its rounds (``bench_rows``), and what each model file says about itself: its size
(``model_sizes``), cost (``model_cost``) and graph (``graph_kind``). ``bench.benchmark`` measures,
this module tabulates; ``bench.benchmark`` re-exports every name here."""

from __future__ import annotations

import gzip
import json
import os
import statistics
from typing import Optional, Union

__all__ = ["BENCHMARK_COLUMNS", "TIMED", "bench_rows", "model_sizes", "model_cost", "graph_kind"]


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


#: Columns of ``benchmark.csv``, in order: the pair's test ``accuracy`` (0..1) in that engine, the
#: model file's ``size_bytes`` and ``size_gzip_bytes``, its ``graph`` (:func:`graph_kind`), how many
#: ``rounds`` were timed; ``macs``/``params``: multiply-accumulates per image and parameter elements
#: of the model (:func:`model_cost`; an unstructured-pruned model counts its zeros); throughput
#: (images/s) and latencies (ms per batch call) are medians over the rounds,
#: ``items_per_sec_rounds`` / ``latency_p50_ms_rounds`` the rounds themselves (JSON lists).
#: ``status`` is "ok" or "error"; ``error`` is the first line of what went wrong (empty when ok); a
#: failed measurement is empty (NaN), the others stay. ``engine_version``: the engine and version
#: that ran the row (e.g. "deepsparse 1.7.0"). ``isa``, ``vnni``, ``amx``: the CPU
#: (``bench.cpu.cpu_isa``). ``precision``: what OpenVINO compiled the model's convolutions to, read
#: back (``OpenVINO.precision``); empty for DeepSparse and onnxruntime, which expose no read-back
#: (onnxruntime's CPU provider runs the graph's own types).
BENCHMARK_COLUMNS = ["model", "engine", "batch_size", "num_cores", "accuracy", "size_bytes", "size_gzip_bytes",
                     "macs", "params", "graph", "rounds", "items_per_sec", "latency_mean_ms", "latency_p50_ms", "latency_p99_ms",
                     "items_per_sec_rounds", "latency_p50_ms_rounds", "isa", "vnni", "amx", "precision",
                     "status", "error", "engine_version"]
#: the timed keys of a measurement whose median a row holds
TIMED = ("items_per_sec", "latency_mean_ms", "latency_p50_ms", "latency_p99_ms")


def bench_rows(jobs, measured: dict, errors: dict, accuracy: dict, sizes: dict, graphs: dict, num_cores: int,
               costs: Optional[dict] = None):
    """The rows of ``benchmark.csv`` (dicts with ``BENCHMARK_COLUMNS``), one per job, in job order.

    Args:
        jobs: ``(model, engine, batch_size)`` tuples.
        measured: job -> list of ``bench.benchmark.CPUBenchmark.run`` results, one per round that ran.
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
