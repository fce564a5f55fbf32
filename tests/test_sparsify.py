"""Sparsification stage: the real recipe on a tiny CNN, ONNX exports, CPU benchmark actor.

All on random data (no downloads). A module-scoped fixture runs
``recipes/prune_quantize.yaml`` with ``num_epochs=3`` (prune [0,1), fine-tune [1,2),
QAT [2,3)) for 3 steps per epoch and exports dense / pruned / quantized ONNX once (the
quantized one with ``model_metadata``); the tests read those files back. Each property of
an export (sparsity read back from the file, integer convs, agreement with torch in
ONNX Runtime and DeepSparse, metadata) is checked here once.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (TinyResNet, needs_deepsparse, onnx_input_shape, onnx_op_types, onnx_weight_sparsity,
                     residual_adds)
from models import build_student
from trainables.compress.export import export_model_onnx, model_metadata, read_metadata
from trainables.compress.core import (
    RecipeRun,
    global_sparsity,
    is_quantized,
    load_recipe,
    recipe_phases,
    weight_sparsity,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "prune_quantize.yaml")


METADATA = model_metadata(variant="pruned_quantized", arch="resnet18", stem="cifar", source_trial="t_00000",
                          setup="kd", recipe="recipes/prune_quantize.yaml", recipe_epochs=3.0,
                          weight_sparsity=0.8, test_acc=0.25, recipe_loss="kd")


@pytest.fixture(scope="module")
def sparsified(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparsify")
    torch.manual_seed(0)
    model = TinyResNet()
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the export must carry them
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
            bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(3))

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
    history = RecipeRun(model, manager, optimizer, train_batches, evaluate,
                        on_pruning_end=on_pruning_end, log=None).run()
    quant_path = export_model_onnx(model, out / "quantized.onnx", convert_qat=True, metadata=METADATA)
    qdq_path = export_model_onnx(model, out / "quantized_qdq.onnx")  # the same QAT model, convert_qat=False
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
        "quantized_qdq": qdq_path,
        "images": images.numpy(),
    }


def test_qat_student_keeps_a_relu_after_every_residual_add(tmp_path):
    """The recipe's QAT (conv-bn-relu fusion, fake-quant) on the project's student, exported as
    ConvInteger (``convert_qat=True``) and as QDQ: every residual Add feeds a ReLU in both INT8
    graphs, as in the dense export (with torchvision's shared ``self.relu`` none did)."""
    torch.manual_seed(0)
    model = build_student("resnet18")  # 2 + 2 + 1 + 2 blocks: 7 residual Adds
    dense = residual_adds(export_model_onnx(model, tmp_path / "dense.onnx"))
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    RecipeRun(model, load_recipe(RECIPE, num_epochs=3), optimizer, lambda epoch: [(images, labels)],
              lambda m: 0.0, log=None).run()
    assert is_quantized(model)
    convinteger = export_model_onnx(model, tmp_path / "int8.onnx", convert_qat=True)
    qdq = export_model_onnx(model, tmp_path / "int8_qdq.onnx", convert_qat=False)
    assert "ConvInteger" in onnx_op_types(convinteger) and "QuantizeLinear" in onnx_op_types(qdq)
    assert dense == residual_adds(convinteger) == residual_adds(qdq) == [True] * 7


@pytest.mark.parametrize("epochs, steps, outcome", [
    (2, 1, "error"),    # prune [0, 0.5), QAT from 1: steps at epochs 0 and 1, none in [0.5, 1)
    (2, 3, "note"),     # steps at 0, 1/3 in the window, 2/3 finishes it: 2 of the 30 updates asked for
    (55, 1, ""),        # the full recipe at one step per epoch: 30 steps for 30 updates
    (3, 40, ""),        # 40 steps in [0, 1): more than the 30 updates
])
def test_a_pruning_window_without_steps_is_refused_and_a_short_one_said(epochs, steps, outcome):
    from trainables.compress.recipe import check_pruning_window

    phases = recipe_phases(load_recipe(RECIPE, num_epochs=epochs))
    assert phases["mask_updates"] == 30
    if outcome == "error":
        with pytest.raises(ValueError, match=r"pruning ends at epoch 0.5 and QAT starts at epoch 1, but with 1 "
                                             r"optimizer step\(s\) per epoch no step falls between them"):
            check_pruning_window(phases, steps)
        with pytest.raises(ValueError, match="--train-subset"):  # before any step is taken
            RecipeRun(TinyResNet(), load_recipe(RECIPE, num_epochs=epochs), None, lambda e: [], lambda m: 0.0,
                      steps_per_epoch=steps)
    elif outcome == "note":
        assert check_pruning_window(phases, steps) == (
            "the pruning window [0, 0.5) holds 2 optimizer step(s), fewer than the 30 mask updates the recipe "
            "asks for: the mask is updated at each of them")
    else:
        assert check_pruning_window(phases, steps) == ""


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


def test_qdq_export_of_the_qat_model_is_qdq_sparse_and_agrees_with_the_convinteger_file(sparsified):
    """``convert_qat=False`` on the QAT model (``pruned_quantized_qdq``): QuantizeLinear /
    DequantizeLinear around float Conv/Gemm (the graph OpenVINO and onnxruntime run in INT8), no
    ConvInteger; its weights keep the recipe's 80 % zeros; in onnxruntime it predicts what the
    ConvInteger file predicts (argmax on >= 95 % of the 48 images, logits within 2 % of their range)."""
    import onnxruntime as ort

    from bench.benchmark import graph_kind

    ops = onnx_op_types(sparsified["quantized_qdq"])
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops, ops
    assert not ops & {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul"}, ops
    assert graph_kind(sparsified["quantized_qdq"]) == "QDQ INT8"
    assert graph_kind(sparsified["quantized"]) == "ConvInteger INT8"
    frac, per = onnx_weight_sparsity(sparsified["quantized_qdq"])
    assert len(per) == 4 and frac >= 0.79
    assert frac == pytest.approx(global_sparsity(sparsified["model"]), abs=0.005)
    x = sparsified["images"]
    qdq, convinteger = (ort.InferenceSession(sparsified[key], providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                        for key in ("quantized_qdq", "quantized"))
    assert qdq.shape == convinteger.shape == (48, 10)
    assert (qdq.argmax(1) == convinteger.argmax(1)).mean() >= 0.95
    assert np.abs(qdq - convinteger).max() < 0.02 * np.abs(convinteger).max()


def test_dense_onnx_matches_torch_in_onnxruntime_at_batch_1_and_32(sparsified):
    """Catches an export that drops or refolds the BatchNorm statistics, fixes the batch axis,
    or that onnxruntime reads differently (max abs difference of the logits < 1e-4)."""
    import onnxruntime as ort

    path, x, ref = sparsified["dense"], sparsified["dense_inputs"], sparsified["dense_logits"]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (1, 32):
        out = sess.run(None, {"input": x[:batch]})[0]
        assert out.shape == ref[:batch].shape and np.abs(out - ref[:batch]).max() < 1e-4, batch


@needs_deepsparse
def test_dense_onnx_matches_torch_in_deepsparse_at_batch_1_and_32(sparsified):
    """As above in DeepSparse (max abs difference of the logits < 1e-3)."""
    from deepsparse import Engine

    path, x, ref = sparsified["dense"], sparsified["dense_inputs"], sparsified["dense_logits"]
    for batch in (1, 32):
        out = Engine(model=path, batch_size=batch, num_cores=1).run([np.ascontiguousarray(x[:batch])])[0]
        assert out.shape == ref[:batch].shape and np.abs(out - ref[:batch]).max() < 1e-3, batch


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


@needs_deepsparse
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


@needs_deepsparse
def test_benchmarks_measure_a_copy_and_leave_the_model_as_exported(sparsified):
    from bench.benchmark import CPUBenchmark
    from study.files import sha256_file

    path = sparsified["dense"]
    before = sha256_file(path)
    assert onnx_input_shape(path) == ["batch", 3, 32, 32]
    bench = CPUBenchmark(num_cores=1)
    for engine in ("onnxruntime", "deepsparse"):  # ORTEngine rewrote the batch size in place
        row = bench.run(path, 32, engine=engine, warmup_s=0.1, duration_s=0.3)
        assert row["items_per_sec"] > 0 and row["model"] == path
    bench.accuracy(path, sparsified["dense_inputs"], np.zeros(32, dtype=np.int64), 8)
    assert sha256_file(path) == before
    assert onnx_input_shape(path) == ["batch", 3, 32, 32]


@needs_deepsparse
def test_a_failing_benchmark_is_a_row_and_the_others_are_measured(sparsified, tmp_path):
    import ray

    from bench.benchmark import BENCHMARK_COLUMNS, run_benchmarks

    broken = tmp_path / "pruned.onnx"
    broken.write_bytes(b"not an onnx file")
    x = sparsified["dense_inputs"]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        table, accuracies = run_benchmarks({"dense": sparsified["dense"], "pruned": str(broken)}, x,
                                           np.zeros(len(x), dtype=np.int64), num_cores=1,
                                           batch_sizes=(1,), warmup_s=0.1, duration_s=0.3)
    finally:
        ray.shutdown()
    assert list(table.columns) == BENCHMARK_COLUMNS
    rows = {(r.model, r.engine): r for r in table.itertuples()}
    engines = ("deepsparse", "onnxruntime", "openvino")
    assert set(rows) == {(model, engine) for model in ("dense", "pruned") for engine in engines}
    for engine in engines:
        key = ("dense", engine)
        assert rows[key].status == "ok" and rows[key].error == "" and rows[key].items_per_sec > 0, key
        failed = rows[("pruned", engine)]
        assert failed.status == "error" and failed.error and "\n" not in failed.error
        assert np.isnan(failed.items_per_sec) and np.isnan(failed.latency_p50_ms)
        assert failed.graph == "unreadable" and failed.size_bytes == len(b"not an onnx file")
    assert accuracies["pruned"] is None and 0.0 <= accuracies["dense"] <= 1.0


def test_exported_models_describe_themselves(sparsified):
    """Catches metadata that is lost or altered on the way into the INT8 file (``convert_qat``
    rewrites the graph after the export) or a fixed batch axis."""
    import json

    path = sparsified["quantized"]
    props = read_metadata(path)
    assert props == METADATA
    assert (props["input_layout"], props["input_dtype"], props["input_name"]) == ("NCHW", "float32", "input")
    assert json.loads(props["normalization_mean"]) == [0.4914, 0.4822, 0.4465]
    assert json.loads(props["normalization_std"]) == [0.2470, 0.2435, 0.2616]
    assert json.loads(props["class_names"])[:2] == ["airplane", "automobile"]
    assert (props["source_trial"], props["source_setup"], props["recipe_epochs"]) == ("t_00000", "kd", "3")
    assert props["recipe_loss"] == "kd"
    dense = model_metadata(variant="dense", arch="resnet18", stem="cifar", source_trial="t", setup="kd",
                           recipe="r.yaml", recipe_epochs=3.0, weight_sparsity=0.0, test_acc=0.3,
                           recipe_loss=None)
    assert "recipe_loss" not in dense  # the recipe never trained the dense model
    assert onnx_input_shape(path) == ["batch", 3, 32, 32]


# ------------------------------------------------------------------ bench without DeepSparse in this Python


def test_onnxruntime_timed_loop_and_accuracy_without_deepsparse(sparsified, monkeypatch):
    """The Python 3.12 profile's bench path (onnxruntime by ``timed_loop``), on any profile: DeepSparse hidden."""
    import onnxruntime

    import bench.benchmark as benchmark
    from study.files import sha256_file

    monkeypatch.setattr(benchmark.requirements, "has_deepsparse", lambda: False)  # every engine reads it there
    path = sparsified["quantized"]
    before = sha256_file(path)
    row = benchmark.CPUBenchmark(num_cores=1).run(path, 4, engine="onnxruntime", warmup_s=0.1, duration_s=0.3)
    assert row["engine"] == "onnxruntime" and row["batch_size"] == 4 and row["num_cores"] == 1
    assert row["engine_version"] == f"onnxruntime {onnxruntime.__version__}"
    assert row["iterations"] >= 1 and row["seconds_ran"] >= 0.3
    assert row["items_per_sec"] == pytest.approx(4 * row["iterations"] / row["seconds_ran"])
    assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
    assert row["isa"] in {"avx2", "avx512", "unknown"} and isinstance(row["vnni"], bool)
    with pytest.raises(ValueError, match="deepsparse is not installed in this Python; pass --deepsparse-python"):
        benchmark.CPUBenchmark(num_cores=1).run(path, 1, engine="deepsparse", warmup_s=0.1, duration_s=0.1)
    assert sha256_file(path) == before


def test_cpu_isa_from_proc_cpuinfo():
    from bench.benchmark import _cpu_isa_from_proc

    two_cores = ("processor : 0\nphysical id : 0\ncore id : 0\nmodel name : AMD EPYC\nflags : fpu avx2 avx512f "
                 "avx512_vnni\n\nprocessor : 1\nphysical id : 0\ncore id : 1\nmodel name : AMD EPYC\nflags : fpu avx2 "
                 "avx512f avx512_vnni\n\nprocessor : 2\nphysical id : 0\ncore id : 1\nmodel name : AMD EPYC\n"
                 "flags : fpu avx2 avx512f avx512_vnni\n")
    assert _cpu_isa_from_proc(two_cores) == {"isa": "avx512", "vnni": True, "amx": "", "num_cores": 2,
                                             "vendor_model": "AMD EPYC"}
    zen1 = "processor : 0\nflags : fpu avx avx2 fma\n"
    assert _cpu_isa_from_proc(zen1) == {"isa": "avx2", "vnni": False, "amx": "", "num_cores": 1, "vendor_model": ""}
    xeon = "processor : 0\nflags : fpu avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16\n"
    assert _cpu_isa_from_proc(xeon) == {"isa": "avx512", "vnni": True, "amx": "amx_bf16 amx_int8 amx_tile",
                                        "num_cores": 1, "vendor_model": ""}


# the Python 3.10/3.11 whose deepsparse.benchmark command the test runs: DEEPSPARSE_PYTHON, else this
# Python where the command lies beside it (the default profile)
DEEPSPARSE_PYTHON = os.environ.get("DEEPSPARSE_PYTHON") or (
    sys.executable if (Path(sys.executable).parent / "deepsparse.benchmark").is_file() else None)


@pytest.mark.skipif(not DEEPSPARSE_PYTHON, reason="set DEEPSPARSE_PYTHON to a Python 3.10/3.11 with deepsparse 1.7 "
                    "(.ci/run sets it to the default profile's venv)")
def test_deepsparse_through_the_command_of_another_python(sparsified):
    """``--deepsparse-python``: DeepSparse's own ``deepsparse.benchmark`` command, from another env."""
    from bench.benchmark import CPUBenchmark

    row = CPUBenchmark(num_cores=1, deepsparse_python=DEEPSPARSE_PYTHON).run(
        sparsified["quantized"], 2, engine="deepsparse", warmup_s=0.5, duration_s=1.5)
    assert row["engine"] == "deepsparse" and row["engine_version"] == "deepsparse 1.7.0"
    assert row["seconds_ran"] > 1.8 and row["iterations"] >= 1  # the command takes whole seconds: 1.5 -> 2
    assert row["items_per_sec"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
    with pytest.raises(RuntimeError, match=r"deepsparse.benchmark exited with code [1-9]"):
        CPUBenchmark(num_cores=1, deepsparse_python=DEEPSPARSE_PYTHON).run(
            __file__, 1, engine="deepsparse", warmup_s=0.5, duration_s=1.0)
