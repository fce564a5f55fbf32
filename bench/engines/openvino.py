"""OpenVINO on the CPU: ``Core().compile_model(model, "CPU", properties)``, the model reshaped to the
batch size."""

from __future__ import annotations

from typing import Optional

import numpy as np

from bench.engines.base import Engine, Session

__all__ = ["OpenVINO"]


class OpenVINO(Engine):
    """OpenVINO's CPU plugin, compiled with the latency hint (one stream), ``num_cores`` inference
    threads and ``INFERENCE_PRECISION_HINT`` f32: without it OpenVINO runs an FP32 graph in bf16 on
    CPUs with AMX or AVX512-BF16 (openvino #21590). Quantized (QDQ) layers still run in INT8."""

    name, package, display_order = "openvino", "openvino", 2

    def open(self, path: str, batch_size: int, num_cores: Optional[int]) -> Session:
        import openvino as ov  # optional heavy package: imported when the engine runs, not with the registry

        core = ov.Core()
        model = core.read_model(path)
        shape = [batch_size, *(int(d.get_length()) for d in list(model.inputs[0].get_partial_shape())[1:])]
        model.reshape({model.inputs[0].get_any_name(): shape})
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if num_cores is not None:
            config["INFERENCE_NUM_THREADS"] = int(num_cores)
        compiled = core.compile_model(model, "CPU", config)
        return Session(lambda batch: np.asarray(compiled(batch)[0]), tuple(shape), compiled)

    def version(self) -> str:
        import openvino  # optional heavy package (see open)

        return f"openvino {openvino.__version__}"

    def precision(self, session: Session) -> str:
        """The ``runtimePrecision`` of the compiled model's Convolution and FullyConnected layers,
        sorted and joined by "+": "f32" for an FP32 graph, "u8" for a QDQ INT8 graph."""
        found = set()
        for op in session.handle.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) in ("Convolution", "FullyConnected"):
                found.add(info["runtimePrecision"].astype(str))
        return "+".join(sorted(found))
