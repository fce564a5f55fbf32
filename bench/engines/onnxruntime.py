"""onnxruntime, CPU provider: ``InferenceSession`` with ``intra_op_num_threads = num_cores``."""

from __future__ import annotations

from typing import Any, Dict, Optional

from bench.engines.base import Engine, Session
from bench.engines.deepsparse import deepsparse_benchmark
from study import requirements

__all__ = ["OnnxRuntime"]


class OnnxRuntime(Engine):
    """onnxruntime's CPU provider; the report's speed-up baseline. Timed by DeepSparse's
    ``benchmark_model(engine="onnxruntime")`` where DeepSparse is in this Python, else by
    :func:`~bench.engines.base.timed_loop` (the Python 3.12 profile); the row says which."""

    name, package, display_order, baseline = "onnxruntime", "onnxruntime", 0, True

    def open(self, path: str, batch_size: int, num_cores: Optional[int]) -> Session:
        import onnxruntime as ort  # bench stack: imported when the engine runs, so the registry loads without it

        opts = ort.SessionOptions()
        if num_cores is not None:
            opts.intra_op_num_threads = int(num_cores)
            opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        first = sess.get_inputs()[0]
        return Session(lambda batch: sess.run(None, {first.name: batch})[0],
                       (batch_size, *(int(d) for d in first.shape[1:])), sess)

    def version(self) -> str:
        import onnxruntime  # bench stack (see open)

        return f"onnxruntime {onnxruntime.__version__}"

    def time(self, path: str, batch_size: int, num_cores: int, warmup_s: float, duration_s: float,
             thread_pinning: str = "core", deepsparse_python: Optional[str] = None) -> Dict[str, Any]:
        if not requirements.has_deepsparse():
            return super().time(path, batch_size, num_cores, warmup_s, duration_s)
        result = deepsparse_benchmark(path, batch_size, num_cores, warmup_s, duration_s, thread_pinning,
                                      engine="onnxruntime")
        return {**result, "engine_version": f"{self.version()} (timed by {result['engine_version']})"}
