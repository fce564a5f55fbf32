"""What every benchmark engine is: :class:`Engine`, the :class:`Session` it opens, the timed loop.

An engine opens an ONNX file at a batch size and core count (:meth:`Engine.open`), runs a batch
(``Session.run``), times itself (:meth:`Engine.time`, by default :func:`timed_loop` over its own
session), names its version and says whether it is available. ``bench.engines.REGISTRY`` lists them.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, NamedTuple, Optional

import numpy as np

__all__ = ["Engine", "Session", "timed_loop"]


class Session(NamedTuple):
    """An engine's model, opened at one batch size: ``run(batch)`` maps float32 images
    ``(batch_size, C, H, W)`` to logits ``(batch_size, num_classes)``; ``input_shape`` is
    ``(batch_size, C, H, W)``; ``handle`` is the engine's own object (e.g. OpenVINO's compiled model)."""

    run: Callable[[np.ndarray], np.ndarray]
    input_shape: tuple
    handle: Any = None


def timed_loop(run, batch: np.ndarray, warmup_s: float, duration_s: float) -> Dict[str, Any]:
    """Time ``run(batch)``: untimed calls for ``warmup_s`` s, then back-to-back calls for
    ``duration_s`` s (at least one). Returns ``items_per_sec`` (len(batch) x calls / seconds),
    ``latency_mean_ms``, ``latency_p50_ms``, ``latency_p99_ms`` (per call, ms; numpy percentiles,
    linear), ``iterations``, ``seconds_ran``."""
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        run(batch)
    latencies = []
    start = time.perf_counter()
    while not latencies or time.perf_counter() - start < duration_s:
        t0 = time.perf_counter()
        run(batch)
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000.0
    return {"items_per_sec": len(batch) * len(latencies) / seconds, "latency_mean_ms": float(ms.mean()),
            "latency_p50_ms": float(np.percentile(ms, 50)), "latency_p99_ms": float(np.percentile(ms, 99)),
            "iterations": len(latencies), "seconds_ran": seconds}


class Engine:
    """One inference engine of the bench stage. Subclasses set the class attributes and
    :meth:`open` and :meth:`version`; the rest has defaults.

    Attributes:
        name: its name in ``benchmark.csv`` and on the command line.
        package: the module it imports (checked before the bench stage: ``SPARSIFY_PACKAGES``).
        display_order: its place among a model's rows in the report (lower first).
        baseline: whether its ``dense`` row is the report's speed-up baseline; exactly one is.
    """

    name: str = ""
    package: str = ""
    display_order: int = 0
    baseline: bool = False

    def available(self, deepsparse_python: Optional[str] = None) -> bool:
        """Whether the bench stage can run it here (``deepsparse_python``: ``--deepsparse-python``)."""
        return True

    def measures_accuracy(self, deepsparse_python: Optional[str] = None) -> bool:
        """Whether it can run the test set here (an engine timed in another Python cannot)."""
        return True

    def open(self, path: str, batch_size: int, num_cores: Optional[int]) -> Session:
        """``path`` opened for ``batch_size`` images per call on ``num_cores`` threads (None: the
        engine's default). ``path`` is a private copy the engine may rewrite."""
        raise NotImplementedError

    def version(self) -> str:
        """What runs, e.g. "openvino 2026.4.1" (``benchmark.csv``'s ``engine_version``)."""
        raise NotImplementedError

    def precision(self, session: Session) -> str:
        """The precision the engine compiled the model's layers to, read back; "" if it cannot say."""
        return ""

    def time(self, path: str, batch_size: int, num_cores: int, warmup_s: float, duration_s: float,
             thread_pinning: str = "core", deepsparse_python: Optional[str] = None) -> Dict[str, Any]:
        """:func:`timed_loop` over :meth:`open` on random float32 inputs of the model's shape; adds
        ``engine_version`` and ``precision``. Engines with a benchmark API of their own override it."""
        session = self.open(path, batch_size, num_cores)
        batch = np.random.default_rng(0).standard_normal(session.input_shape).astype(np.float32)
        result = timed_loop(session.run, batch, warmup_s, duration_s)
        return {**result, "engine_version": self.version(), "precision": self.precision(session)}
