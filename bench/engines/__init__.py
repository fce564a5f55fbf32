"""The benchmark engines: one class per file, listed once in :data:`REGISTRY`.

Adding an engine is one new file here (a subclass of :class:`~bench.engines.base.Engine`) and one
line in :data:`REGISTRY` (ARCHITECTURE.md, "How to add a benchmark engine").
"""

from bench.engines.base import Engine, Session, timed_loop
from bench.engines.deepsparse import DeepSparse
from bench.engines.onnxruntime import OnnxRuntime
from bench.engines.openvino import OpenVINO

__all__ = ["BASELINE_ENGINE", "ENGINES", "ENGINE_INFO", "REGISTRY", "Engine", "Session", "timed_loop"]

#: The engines, in the order ``run_benchmarks`` measures them (the rows of ``benchmark.csv``).
REGISTRY: tuple = (DeepSparse(), OnnxRuntime(), OpenVINO())
#: name -> engine
ENGINE_INFO = {engine.name: engine for engine in REGISTRY}
#: engine names accepted by ``CPUBenchmark.run`` and ``onnx_accuracy``
ENGINES = tuple(ENGINE_INFO)
#: the engine whose ``dense`` row the report's speed-ups are relative to
BASELINE_ENGINE = next(engine.name for engine in REGISTRY if engine.baseline)
