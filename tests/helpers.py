"""Helpers the tests share: running orchestrate.py, a few real CIFAR-10 images out of the
offline tarball (``trainables.data.extract_image_subset``, re-exported here), reading exported
ONNX models back (weight sparsity, op types, input shape), and a tiny ResNet-like model for
recipe tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, Optional, Set, Tuple, Union

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from study.requirements import has_deepsparse
from trainables.data import extract_image_subset  # noqa: F401  (re-exported: conftest.py)

#: DeepSparse importable here: always on the default profile (Python 3.10/3.11), never on 3.12/3.13.
HAS_DEEPSPARSE = has_deepsparse()
#: For tests that run DeepSparse in this Python: skipped only on Python >= 3.12 without it (the Python
#: 3.12 profile); on 3.10/3.11 a missing DeepSparse fails them.
needs_deepsparse = pytest.mark.skipif(
    not HAS_DEEPSPARSE and sys.version_info >= (3, 12),
    reason="deepsparse 1.7 has no wheel past Python 3.11 (the bench stage runs it through --deepsparse-python)")


REPO_ROOT = Path(__file__).resolve().parent.parent
#: The smoke preset on the tests' CIFAR-10 tree (``conftest.cifar_root``: 150 training and 100 test
#: images, half the preset's subsets, so each whole-pipeline launch trains half as long), with
#: 0.1 s measurements after 0.05 s of warm-up (the preset's two rounds kept): the tests check what
#: the benchmark records, not its speed. Every launch and dry run on such a run passes these, so
#: their fingerprints agree.
SMOKE = ("--preset", "smoke", "--train-subset", "150", "--test-subset", "100", "--bench-warmup-seconds", "0.05",
         "--bench-seconds", "0.1")


#: Logical CPUs of each of the two Ray nodes of ``conftest.two_nodes``.
NODE_CPUS = 2


def orchestrate_command(out: Path, cifar_root: Path, *args: str) -> list:
    """``python orchestrate.py SMOKE... --data-root CIFAR_ROOT --output-dir OUT --no-dashboard
    ARGS...`` as an argv list (run it from the repository root)."""
    import sys

    return [sys.executable, str(REPO_ROOT / "orchestrate.py"), *SMOKE, "--data-root",
            str(cifar_root), "--output-dir", str(out), "--no-dashboard", *map(str, args)]


def run_orchestrate(out: Path, cifar_root: Path, *args: str, timeout: float = 1200, env: dict | None = None,
                    log: str = "orchestrate.log") -> Path:
    """Run ``orchestrate_command(out, cifar_root, *args)`` to its end; its stdout+stderr go to
    ``OUT/<log>``. ``env``: extra environment variables. Returns ``out``; AssertionError with the
    output's tail when it exits non-zero."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(orchestrate_command(out, cifar_root, *args), cwd=REPO_ROOT,
                          env=dict(os.environ, RAY_DEDUP_LOGS="0", **(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    (out / log).write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"run {args} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return out


def kill_orchestrate_when(out: Path, cifar_root: Path, condition, *args: str, timeout: float = 900,
                          log: str = "interrupted.log", env: dict | None = None) -> None:
    """Start ``orchestrate_command(out, cifar_root, *args)`` in a process group of its own (the
    driver and its local Ray), poll ``condition()`` every 0.5 s and SIGKILL the whole group once it
    holds; output to ``OUT/<log>``; ``env``: extra environment variables. AssertionError when the
    run ends first or ``timeout`` (seconds) passes."""
    import signal
    import subprocess
    import time

    out.mkdir(parents=True, exist_ok=True)
    with open(out / log, "a") as stream:
        proc = subprocess.Popen(orchestrate_command(out, cifar_root, *args), cwd=REPO_ROOT, stdout=stream,
                                stderr=subprocess.STDOUT, env=dict(os.environ, RAY_DEDUP_LOGS="0", **(env or {})),
                                start_new_session=True)
        deadline = time.time() + timeout
        try:
            while not condition():
                assert proc.poll() is None, "the run ended before it could be interrupted"
                assert time.time() < deadline, "the run did not reach the point of interruption"
                time.sleep(0.5)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def copy_run(source: Path, dest: Path, *names: str) -> Path:
    """``dest`` holding copies of ``names`` (files or folders) of the run directory ``source``
    (metadata kept, so a skipped stage's files keep their mtime). Returns ``dest``."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        (shutil.copytree if (source / name).is_dir() else shutil.copy2)(source / name, dest / name)
    return dest


def sparsify_in_process(run_dir: Path, setup: str, seed: int = 0, threads: int = 2) -> dict:
    """The sparsify stage's recipe, in this process, on the (``setup``, ``seed``) trial of the
    students' experiment in ``run_dir`` (a finished or copied run: its ``config.json`` and
    ``teacher.pt``), from that trial's best checkpoint, with the settings the stage would use
    (``stages.sparsify.sparsify_settings``; the smoke run's task had 2 threads). Writes into
    ``run_dir`` as the stage does; returns the summary."""
    import dataclasses
    import json

    from ray import tune
    from ray.tune.result_grid import ResultGrid

    import stages.sparsify
    from driver.results import best_checkpoint
    from study import RunLayout, StudyConfig, make_config, selection_metric
    from trainables.batches import study_data
    from trainables.compress.sparsify import sparsify_student

    saved = json.loads((run_dir / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(StudyConfig)} - {"preset"}
    config = make_config(saved["preset"], **{**{k: v for k, v in saved.items() if k in fields},
                                             "output_dir": str(run_dir), "setups": tuple(saved["setups"]),
                                             "bench_batch_sizes": tuple(saved["bench_batch_sizes"])})
    grid = ResultGrid(tune.ExperimentAnalysis(str(RunLayout(run_dir).students_dir)))
    best = next(r for r in grid if (r.config["setup"], r.config["seed"]) == (setup, seed))
    checkpoint, _ = best_checkpoint(best, selection_metric(config))
    settings, teacher = stages.sparsify.sparsify_settings(config, best, RunLayout(run_dir).teacher, threads)
    return sparsify_student(checkpoint, study_data(config), settings, teacher=teacher)


#: The sparsify/bench stack: what ``blocked_env`` hides from every Python process.
BLOCKED = ("sparseml", "deepsparse", "sparsezoo", "onnx", "onnxruntime", "openvino", "nncf")

BLOCKER = f'''
import sys

BLOCKED = {BLOCKED!r}


class _Hide:
    """Wraps an import finder so that it never finds the sparsify/bench stack: ``import onnx``
    raises ModuleNotFoundError and ``importlib.util.find_spec("onnx")`` is None, as if the
    packages were not installed."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]
'''


def blocked_env(folder: Path) -> dict:
    """Environment variables under which every Python process (Ray's workers too) loads a
    ``sitecustomize`` written into ``folder`` that hides ``BLOCKED``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


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


def residual_adds(path: Union[str, os.PathLike]) -> list:
    """For each residual Add of the ONNX graph at ``path`` (an Add whose two inputs are both
    computed by nodes, not initializers or Constants; bias Adds of a ConvInteger graph have one
    constant input), whether a ReLU follows it: every consumer is a ``Relu``, or a uint8
    ``QuantizeLinear`` with zero point 0, which clamps at 0 and so is a ReLU folded into the
    quantization (SparseML's ``convert_qat`` writes it that way).

    Returns:
        list of bool, one per residual Add, in graph order.
    """
    graph = onnx.load(os.fspath(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def clamps_at_zero(node) -> bool:
        if node.op_type == "Relu":
            return True
        zero_point = inits.get(node.input[2]) if node.op_type == "QuantizeLinear" and len(node.input) > 2 else None
        return zero_point is not None and zero_point.dtype == np.uint8 and not zero_point.any()

    return [all(clamps_at_zero(c) for c in consumers.get(node.output[0], [])) and bool(consumers.get(node.output[0]))
            for node in graph.node
            if node.op_type == "Add"
            and all(i in producers and producers[i].op_type != "Constant" for i in node.input)]


def onnx_input_shape(path: Union[str, os.PathLike]) -> list:
    """Shape of the first graph input of the ONNX file at ``path``: one entry per axis, the
    symbolic name (``dim_param``, e.g. "batch") of a dynamic axis, else its fixed size (int)."""
    dims = onnx.load(os.fspath(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param if d.dim_param else d.dim_value for d in dims]


class TinyResNet(torch.nn.Module):
    """Conv-BN-ReLU stem, a strided conv block and a residual block, avgpool, fc.
    (B, 3, 32, 32) float32 -> (B, 10) logits. Enough structure for SparseML's
    conv-bn-relu fusion and QAT, small enough for seconds on 2 cores."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))
