"""ONNX export of (pruned / QAT) torch models with SparseML 1.7 (stage 3, beside the sparsify task).

Export goes through ``sparseml.pytorch.utils.ModuleExporter(module, output_dir)
.export_onnx(sample_batch, name=..., convert_qat=...)``, the path SparseML's own
training scripts use. Findings from the 1.7 source (``sparseml/pytorch/utils/exporter.py``):

* ``ModuleExporter.export_onnx`` deep-copies the module, puts the copy in eval mode,
  calls ``adjust_quantization_for_onnx_export`` (clamps fake-quant ranges to int8/uint8)
  and then the function ``export_onnx(module, sample_batch, file_path, opset=14,
  disable_bn_fusing=True, convert_qat=False, dynamic_axes=None, ...)``. Calling that
  function directly skips the range adjustment, so the class is used here.
* The batch axis is dynamic by default: with ``dynamic_axes=None`` every input and
  output gets ``{0: "batch"}``. One file therefore runs at batch 1 and 32 (the
  ``convert_qat=True`` rewrite by ``ONNXToDeepsparse`` keeps the dynamic axis).
  Input is named ``"input"``, output ``"output"``.
* ``do_constant_folding = not module.training``; BatchNorm is kept as separate nodes
  (``disable_bn_fusing=True``) - DeepSparse folds it at compile time.
* ``convert_qat=True`` only converts when a submodule has a ``qconfig`` (i.e. QAT was
  applied); it then rewrites fake-quant Conv/Linear into ``ConvInteger`` /
  ``MatMulInteger`` (or ``QLinearConv`` / ``QLinearMatMul`` if the module sets
  ``export_with_qlinearconv``) with int8/uint8 weight initializers.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch
from torch import nn

from study.files import atomic_output
from trainables.sparsify_core import is_quantized

__all__ = ["export_model_onnx"]


def export_model_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    convert_qat: bool = False,
    sample_batch: Union[Sequence[int], torch.Tensor] = (1, 3, 32, 32),
) -> str:
    """Export ``model`` to ONNX at ``path`` (atomically: temp file + ``os.replace``).

    Args:
        model: torch module taking one float32 tensor (B, C, H, W) and returning
            logits (B, num_classes). It is put in eval mode for the export and its
            previous train/eval mode is restored afterwards; its weights are not
            changed (SparseML exports a deep copy).
        path: destination ``.onnx`` file; parent folders are created.
        convert_qat: convert a QAT model (fake-quant modules from SparseML's
            ``QuantizationModifier``) to a fully quantized ONNX graph
            (ConvInteger/QLinearConv, int8 weights).
        sample_batch: shape of the tracing input, or the input tensor itself. Its
            batch size does not matter: axis 0 is exported as dynamic ("batch").

    Returns:
        ``path`` as a str.

    Raises:
        ValueError: ``convert_qat=True`` but the model has no QAT modules (SparseML
            would silently write an FP32 graph), or ``sample_batch`` is not a 4-D
            shape / tensor.
    """
    path = os.fspath(path)
    if isinstance(sample_batch, torch.Tensor):
        sample = sample_batch.detach().to("cpu", torch.float32)
    else:
        shape = tuple(int(s) for s in sample_batch)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"sample_batch shape {shape} is not a positive (B, C, H, W) shape")
        gen = torch.Generator().manual_seed(0)
        sample = torch.randn(shape, generator=gen)
    if convert_qat and not is_quantized(model):
        raise ValueError(
            "convert_qat=True but the model has no quantization-aware modules (no qconfig); "
            "export it with convert_qat=False"
        )

    from sparseml.pytorch.utils import ModuleExporter

    was_training = model.training
    model.eval()
    try:
        with atomic_output(path, suffix=".onnx") as tmp:
            ModuleExporter(model, str(tmp.parent)).export_onnx(sample, name=tmp.name,
                                                               convert_qat=convert_qat)
    finally:
        model.train(was_training)
    return path
