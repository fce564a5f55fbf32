"""Issue 23 on tiny inputs: sparsity targets (names, validation, fingerprints), the dense INT8 PTQ
peer, model sizes and graphs, the OpenVINO engine, the benchmark rows (medians over rounds,
errors), the Pareto front and the "is compression worth it" sentences."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import orchestrate
from bench.benchmark import amx_flags
from helpers import TinyResNet
from report.findings import compression_verdict, pareto_front
from study import StudyError, make_config
from stages.pipeline import BY_NAME
from study.fingerprint import changed_inputs, make_fingerprint, stage_fields
from study.layout import RunLayout, Target, dense_owner, model_names, recipe_sparsity, sparsity_targets, target_tag
from study.config import PROJECT_DIR

RECIPE = PROJECT_DIR / "recipes" / "prune_quantize.yaml"


# --- sparsity targets ------------------------------------------------------------------------

def test_targets_carry_their_sparsity_unless_it_is_the_recipes_own():
    assert recipe_sparsity(RECIPE) == 0.8
    assert [target_tag(s, 0.8) for s in (0.5, 0.8, 0.9, 0.875)] == ["_s50", "", "_s90", "_s87p5"]
    targets = sparsity_targets((0.5, 0.8), RECIPE)
    assert targets == [Target(0.5, "_s50"), Target(0.8, "")]
    assert model_names(targets) == ["dense", "dense_int8", "pruned_s50", "pruned_quantized_s50",
                                    "pruned_quantized_qdq_s50", "pruned", "pruned_quantized", "pruned_quantized_qdq"]
    assert dense_owner(targets) == Target(0.8, "")  # the untagged target exports dense
    assert dense_owner(sparsity_targets((0.5, 0.9), RECIPE)) == Target(0.5, "_s50")  # else the first
    assert sparsity_targets((), RECIPE) == [Target(None, "")]  # default: the recipe's own, as always
    layout = RunLayout("run").target(Target(0.5, "_s50"))
    assert (layout.sparsify_summary.name, layout.sparsify_checkpoint.name) == ("summary_s50.json",
                                                                              "recipe_checkpoint_s50.pt")
    assert RunLayout("run").sparsify_summary.name == "summary.json"
    assert layout.onnx("pruned_quantized_s50").name == "pruned_quantized_s50.onnx"
    assert layout.onnx("pruned_quantized_qdq_s50").name == "pruned_quantized_qdq_s50.onnx"
    with pytest.raises(ValueError, match="unknown model"):
        layout.onnx("pruned_s50; rm")


@pytest.mark.parametrize("text", ["0.5,1.2", "0.5,0.5", "0", "-0.1"])
def test_bad_sparsities_are_one_line_and_exit_2(text, capsys):
    assert orchestrate.main(["--preset", "smoke", "--sparsities", text, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --sparsities ") and "between 0 and 1" in err and "\n" not in err


def test_sparsities_are_a_sparsify_input():
    config = json.loads(__import__("study.config", fromlist=["x"]).config_json(make_config("smoke")))
    assert stage_fields(BY_NAME["sparsify"].fields, config)["sparsities"] == []  # the recipe's own target alone
    given = json.loads(__import__("study.config", fromlist=["x"]).config_json(make_config("smoke", sparsities=(0.5, 0.8))))
    assert stage_fields(BY_NAME["sparsify"].fields, given)["sparsities"] == [0.5, 0.8]
    stage = BY_NAME["sparsify"]
    old, new = make_fingerprint(stage, config, {}, {}), make_fingerprint(stage, given, {}, {})
    assert changed_inputs(old, new) == {"sparsities"}
    assert changed_inputs(old, old) == set()
    with pytest.raises(StudyError, match="bench-rounds"):
        make_config("smoke", bench_rounds=0)


# --- the PTQ peer, sizes, graphs, OpenVINO ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """TinyResNet exported to ONNX (dynamic batch) and NNCF's INT8 PTQ of it; (fp32, int8, images)."""
    from trainables.compress.compat import onnx_export_kwargs
    from trainables.compress.ptq import calibration_images, quantize_dense

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = TinyResNet().eval()
    fp32 = folder / "dense.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 32, 32), str(fp32), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13,
                      **onnx_export_kwargs())  # the legacy exporter on torch >= 2.9 (compat)
    images = np.random.default_rng(0).standard_normal((40, 3, 32, 32)).astype(np.float32)
    picked = calibration_images(images, 16, seed=0)
    assert picked.shape == (16, 3, 32, 32) and np.isin(picked[:, 0, 0, 0], images[:, 0, 0, 0]).all()
    int8 = folder / "dense_int8.onnx"
    assert quantize_dense(fp32, int8, picked, metadata={"variant": "dense_int8"}) == 16
    return fp32, int8, images


