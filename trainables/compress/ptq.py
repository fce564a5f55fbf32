"""The dense INT8 peer: static post-training quantization of ``dense.onnx`` with NNCF's ONNX backend.

``nncf.quantize(onnx.ModelProto, nncf.Dataset(...))`` (NNCF 2.9) collects activation ranges on the
calibration images, quantizes weights per channel and activations per tensor to INT8, applies fast
bias correction, and returns an ONNX graph in QDQ form (``QuantizeLinear``/``DequantizeLinear``
around FP32 ``Conv``/``Gemm``), which DeepSparse, onnxruntime and OpenVINO all run as INT8.

Why NNCF and not onnxruntime's ``quantize_static``: in the pinned onnxruntime (1.19) the
quantization tool reads ``onnx.TensorProto.INT4`` at import, which onnx 1.14 (SparseML's bound)
lacks; NNCF 2.9 is the newest NNCF that runs with torch 2.1 (3.x reads ``torch.uint16``) and
needs nothing from onnx newer than 1.14.

Threads: NNCF 2.9 runs the model for its statistics in onnxruntime sessions that it opens itself
(``nncf.onnx.engine.ONNXEngine``, created by ``nncf.common.factory.EngineFactory.create(model)``
with no session options), so onnxruntime would size its intra-op pool to every physical core of
the machine, not the task's CPU share (onnxruntime #29510); and onnxruntime's default CPU build
ignores ``OMP_NUM_THREADS``. ``quantize_dense(threads=N)`` therefore hands NNCF, for the length of
the call, an ``onnxruntime`` module whose sessions open with ``SessionOptions.intra_op_num_threads = N``
(``ort_threads``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["calibration_images", "ort_threads", "quantize_dense", "quantize_onnx"]


def calibration_images(train_images_float32: Any, count: int, seed: int) -> np.ndarray:
    """``count`` training images (or all, if fewer) chosen without replacement by ``seed``:
    (count, 3, H, W) float32, normalized as the model was trained. ValueError for ``count`` < 1."""
    if count < 1:
        raise ValueError(f"calibration needs at least 1 image, got {count}")
    x = np.asarray(train_images_float32.numpy() if hasattr(train_images_float32, "numpy") else train_images_float32,
                   dtype=np.float32)
    pick = np.random.default_rng(seed).permutation(len(x))[:count]
    return np.ascontiguousarray(x[np.sort(pick)])


class _OrtWithThreads:
    """The ``onnxruntime`` module as ``nncf.onnx.engine`` sees it inside ``ort_threads``: its
    ``InferenceSession`` sets ``threads`` intra-op threads and one inter-op thread on the session
    options it is given (NNCF 3.x passes its own) or makes (NNCF 2.9 passes none)."""

    def __init__(self, module, threads: int):
        self._module, self._threads = module, threads

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def InferenceSession(self, model, sess_options=None, **kwargs):  # noqa: N802 (onnxruntime's name)
        options = sess_options if sess_options is not None else self._module.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self._threads, 1
        return self._module.InferenceSession(model, sess_options=options, **kwargs)


@contextlib.contextmanager
def ort_threads(threads: int) -> Iterator[None]:
    """Within the block, every onnxruntime session NNCF opens (``nncf.onnx.engine.ONNXEngine``,
    NNCF 2.9 and 3.x) runs with ``threads`` intra-op threads (the caller's included) and one
    inter-op thread; ``nncf.onnx.engine.rt`` is put back after. ValueError for ``threads`` < 1."""
    if threads < 1:
        raise ValueError(f"onnxruntime threads must be >= 1, got {threads}")
    from nncf.onnx import engine

    original = engine.rt
    engine.rt = _OrtWithThreads(original, threads)  # ONNXEngine.__init__ looks ``rt`` up at each call
    try:
        yield
    finally:
        engine.rt = original


def quantize_dense(dense_path: str | os.PathLike, out_path: str | os.PathLike, images: np.ndarray,
                   metadata: dict | None = None, threads: int | None = None) -> int:
    """Write ``out_path``: ``dense_path`` (FP32 ONNX, one input (B, 3, H, W)) statically quantized
    to INT8 QDQ by NNCF, calibrated on ``images`` ((N, 3, H, W) float32, normalized), one image per
    calibration item (NNCF's ``subset_size`` counts items, so all N are used); ``metadata`` (str -> str) replaces the ``metadata_props`` it carries over.
    ``threads``: onnxruntime intra-op threads of NNCF's sessions (the task's CPU share, ``ort_threads``;
    None: onnxruntime's default, every physical core).
    Returns N, the number of calibration images. ValueError when ``images`` is not 4-D or empty."""
    import onnx

    import logging

    from study.noise import QUIET_LOGGERS, verbose

    logger = logging.getLogger("nncf")
    if not verbose() and not getattr(logger, "_study_quiet", False):
        # NNCF sets its logger's level when imported (and logs at once): a filter outlives that
        logger.addFilter(lambda record: record.levelno >= QUIET_LOGGERS["nncf"][0])
        logger._study_quiet = True
    import nncf

    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"calibration images must be (N, C, H, W) with N > 0, got shape {images.shape}")
    model = onnx.load(os.fspath(dense_path))
    input_name = model.graph.input[0].name
    items = [images[i:i + 1] for i in range(len(images))]
    with ort_threads(threads) if threads is not None else contextlib.nullcontext():
        quantized = nncf.quantize(model, nncf.Dataset(items, lambda item: {input_name: item}),
                                  subset_size=len(images))
    if metadata is not None:
        del quantized.metadata_props[:]
        for key, value in metadata.items():
            quantized.metadata_props.add(key=str(key), value=str(value))
    onnx.save(quantized, os.fspath(out_path))
    return len(images)


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, images: np.ndarray, *,
                  threads: int, variant: str) -> int:
    """Write ``out_path`` atomically: ``fp32_path`` INT8 by ``quantize_dense``, its
    ``metadata_props`` those of ``fp32_path`` (less its ``test_acc``, the FP32 model's) with
    ``variant``, ``quantization`` (how, in words) and ``calibration_images`` (N). Returns N."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(os.fspath(fp32_path), load_external_data=False).metadata_props}
    meta.pop("test_acc", None)  # the FP32 model's; the INT8 model's is measured later (bench, summary)
    meta.update(variant=variant, calibration_images=str(len(images)),
                quantization="static post-training INT8 (NNCF, ONNX backend, QDQ; weights per channel)")
    tmp = Path(out_path).with_name(Path(out_path).name + ".tmp")
    count = quantize_dense(fp32_path, tmp, images, metadata=meta, threads=threads)
    tmp.replace(out_path)
    return count
