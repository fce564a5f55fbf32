"""Top-1 accuracy of an ONNX classifier in one engine (``onnx_accuracy``), and what it shares with
the timing in ``bench.benchmark``: the argument checks (``check_args``) and the private copy of the
model file that an engine may rewrite (``private_copy``). ``bench.benchmark`` re-exports
``onnx_accuracy`` and ``private_copy``."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional, Union

import numpy as np

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS before DeepSparse is imported)
from bench.engines import ENGINE_INFO, ENGINES

__all__ = ["onnx_accuracy", "private_copy", "check_args"]


def check_args(model_path: str, batch_size: Any, engine: str, num_cores: Any) -> None:
    """ValueError unless ``model_path`` is a file, ``batch_size`` an int >= 1, ``engine`` one of
    ``bench.engines.ENGINES`` and ``num_cores`` None or an int >= 1."""
    if not os.path.isfile(model_path):
        raise ValueError(f"ONNX model not found: {model_path!r}")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not supported; allowed: {', '.join(ENGINES)}")
    if num_cores is not None and (
        not isinstance(num_cores, (int, np.integer)) or isinstance(num_cores, bool) or num_cores < 1
    ):
        raise ValueError(f"num_cores must be an int >= 1 or None, got {num_cores!r}")


@contextlib.contextmanager
def private_copy(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Yield the path of a copy of the ONNX file ``path`` in a new temporary folder, removed
    afterwards: engines that rewrite their model file (see ``bench.benchmark``'s docstring) rewrite
    the copy. Raises OSError when ``path`` cannot be read."""
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        copy = os.path.join(folder, os.path.basename(os.fspath(path)))
        shutil.copyfile(path, copy)
        yield copy


def _to_numpy_f32(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # torch tensor
        images = images.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    return arr


def onnx_accuracy(
    path: Union[str, os.PathLike],
    images_float32: Any,
    labels: Any,
    batch_size: int,
    engine: str = "deepsparse",
    num_cores: Optional[int] = None,
) -> float:
    """Top-1 accuracy of an exported classifier on a labelled image set.

    Args:
        path: ``.onnx`` file; one input (B, C, H, W) float32, first output logits
            (B, num_classes).
        images_float32: (N, C, H, W) float32, already normalized exactly as the model
            was trained (numpy array or torch tensor).
        labels: (N,) integer class ids (numpy or torch).
        batch_size: engine batch size. DeepSparse compiles for a fixed batch size, so
            the last partial batch is zero-padded to ``batch_size`` and the padded
            rows are dropped (ONNX Runtime is fed the same way).
        engine: "deepsparse" (``deepsparse.Engine``), "onnxruntime"
            (``onnxruntime.InferenceSession``, CPU provider) or "openvino" (compiled for the CPU at
            ``batch_size``).
        num_cores: cores for the engine (DeepSparse ``num_cores``, ORT
            ``intra_op_num_threads``); None = the engine's default (all).

    Returns:
        Fraction 0..1 of images whose argmax logit equals the label.

    Raises:
        ValueError: missing file, unknown engine, bad batch_size/num_cores, images
            not 4-D, or images/labels of different length or empty.
    """
    path = os.fspath(path)
    check_args(path, batch_size, engine, num_cores)
    x = _to_numpy_f32(images_float32)
    y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    y = y.astype(np.int64).reshape(-1)
    if x.ndim != 4:
        raise ValueError(f"images_float32 must be (N, C, H, W), got shape {x.shape}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as images (> 0), got {len(x)} images and {len(y)} labels")

    with private_copy(path) as copy:
        return _accuracy(copy, x, y, int(batch_size), engine, num_cores)


def _accuracy(path: str, x: np.ndarray, y: np.ndarray, batch_size: int, engine: str,
              num_cores: Optional[int]) -> float:
    """The loop of :func:`onnx_accuracy` on checked inputs (``path`` may be rewritten)."""
    run = ENGINE_INFO[engine].open(path, batch_size, num_cores).run
    correct = 0
    n = len(x)
    for start in range(0, n, batch_size):
        batch = x[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            pad = np.zeros((batch_size - real,) + batch.shape[1:], dtype=np.float32)
            batch = np.concatenate([batch, pad], axis=0)
        logits = np.asarray(run(np.ascontiguousarray(batch)))[:real]
        correct += int((logits.argmax(axis=1) == y[start : start + real]).sum())
    return correct / n