def test_ptq_sessions_run_on_the_tasks_threads(tiny_onnx, tmp_path, monkeypatch):
    """Catches: NNCF's onnxruntime sessions (``nncf.onnx.engine``) opened with onnxruntime's default
    pool, every core of the machine, instead of the sparsify task's CPU share; and NNCF's
    ``onnxruntime`` left replaced after the call."""
    import onnxruntime
    from nncf.onnx import engine

    from trainables.compress.ptq import quantize_dense

    seen = []
    real = onnxruntime.InferenceSession

    def spy(model, sess_options=None, **kwargs):
        seen.append(None if sess_options is None else (sess_options.intra_op_num_threads,
                                                       sess_options.inter_op_num_threads))
        return real(model, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(engine.rt, "InferenceSession", spy)
    fp32, _, images = tiny_onnx
    original = engine.rt
    assert quantize_dense(fp32, tmp_path / "int8.onnx", images[:4], threads=1) == 4
    assert seen and set(seen) == {(1, 1)}, seen  # statistics and bias correction: every session
    assert engine.rt is original
    seen.clear()
    quantize_dense(fp32, tmp_path / "int8.onnx", images[:4])  # threads=None: onnxruntime's own default
    assert seen and set(seen) <= {None, (0, 0)}, seen  # NNCF 2.9 passes no options, 3.x default ones


def test_ptq_peer_is_a_qdq_int8_graph_close_to_its_fp32_parent(tiny_onnx):
    import onnx
    import onnxruntime as ort

    from bench.benchmark import graph_kind

    fp32, int8, images = tiny_onnx
    assert (graph_kind(fp32), graph_kind(int8)) == ("FP32", "QDQ INT8")
    assert {p.key: p.value for p in onnx.load(str(int8)).metadata_props} == {"variant": "dense_int8"}
    quantized = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= quantized
    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)}
    a, b = (run[p].run(None, {"input": images[:8]})[0] for p in (fp32, int8))
    assert a.shape == b.shape == (8, 10)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max() + 1e-3  # INT8, not garbage


def test_model_sizes_are_raw_and_gzip_bytes(tmp_path):
    from bench.benchmark import model_sizes

    zeros, noise = tmp_path / "zeros.bin", tmp_path / "noise.bin"
    zeros.write_bytes(bytes(100_000))
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    (raw_z, gz_z), (raw_n, gz_n) = model_sizes(zeros), model_sizes(noise)
    assert raw_z == raw_n == 100_000
    assert gz_z < 1_000 < 99_000 < gz_n  # zeros compress, noise does not


def test_openvino_engine_times_and_classifies_like_onnxruntime(tiny_onnx):
    from bench.benchmark import CPUBenchmark, onnx_accuracy

    fp32, int8, images = tiny_onnx
    labels = np.arange(len(images)) % 10
    assert onnx_accuracy(fp32, images, labels, 32, engine="openvino", num_cores=1) == pytest.approx(
        onnx_accuracy(fp32, images, labels, 32, engine="onnxruntime", num_cores=1))
    row = CPUBenchmark(1).run(str(int8), 4, engine="openvino", warmup_s=0.05, duration_s=0.2)
    assert row["engine"] == "openvino" and row["batch_size"] == 4 and row["iterations"] >= 1
    assert row["items_per_sec"] == pytest.approx(4 * row["iterations"] / row["seconds_ran"])
    assert row["latency_p99_ms"] >= row["latency_p50_ms"] > 0
    # the precision OpenVINO compiled each graph to, read back: INT8 kernels for the QDQ graph, and
    # f32 for the FP32 one on every CPU (without the f32 hint it is bf16 where AMX/AVX512-BF16 exist)
    assert row["precision"] in ("u8", "i8", "i8+u8")
    assert CPUBenchmark(1).run(str(fp32), 4, engine="openvino", warmup_s=0.05, duration_s=0.1)["precision"] == "f32"
    assert row["amx"] == amx_flags() and set(row["amx"].split()) <= {"amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
                                                                      "amx_complex"}


def test_openvino_compiles_fp32_graphs_in_f32(tiny_onnx, monkeypatch):
    """The f32 hint reaches compile_model whatever the CPU; without it OpenVINO picks bf16 where the
    CPU has AMX or AVX512-BF16 (openvino #21590), so this checks the request, not this CPU."""
    import openvino as ov

    from bench.engines import ENGINE_INFO

    seen = []
    compile_model = ov.Core.compile_model
    monkeypatch.setattr(ov.Core, "compile_model", lambda self, model, device, config: seen.append(config)
                        or compile_model(self, model, device, config))
    compiled = ENGINE_INFO["openvino"].open(str(tiny_onnx[0]), 2, 1).handle
    assert seen[0]["INFERENCE_PRECISION_HINT"] == "f32"
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")


