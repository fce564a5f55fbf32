"""Sparsification stage: the real recipe on a tiny CNN, ONNX exports, CPU benchmark actor.

All on random data (no downloads). A module-scoped fixture runs
``recipes/prune_quantize.yaml`` with ``num_epochs=3`` (prune [0,1), fine-tune [1,2),
QAT [2,3)) for 3 steps per epoch and exports dense / pruned / quantized ONNX once;
the tests read those files back.
"""

import os

import numpy as np
import pytest
import torch
from torch import nn

from helpers import onnx_op_types, onnx_weight_sparsity
from trainables.export import export_model_onnx
from trainables.sparsify_core import (
    global_sparsity,
    is_quantized,
    load_recipe,
    recipe_phases,
    run_recipe,
    weight_sparsity,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "prune_quantize.yaml")


class TinyResNet(nn.Module):
    """Conv-BN-ReLU stem, a strided conv block and a residual block, avgpool, fc.
    (B, 3, 32, 32) float32 -> (B, 10) logits. Enough structure for SparseML's
    conv-bn-relu fusion and QAT, small enough for seconds on 2 cores."""

    def __init__(self):
        super().__init__()
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


@pytest.fixture(scope="module")
def sparsified(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparsify")
    torch.manual_seed(0)
    model = TinyResNet()
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(1))

    dense_path = export_model_onnx(model, out / "dense.onnx")
    model.eval()
    with torch.no_grad():
        dense_logits = model(images[:32]).numpy()
    model.train()

    def train_batches(epoch):
        gen = torch.Generator().manual_seed(100 + epoch)
        for _ in range(3):
            idx = torch.randint(0, len(images), (16,), generator=gen)
            yield images[idx], labels[idx]

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            return float((m(images).argmax(1) == labels).float().mean())

    hook_calls = []

    def on_pruning_end(m):
        hook_calls.append({"quantized": is_quantized(m), "sparsity": global_sparsity(m)})
        export_model_onnx(m, out / "pruned.onnx")

    manager = load_recipe(RECIPE, num_epochs=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = run_recipe(
        model, manager, train_batches, evaluate,
        optimizer=optimizer, on_pruning_end=on_pruning_end, log=None,
    )
    quant_path = export_model_onnx(model, out / "quantized.onnx", convert_qat=True)
    return {
        "dir": out,
        "model": model,
        "history": history,
        "hook_calls": hook_calls,
        "dense": dense_path,
        "dense_logits": dense_logits,
        "dense_inputs": images[:32].numpy(),
        "pruned": str(out / "pruned.onnx"),
        "quantized": quant_path,
    }


def test_recipe_schedule_defaults_and_num_epochs_override():
    full = recipe_phases(load_recipe(RECIPE))
    assert full["max_epochs"] == 55
    assert full["pruning_end_epoch"] == 30
    assert full["qat_start_epoch"] == 45
    assert full["final_sparsity"] == pytest.approx(0.8)
    assert 45 < full["freeze_bn_stats_epoch"] < full["disable_observer_epoch"] < 55
    small = recipe_phases(load_recipe(RECIPE, num_epochs=3))
    assert small["max_epochs"] == 3
    assert small["pruning_end_epoch"] < small["qat_start_epoch"] < 3


def test_run_recipe_history_and_hook(sparsified):
    hist = sparsified["history"]
    assert [r["epoch"] for r in hist] == [0, 1, 2]
    for row in hist:
        assert {"epoch", "train_loss", "test_acc", "sparsity", "lr"} <= set(row)
        assert 0.0 <= row["test_acc"] <= 1.0 and np.isfinite(row["train_loss"])
    assert hist[-1]["sparsity"] >= 0.79
    assert [r["quantized"] for r in hist] == [False, False, True]
    assert hist[0]["lr"] <= 1e-3 and hist[-1]["lr"] < hist[0]["lr"]
    # called once, on the pruned model before QAT modules were inserted
    assert len(sparsified["hook_calls"]) == 1
    assert sparsified["hook_calls"][0]["quantized"] is False
    assert sparsified["hook_calls"][0]["sparsity"] >= 0.79
    per_layer = weight_sparsity(sparsified["model"])
    assert len(per_layer) == 4 and global_sparsity(sparsified["model"]) >= 0.79


def test_pruned_onnx_weights_are_80_percent_zeros(sparsified):
    frac, per = onnx_weight_sparsity(sparsified["pruned"])
    assert len(per) == 4  # conv1..3 + fc
    assert frac >= 0.79
    assert "Conv" in onnx_op_types(sparsified["pruned"])
    dense_frac, _ = onnx_weight_sparsity(sparsified["dense"])
    assert dense_frac < 0.01


def test_quantized_onnx_has_integer_convs_and_keeps_sparsity(sparsified):
    ops = onnx_op_types(sparsified["quantized"])
    assert ops & {"ConvInteger", "QLinearConv"}, ops
    frac, per = onnx_weight_sparsity(sparsified["quantized"])  # zero point aware
    assert len(per) == 4 and frac >= 0.79


def test_dense_onnx_matches_torch_in_onnxruntime_at_batch_1_and_32(sparsified):
    import onnxruntime as ort

    sess = ort.InferenceSession(sparsified["dense"], providers=["CPUExecutionProvider"])
    x, ref = sparsified["dense_inputs"], sparsified["dense_logits"]
    out32 = sess.run(None, {"input": x})[0]
    out1 = sess.run(None, {"input": x[:1]})[0]
    assert np.abs(out32 - ref).max() < 1e-4
    assert np.abs(out1 - ref[:1]).max() < 1e-4


def _bad_recipes(tmp):
    not_yaml = tmp / "not_yaml.yaml"
    not_yaml.write_text("modifiers: [ !EpochRangeModifier {start_epoch: 0.0\n  : ][\n")
    unknown = tmp / "unknown_modifier.yaml"
    unknown.write_text("version: 1.1.0\nmodifiers:\n  - !NoSuchPruningModifier\n    start_epoch: 0.0\n")
    return {
        "missing": (str(tmp / "does_not_exist.yaml"), {}),
        "not_yaml": (str(not_yaml), {}),
        "unknown_modifier": (str(unknown), {}),
        "unknown_variable": (RECIPE, {"no_such_variable": 1}),
    }


@pytest.mark.parametrize("case", ["missing", "not_yaml", "unknown_modifier", "unknown_variable"])
def test_recipe_errors_are_one_line_value_errors_naming_the_path(tmp_path, case):
    path, overrides = _bad_recipes(tmp_path)[case]
    with pytest.raises(ValueError) as info:
        load_recipe(path, **overrides)
    msg = str(info.value)
    assert path in msg and "\n" not in msg
    if case == "unknown_modifier":
        assert "NoSuchPruningModifier" in msg


def test_convert_qat_on_a_float_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="convert_qat"):
        export_model_onnx(TinyResNet(), tmp_path / "x.onnx", convert_qat=True)
    assert not os.path.exists(tmp_path / "x.onnx")


