"""ONNX export of (pruned / QAT) torch models with SparseML 1.7, and ONNX inspection.

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
from typing import Dict, Optional, Sequence, Set, Tuple, Union

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from trainables.utils import atomic_output  # noqa: E402

__all__ = ["export_model_onnx", "onnx_weight_sparsity", "onnx_op_types"]


def _has_qat(model: nn.Module) -> bool:
    return any(getattr(m, "qconfig", None) for m in model.modules())


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
    if convert_qat and not _has_qat(model):
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


# op type -> (weight input index, weight zero-point input index or None)
_WEIGHT_INPUTS: Dict[str, Tuple[int, Optional[int]]] = {
    "Conv": (1, None),
    "ConvTranspose": (1, None),
    "Gemm": (1, None),
    "MatMul": (1, None),
    "ConvInteger": (1, 3),
    "MatMulInteger": (1, 3),
    "QLinearConv": (3, 5),
    "QLinearMatMul": (3, 5),
}


def _resolve_weight(
    name: str,
    inits: Dict[str, onnx.TensorProto],
    producers: Dict[str, onnx.NodeProto],
) -> Tuple[Optional[str], Optional[str]]:
    """Follow a weight input back to an initializer through (Quantize/)DequantizeLinear,
    Identity or Transpose. Returns (initializer name, zero-point initializer name)."""
    zp = None
    for _ in range(4):
        if name in inits:
            return name, zp
        node = producers.get(name)
        if node is None:
            return None, None
        if node.op_type == "DequantizeLinear":
            if zp is None and len(node.input) > 2 and node.input[2]:
                zp = node.input[2]
            name = node.input[0]
        elif node.op_type == "QuantizeLinear":
            # float weight -> Q -> DQ: zeros of the float tensor are the zeros
            zp = None
            name = node.input[0]
        elif node.op_type in ("Identity", "Transpose"):
            name = node.input[0]
        else:
            return None, None
    return None, None


def _zero_fraction(w: np.ndarray, zp: Optional[np.ndarray]) -> Tuple[int, int]:
    if zp is None or zp.size == 0:
        return int(np.count_nonzero(w == 0)), int(w.size)
    zp = zp.astype(w.dtype, copy=False)
    if zp.size == 1:
        return int(np.count_nonzero(w == zp.reshape(()))), int(w.size)
    # per-channel zero point: conv weights along axis 0, matmul B along the last axis
    if zp.shape[0] == w.shape[0]:
        zp = zp.reshape((-1,) + (1,) * (w.ndim - 1))
    else:
        zp = zp.reshape((1,) * (w.ndim - 1) + (-1,))
    return int(np.count_nonzero(w == zp)), int(w.size)


def onnx_weight_sparsity(path: Union[str, os.PathLike]) -> Tuple[float, Dict[str, float]]:
    """Fraction of zero weights in an ONNX model's conv / fully-connected weights.

    Reads the weight initializers of Conv, ConvTranspose, Gemm, MatMul (weight side
    only when it is an initializer), ConvInteger, MatMulInteger, QLinearConv and
    QLinearMatMul nodes, following DequantizeLinear / QuantizeLinear / Identity /
    Transpose back to the initializer. For integer weights an entry counts as zero
    when it equals the weight zero point (per-tensor or per-channel), since
    ``w_real = scale * (w_int - zero_point)``; a missing zero point is 0 (ONNX default).

    Args:
        path: ``.onnx`` file.

    Returns:
        ``(global_fraction, {initializer_name: fraction})``, fractions in 0..1; the
        global fraction is zeros summed over all these weights / their total size
        (0.0 when there are none).

    Raises:
        ValueError: the file does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"ONNX file not found: {path!r}")
    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    per: Dict[str, float] = {}
    zeros_total = 0
    size_total = 0
    for node in model.graph.node:
        spec = _WEIGHT_INPUTS.get(node.op_type)
        if spec is None:
            continue
        w_idx, zp_idx = spec
        if len(node.input) <= w_idx:
            continue
        w_name, zp_name = _resolve_weight(node.input[w_idx], inits, producers)
        if w_name is None or w_name in per:
            continue
        if zp_idx is not None and len(node.input) > zp_idx and node.input[zp_idx]:
            zp_name = node.input[zp_idx]
        w = numpy_helper.to_array(inits[w_name])
        if w.ndim < 2:  # a bias-like vector fed to MatMul is not a weight matrix
            continue
        zp = numpy_helper.to_array(inits[zp_name]) if zp_name in inits else None
        z, n = _zero_fraction(w, zp)
        per[w_name] = z / n if n else 0.0
        zeros_total += z
        size_total += n
    return (zeros_total / size_total if size_total else 0.0), per


def onnx_op_types(path: Union[str, os.PathLike]) -> Set[str]:
    """Set of node ``op_type`` strings in the ONNX graph at ``path`` (main graph only).

    Raises:
        ValueError: the file does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"ONNX file not found: {path!r}")
    return {n.op_type for n in onnx.load(path).graph.node}