def test_timed_loop_counts_items_per_second():
    from bench.engines import timed_loop

    out = timed_loop(lambda batch: __import__("time").sleep(0.01), np.zeros((8, 1)), 0.0, 0.1)
    assert 1 <= out["iterations"] <= 11 and out["seconds_ran"] >= 0.1
    assert out["items_per_sec"] == pytest.approx(8 * out["iterations"] / out["seconds_ran"])
    assert out["latency_p50_ms"] >= 10  # each call sleeps 10 ms
    assert out["latency_mean_ms"] * out["iterations"] <= 1000 * out["seconds_ran"] + 1e-6


# --- rows, front, sentences ------------------------------------------------------------------

def _run(ips, p50=1.0):
    return {"items_per_sec": ips, "latency_mean_ms": p50, "latency_p50_ms": p50, "latency_p99_ms": 2 * p50,
            "isa": "avx512", "vnni": True, "amx": "", "precision": "", "engine_version": "onnxruntime 1.19.2"}


def test_bench_rows_hold_medians_rounds_accuracy_size_and_errors():
    from bench.benchmark import BENCHMARK_COLUMNS, bench_rows

    jobs = [("dense", "onnxruntime", 1), ("pruned", "openvino", 1)]
    rows = bench_rows(jobs, {jobs[0]: [_run(10.0, 3.0), _run(30.0, 1.0), _run(20.0, 2.0)], jobs[1]: []},
                      {jobs[1]: "RuntimeError: cannot"}, {("dense", "onnxruntime"): 0.5, ("pruned", "openvino"): "X: y"},
                      {"dense": (100, 40), "pruned": (100, 20)}, {"dense": "FP32", "pruned": "FP32"}, 2)
    assert set(rows[0]) <= set(BENCHMARK_COLUMNS)
    ok, bad = rows
    assert (ok["items_per_sec"], ok["latency_p50_ms"], ok["rounds"]) == (20.0, 2.0, 3)  # medians, not means/last
    assert json.loads(ok["items_per_sec_rounds"]) == [10.0, 30.0, 20.0]
    assert (ok["accuracy"], ok["size_bytes"], ok["size_gzip_bytes"], ok["status"], ok["error"]) == (
        0.5, 100, 40, "ok", "")
    assert ok["engine_version"] == "onnxruntime 1.19.2"
    assert bad["status"] == "error" and bad["error"] == "RuntimeError: cannot; accuracy: X: y"
    assert bad["accuracy"] is None and "items_per_sec" not in bad and bad["size_gzip_bytes"] == 20


def test_pareto_front_keeps_only_undominated_points():
    speed = [100, 200, 150, 50, 200, np.nan]
    acc = [0.80, 0.70, 0.75, 0.90, 0.60, 0.99]
    # (200, 0.60) is beaten by (200, 0.70); NaN is never on the front
    assert list(pareto_front(speed, acc)) == [True, True, True, True, False, False]
    assert list(pareto_front([1, 1], [0.5, 0.5])) == [True, True]  # ties dominate neither


def _frame(rows):
    return pd.DataFrame([{"batch_size": 32, "model": m, "engine": e, "items_per_sec": ips, "accuracy": acc,
                          "latency_p50_ms": 1.0} for m, e, ips, acc in rows])


def test_verdict_names_the_fastest_model_within_one_point_and_its_gain_over_ptq():
    bench = _frame([("dense", "onnxruntime", 100, 0.800), ("dense", "deepsparse", 110, 0.800),
                    ("dense_int8", "openvino", 300, 0.795), ("dense_int8", "onnxruntime", 250, 0.795),
                    ("pruned_quantized", "deepsparse", 250, 0.750),  # slower than PTQ and less accurate
                    ("pruned_quantized_s50", "deepsparse", 450, 0.791),  # within 1 point, fastest
                    ("pruned_s90", "deepsparse", 900, 0.700),  # fastest overall, but 10 points down
                    ("structured_c50_int8", "openvino", 280, 0.760)])  # thinned: slower than PTQ, less accurate
    first, *losers = compression_verdict(bench, 32)
    assert "pruned_quantized_s50 on deepsparse: 450 images/s" in first
    assert "1.50× the best dense INT8 peer (dense_int8 on openvino, 300 images/s)" in first
    assert "4.50× dense onnxruntime" in first
    assert len(losers) == 2 and losers[0].startswith("At batch 32, pruned_quantized loses to post-training "
                                                     "quantization: at best 250 images/s (deepsparse")
    assert losers[1].startswith("At batch 32, structured_c50_int8 loses to post-training quantization: at best "
                                "280 images/s (openvino")


def test_verdict_says_when_nothing_keeps_the_accuracy():
    bench = _frame([("dense", "onnxruntime", 100, 0.80), ("pruned", "onnxruntime", 900, 0.70)])
    assert compression_verdict(bench, 32) == ["At batch 32, the fastest model within 1 point of its dense "
                                              "parent's accuracy is dense on onnxruntime: 100 images/s, accuracy "
                                              "0.800 (dense on onnxruntime: 0.800)."]