def test_cpu_benchmark_actor_and_onnx_accuracy(sparsified):
    import ray

    from bench.benchmark import make_cpu_benchmark_actor, onnx_accuracy

    path = sparsified["dense"]
    x = np.random.RandomState(3).randn(37, 3, 32, 32).astype(np.float32)  # 37 = 4*8 + 5
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0]
    top2 = np.sort(logits, axis=1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > 1e-3  # drop near-ties: engines differ by ~1e-6
    x, labels = x[keep], logits[keep].argmax(1)
    assert len(x) > 8 and len(x) % 8  # includes a partial last batch

    assert onnx_accuracy(path, x, labels, 8, engine="onnxruntime", num_cores=1) == 1.0
    assert onnx_accuracy(path, x, labels, 8, engine="deepsparse", num_cores=1) == 1.0
    wrong = (labels + 1) % 10
    assert onnx_accuracy(path, x, wrong, 8, engine="onnxruntime", num_cores=1) == 0.0

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = make_cpu_benchmark_actor(1)
        row = ray.get(actor.run.remote(path, 1, warmup_s=0.25, duration_s=1.0), timeout=120)
        acc = ray.get(actor.accuracy.remote(path, x, labels, 8), timeout=120)
    finally:
        ray.shutdown()
    expected = {
        "model", "engine", "batch_size", "num_cores", "items_per_sec",
        "latency_mean_ms", "latency_p50_ms", "latency_p99_ms", "isa", "vnni",
    }
    assert expected <= set(row)
    assert row["model"] == path and row["engine"] == "deepsparse"
    assert row["batch_size"] == 1 and row["num_cores"] == 1
    assert row["items_per_sec"] > 0
    assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
    assert row["isa"] in {"avx2", "avx512", "neon", "sve"} and isinstance(row["vnni"], bool)
    assert acc == 1.0
