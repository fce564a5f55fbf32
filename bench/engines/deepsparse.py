"""DeepSparse 1.7: timed by its own benchmark API, in this Python or through the
``deepsparse.benchmark`` command of another one (``--deepsparse-python``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from bench.engines.base import Engine, Session
from study import requirements

__all__ = ["DeepSparse", "deepsparse_benchmark", "deepsparse_command", "foreign_python_env"]

_RENAMED = {"mean": "latency_mean_ms", "median": "latency_p50_ms", "99.0%": "latency_p99_ms"}


def deepsparse_benchmark(path: str, batch_size: int, num_cores: int, warmup_s: float, duration_s: float,
                         thread_pinning: str = "core", engine: str = "deepsparse") -> Dict[str, Any]:
    """``deepsparse.benchmark.benchmark_model`` (scenario sync: one stream, a warm-up, then
    back-to-back calls; ``engine`` "deepsparse" or "onnxruntime", whose ``ORTEngine`` sets
    ``intra_op_num_threads = num_cores`` and rewrites the file's batch size in place). Returns
    :func:`~bench.engines.base.timed_loop`'s keys and ``engine_version`` ("deepsparse 1.7.0")."""
    from deepsparse import __version__  # optional: no DeepSparse wheel past Python 3.11
    from deepsparse.benchmark.benchmark_model import benchmark_model

    result = benchmark_model(model_path=path, batch_size=int(batch_size), num_cores=int(num_cores), scenario="sync",
                             time=float(duration_s), warmup_time=float(warmup_s), engine=engine,
                             thread_pinning=thread_pinning, quiet=True)["benchmark_result"]
    return {**{_RENAMED.get(k, k): v for k, v in result.items()}, "engine_version": f"deepsparse {__version__}"}


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

    Returns ``deepsparse.benchmark``'s ``benchmark_result`` keys (``items_per_sec``, ``mean``,
    ``median``, ``99.0%`` in ms per call, ``iterations``, ``seconds_ran``) plus ``version``
    (DeepSparse's). Raises RuntimeError with the command's last stderr line when it fails."""
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


class DeepSparse(Engine):
    """Neural Magic's DeepSparse 1.7 (archived June 2025; the one engine here that turns unstructured
    sparsity into speed). Runs in this Python (3.10/3.11), or only timed through
    ``--deepsparse-python`` (its rows then carry no accuracy)."""

    name, package, display_order = "deepsparse", "deepsparse", 1

    def available(self, deepsparse_python: Optional[str] = None) -> bool:
        return requirements.runs_deepsparse(deepsparse_python)

    def measures_accuracy(self, deepsparse_python: Optional[str] = None) -> bool:
        return requirements.has_deepsparse()

    def open(self, path: str, batch_size: int, num_cores: Optional[int]) -> Session:
        from deepsparse import Engine as Compiled  # optional: no DeepSparse wheel past Python 3.11

        compiled = Compiled(model=path, batch_size=batch_size, num_cores=num_cores)
        return Session(lambda batch: compiled.run([batch])[0], tuple(compiled.input_shapes[0]), compiled)

    def version(self) -> str:
        from deepsparse import __version__  # optional (see open)

        return f"deepsparse {__version__}"

    def time(self, path: str, batch_size: int, num_cores: int, warmup_s: float, duration_s: float,
             thread_pinning: str = "core", deepsparse_python: Optional[str] = None) -> Dict[str, Any]:
        if deepsparse_python:
            result = deepsparse_command(deepsparse_python, path, batch_size, num_cores, warmup_s, duration_s,
                                        thread_pinning)
            return {**{_RENAMED.get(k, k): v for k, v in result.items() if k != "version"},
                    "engine_version": f"deepsparse {result['version']}"}
        if not requirements.has_deepsparse():
            raise ValueError("deepsparse is not installed in this Python; pass --deepsparse-python")
        return deepsparse_benchmark(path, batch_size, num_cores, warmup_s, duration_s, thread_pinning)
