"""End to end: ``python orchestrate.py --preset smoke`` on 300/200 real CIFAR-10 images.

The run itself is the session fixture ``smoke_run`` (tests/conftest.py); these tests read what it
left behind: the results table, the Tune experiments, the ONNX models and the benchmark table.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from ray import tune

from helpers import onnx_op_types, onnx_weight_sparsity
from study import make_config
from trainables.stopper import plateau_epoch

SMOKE = make_config("smoke")


def test_results_table_has_every_model(smoke_run):
    table = pd.read_csv(smoke_run / "results.csv")
    assert list(table["model"]) == ["teacher", "ce", "kd", "kd_feat", "pruned", "pruned_quantized"]
    assert table["test_acc"].between(0, 1).all()
    trained = table.set_index("model").loc[["teacher", "ce", "kd", "kd_feat"]]
    assert (trained["best_test_acc"] >= trained["test_acc"]).all()
    # resnet18 teacher vs. resnet18 with layer3 cut to one block (exact torchvision counts)
    assert trained.loc["teacher", "params"] == 11_173_962
    assert (trained.loc[["ce", "kd", "kd_feat"], "params"] == 9_993_290).all()
    sparse = table.set_index("model").loc[["pruned", "pruned_quantized"]]
    assert sparse["weight_sparsity"].between(0.79, 0.81).all()
    assert sparse["onnx_test_acc"].between(0, 1).all()
    assert (sparse["base"].isin(["ce", "kd", "kd_feat"])).all()
    assert json.loads((smoke_run / "config.json").read_text())["train_subset"] == 300


def test_each_trial_stopped_by_the_plateau_rule_or_its_bound(smoke_run):
    grid = tune.ExperimentAnalysis(str(smoke_run / "students"))
    assert len(grid.trial_dataframes) == 3
    for frame in grid.trial_dataframes.values():
        accuracies = list(frame["test_acc"])
        expected = plateau_epoch(accuracies, SMOKE.tolerance, SMOKE.patience) or SMOKE.max_epochs
        assert len(accuracies) == min(expected, SMOKE.max_epochs)
        assert {"loss_ce", "train_loss", "epoch_seconds", "train_images_per_sec"} <= set(frame.columns)


def test_student_trials_overlapped_in_time(smoke_run):
    table = pd.read_csv(smoke_run / "results.csv").set_index("model").loc[["ce", "kd", "kd_feat"]]
    assert table["started_at"].max() < table["finished_at"].min()


def test_exported_models_are_sparse_and_quantized(smoke_run):
    onnx_dir = smoke_run / "onnx"
    dense, _ = onnx_weight_sparsity(onnx_dir / "dense.onnx")
    pruned, _ = onnx_weight_sparsity(onnx_dir / "pruned.onnx")
    quantized, _ = onnx_weight_sparsity(onnx_dir / "pruned_quantized.onnx")
    assert dense < 0.01
    assert pruned >= 0.79 and quantized >= 0.79
    assert onnx_op_types(onnx_dir / "pruned_quantized.onnx") & {"ConvInteger", "QLinearConv"}
    assert not onnx_op_types(onnx_dir / "pruned.onnx") & {"ConvInteger", "QLinearConv"}


def test_benchmark_table(smoke_run):
    bench = pd.read_csv(smoke_run / "benchmark.csv")
    expected = {(m, "deepsparse", b) for m in ("dense", "pruned", "pruned_quantized") for b in (1, 32)}
    expected |= {("dense", "onnxruntime", b) for b in (1, 32)}
    assert set(zip(bench["model"], bench["engine"], bench["batch_size"])) == expected
    assert (bench["items_per_sec"] > 0).all()
    assert (bench["latency_p99_ms"] >= bench["latency_p50_ms"]).all()
    assert bench["num_cores"].nunique() == 1 and bench["isa"].isin(["avx2", "avx512"]).all()


@pytest.mark.parametrize("name", ["summary.json", "history.csv", "layer_sparsity.csv"])
def test_sparsify_records(smoke_run, name):
    assert (smoke_run / "sparsify" / name).stat().st_size > 0
    if name == "layer_sparsity.csv":
        layers = pd.read_csv(smoke_run / "sparsify" / name)
        # resnet18 student: stem conv + layer1 (4) + layer2 (5) + layer3 cut to one block (3) + layer4 (5) + fc
        assert len(layers) == 19
        overall = (layers["sparsity"] * layers["params"]).sum() / layers["params"].sum()
        assert overall == pytest.approx(0.80, abs=0.005)
