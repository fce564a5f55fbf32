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

Every file gets ``metadata_props`` (ONNX's key -> string map, ``onnx.helper.set_model_props``)
describing itself: see ``model_metadata``. The export's known-harmless warnings are silenced
here, at their source (``quiet_export``), unless ``--verbose``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch_pruning as tp
from torch import nn

from study.files import atomic_output
from study.noise import verbose
from trainables.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from trainables.compress.compat import onnx_export_kwargs
from trainables.compress.core import is_quantized

__all__ = ["export_model_onnx", "model_cost", "model_metadata", "read_metadata"]


def model_cost(model: nn.Module, image_size: int = 32) -> tuple[int, int]:
    """``(MACs, parameters)`` of ``model`` for one (1, 3, image_size, image_size) image:
    multiply-accumulates of its conv/linear/BN layers and every parameter element
    (``torch_pruning.utils.count_ops_and_params``); counted on a copy in eval mode, on CPU."""
    probe = copy.deepcopy(model).cpu().float().eval()
    macs, params = tp.utils.count_ops_and_params(probe, torch.zeros(1, 3, image_size, image_size))
    return int(macs), int(params)


def model_metadata(*, variant: str, arch: str, stem: str, source_trial: str, setup: str,
                   recipe: str, recipe_epochs: float, weight_sparsity: float,
                   test_acc: float, recipe_loss: str | None, source_variant: dict | None = None,
                   recipe_temperature: float | None = None, quantization: str | None = None,
                   macs: int | None = None, params: int | None = None, channel_ratio: float | None = None) -> dict:
    """The ``metadata_props`` of an exported classifier: everything a deployer needs to feed it
    and read its output, and where it came from. All values are strings (ONNX requires it);
    lists are JSON.

    Keys: ``input_name`` ("input"), ``input_layout`` ("NCHW"), ``input_dtype`` ("float32"),
    ``input_shape`` (JSON ``["batch", 3, 32, 32]``: any batch, RGB, 32x32 pixels),
    ``preprocessing`` (in words), ``normalization_mean`` / ``normalization_std`` (JSON lists,
    per RGB channel, of pixel values scaled to 0..1: ``trainables.data.CIFAR10_MEAN`` /
    ``CIFAR10_STD``, exactly what training used), ``output_name`` ("output"), ``output``
    (in words), ``class_names`` (JSON list, in output order), ``variant`` (dense, pruned,
    pruned_quantized or pruned_quantized_qdq), ``arch``, ``stem``, ``source_trial``, ``source_setup``, ``recipe``,
    ``recipe_epochs``, ``recipe_loss`` (pruned models only, ``recipe_loss`` not None: the setup
    whose loss the recipe trained with, ce, kd or kd_feat), ``recipe_temperature`` (pruned models
    whose recipe loss reads the teacher: the softmax temperature it used, the source trial's own),
    ``source_variant`` (JSON object: the source trial's swept values, ``--sweep``; ``{}`` without
    one), ``weight_sparsity`` (0..1 of conv/linear weights that are zero),
    ``test_acc`` (torch test accuracy 0..1 when exported), ``quantization`` (INT8 files only,
    ``quantization`` not None: how it was quantized and its graph form, in words), ``macs`` and
    ``params`` (given: multiply-accumulates per image and parameter elements,
    ``model_cost``), ``channel_ratio`` (structured models: the
    fraction of channels removed).
    """
    return {
        "input_name": "input", "input_layout": "NCHW", "input_dtype": "float32",
        "input_shape": json.dumps(["batch", 3, 32, 32]),
        "preprocessing": "RGB pixels / 255, then (x - normalization_mean) / normalization_std "
                         "per channel, laid out as (batch, channel, height, width)",
        "normalization_mean": json.dumps(list(CIFAR10_MEAN)),
        "normalization_std": json.dumps(list(CIFAR10_STD)),
        "output_name": "output",
        "output": "logits (batch, 10), float32, not softmaxed; argmax = index into class_names",
        "class_names": json.dumps(list(CIFAR10_CLASSES)),
        "variant": variant, "arch": arch, "stem": stem, "source_trial": source_trial,
        "source_setup": setup, "recipe": str(recipe), "recipe_epochs": f"{float(recipe_epochs):g}",
        **({} if recipe_loss is None else {"recipe_loss": recipe_loss}),
        **({} if recipe_temperature is None else {"recipe_temperature": f"{float(recipe_temperature):g}"}),
        "source_variant": json.dumps(source_variant or {}, sort_keys=False),
        "weight_sparsity": f"{weight_sparsity:.6f}", "test_acc": f"{test_acc:.6f}",
        **({} if quantization is None else {"quantization": quantization}),
        **{key: f"{value:g}" if isinstance(value, float) else str(value)
           for key, value in (("macs", macs), ("params", params), ("channel_ratio", channel_ratio)) if value is not None},
    }


def read_metadata(path: Union[str, os.PathLike]) -> dict:
    """The ``metadata_props`` of the ONNX file at ``path`` as a dict of strings."""
    import onnx

    return {prop.key: prop.value for prop in onnx.load(os.fspath(path), load_external_data=False).metadata_props}


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence what every export of these models prints and is known to be harmless, unless
    ``verbose()``:

    * torch's UserWarning that constant folding is unsafe "in training-amenable mode":
      SparseML exports a deep copy in eval mode, where folding is what is wanted.
    * TracerWarnings "Converting a tensor to a Python boolean": raised by SparseML's pruning
      mask (``mask_params.py``) and torch's FakeQuantize (``observer_enabled[0] == 1``) while
      tracing; those branches are constant at export (masks final, observers frozen).
    * SparseML's ``sparseml.exporters`` INFO lines "[Transform] Transformed N matches"
      (18 per INT8 export): a log of its graph rewrites, not a result.
    """
    if verbose():
        yield
        return
    exporters = logging.getLogger("sparseml.exporters")
    level = exporters.level
    exporters.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="It is recommended that constant folding",
                                    category=UserWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            yield
    finally:
        exporters.setLevel(level)


def export_model_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    convert_qat: bool = False,
    sample_batch: Union[Sequence[int], torch.Tensor] = (1, 3, 32, 32),
    metadata: Optional[Mapping[str, str]] = None,
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
            (ConvInteger/QLinearConv, int8 weights). False on a QAT model: a QDQ graph
            (QuantizeLinear/DequantizeLinear around float Conv/Gemm, weights stored as float
            initializers quantized through QuantizeLinear), the form OpenVINO and onnxruntime
            compile to INT8 kernels.
        sample_batch: shape of the tracing input, or the input tensor itself. Its
            batch size does not matter: axis 0 is exported as dynamic ("batch").
        metadata: key -> string pairs stored as the file's ``metadata_props`` (e.g.
            ``model_metadata(...)``); written before the file is renamed into place.

    Returns:
        ``path`` as a str.

    Raises:
        ValueError: ``convert_qat=True`` but the model has no QAT modules (SparseML
            would silently write an FP32 graph), or ``sample_batch`` is a shape that is
            not 4-D with every size >= 1 (a tensor is traced as given, unchecked).
    """
    path = os.fspath(path)
    sample = _sample_input(sample_batch)
    if convert_qat and not is_quantized(model):
        raise ValueError(
            "convert_qat=True but the model has no quantization-aware modules (no qconfig); "
            "export it with convert_qat=False"
        )

    from sparseml.pytorch.utils import ModuleExporter

    was_training = model.training
    model.eval()
    try:
        with atomic_output(path, suffix=".onnx") as tmp, quiet_export():
            ModuleExporter(model, str(tmp.parent)).export_onnx(sample, name=tmp.name, convert_qat=convert_qat,
                                                               **onnx_export_kwargs())
            if metadata:
                _set_metadata(str(tmp), metadata)
    finally:
        model.train(was_training)
    return path


def _sample_input(sample_batch: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
    """The tracing input of ``export_model_onnx``: the tensor as float32 on CPU, or a seeded
    ``randn`` of the shape. ValueError when a shape is not 4-D with every size >= 1."""
    if isinstance(sample_batch, torch.Tensor):
        return sample_batch.detach().to("cpu", torch.float32)
    shape = tuple(int(s) for s in sample_batch)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"sample_batch shape {shape} is not a positive (B, C, H, W) shape")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen)


def _set_metadata(path: str, metadata: Mapping[str, str]) -> None:
    """Rewrite the ONNX file ``path`` with ``metadata`` (keys and values as str) as its ``metadata_props``."""
    import onnx

    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
    onnx.save(proto, path)
