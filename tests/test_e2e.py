"""End to end: ``python orchestrate.py --preset smoke`` on 150/100 real CIFAR-10 images (``helpers.SMOKE``).

The run itself is the session fixture ``smoke_run`` (tests/conftest.py); these tests read what it left behind: the results table,
the Tune experiments, the ONNX models and the benchmark table, what it printed, and what it left
on disk. Properties of the export that a tiny model shows as well are tested once, in
test_sparsify.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray import tune

from helpers import copy_run, onnx_input_shape, onnx_op_types, onnx_weight_sparsity, sparsify_in_process
from study import ONNX_MODELS, make_config
from study.files import sha256_file
from trainables.compress.export import read_metadata
from trainables.stopper import plateau_epoch

REPO_ROOT = Path(__file__).resolve().parent.parent

SMOKE = make_config("smoke")


def _histories(run_dir: Path) -> dict:
    """{model: per-epoch metrics (sorted by epoch, one row per epoch)} of the teacher and each
    student trial of ``run_dir``, read back from the Tune experiments."""
    frames = {}
    for experiment in ("teacher", "students"):
        analysis = tune.ExperimentAnalysis(str(run_dir / experiment))
        for trial in analysis.trials:
            frame = analysis.trial_dataframes[trial.trial_id].sort_values("training_iteration")
            frames[trial.config.get("setup", "teacher")] = frame.drop_duplicates("training_iteration", keep="last")
    return frames


def test_results_table_has_every_model(smoke_run):
    """Each trained row is its trial's history: test_acc at the stop, best_test_acc the highest
    test accuracy and best_epoch the latest epoch that reached it (the tie rule: Tune keeps the
    later checkpoint of an equal score, ``driver.results.best_checkpoint``), epochs run. Catches
    rows taken from the wrong epoch, trial or setup (e.g. the last checkpoint instead of the best,
    or the earlier of tied epochs)."""
    table = pd.read_csv(smoke_run / "results.csv")
    assert list(table["model"]) == ["teacher", "ce", "kd", "kd_feat", "pruned", "pruned_quantized",
                                    "pruned_quantized_qdq"]
    assert table["test_acc"].between(0, 1).all()
    trained = table.set_index("model").loc[["teacher", "ce", "kd", "kd_feat"]]
    for model, frame in _histories(smoke_run).items():
        accs = list(frame["test_acc"])
        row = trained.loc[model]
        assert (row["test_acc"], row["epochs"]) == (accs[-1], len(accs)), model
        latest_best = len(accs) - accs[::-1].index(max(accs))  # 1-based epoch
        assert (row["best_test_acc"], row["best_epoch"]) == (max(accs), latest_best), (model, accs)
    # resnet18 teacher vs. resnet18 with layer3 cut to one block (exact torchvision counts)
    assert trained.loc["teacher", "params"] == 11_173_962
    assert (trained.loc[["ce", "kd", "kd_feat"], "params"] == 9_993_290).all()
    summary = json.loads((smoke_run / "sparsify" / "summary.json").read_text())
    sparse = table.set_index("model").loc[["pruned", "pruned_quantized", "pruned_quantized_qdq"]]
    for name in ("pruned", "pruned_quantized", "pruned_quantized_qdq"):
        assert sparse.loc[name, "weight_sparsity"] == pytest.approx(summary[f"weight_sparsity_{name}"], abs=1e-9)
        assert sparse.loc[name, "test_acc"] == pytest.approx(summary[f"test_acc_{name}"], abs=1e-9)
    accuracies = json.loads((smoke_run / "onnx_accuracy.json").read_text())
    assert list(sparse["onnx_test_acc"]) == [accuracies[m] for m in ("pruned", "pruned_quantized", "pruned_quantized_qdq")]
    assert (sparse["base"] == summary["setup"]).all()
    assert json.loads((smoke_run / "config.json").read_text())["train_subset"] == 150


def stop_reason(accuracies: list, tolerance: float, patience: int, bound: int) -> tuple[int, str]:
    """(epoch, "rule" | "bound") at which a trial with this accuracy history must have stopped:
    the stop rule's first firing epoch (``plateau_epoch``) when it fires within ``bound``, else
    ``bound``."""
    fired = plateau_epoch(accuracies[:bound], tolerance, patience)
    return (fired, "rule") if fired is not None else (bound, "bound")


def test_each_trial_stopped_by_the_rule_or_by_the_bound_as_its_history_says(smoke_run):
    """The smoke bound (4) lies above the rule's earliest epoch (3), so each trial's stop is one
    of two outcomes, computed here from its test_acc history: a stopper that fires early, late or
    never, or a bound that is ignored, gives a history of another length. The report names the
    same reason."""
    import report

    assert SMOKE.max_epochs > SMOKE.patience + 1
    run = report.load_run(smoke_run)
    frames = _histories(smoke_run)
    assert sorted(frames) == ["ce", "kd", "kd_feat", "teacher"]
    for setup in ("ce", "kd", "kd_feat"):
        accuracies = list(frames[setup]["test_acc"])
        epoch, reason = stop_reason(accuracies, SMOKE.tolerance, SMOKE.patience, SMOKE.max_epochs)
        print(f"{setup}: {accuracies} -> stopped by the {reason} at epoch {epoch}")
        assert len(accuracies) == epoch, (setup, accuracies, reason)
        assert report.stop_epoch(run, setup) == (epoch, {"rule": "plateau", "bound": "epoch limit"}[reason])
        assert {"loss_ce", "train_loss", "epoch_seconds", "train_images_per_sec"} <= set(frames[setup].columns)


def test_student_trials_overlapped_in_time(smoke_run):
    table = pd.read_csv(smoke_run / "results.csv").set_index("model").loc[["ce", "kd", "kd_feat"]]
    assert table["started_at"].max() < table["finished_at"].min()


def test_exported_models_are_sparse_and_quantized(smoke_run):
    """The sparsities read back from the exported files are the recipe's 0.80 and what the
    summary (and so results.csv) reports; the quantized graph computes its convolutions in
    integers, its QDQ twin quantizes around float Conv/Gemm. Catches an export of the wrong model
    state (dense, or before the masks applied)."""
    onnx_dir = smoke_run / "onnx"
    summary = json.loads((smoke_run / "sparsify" / "summary.json").read_text())
    dense, _ = onnx_weight_sparsity(onnx_dir / "dense.onnx")
    pruned, _ = onnx_weight_sparsity(onnx_dir / "pruned.onnx")
    quantized, _ = onnx_weight_sparsity(onnx_dir / "pruned_quantized.onnx")
    assert dense < 0.01
    assert pruned == pytest.approx(0.80, abs=0.01) and quantized == pytest.approx(0.80, abs=0.01)
    assert pruned == pytest.approx(summary["weight_sparsity_pruned"], abs=0.005)
    assert quantized == pytest.approx(summary["weight_sparsity_pruned_quantized"], abs=0.005)
    assert onnx_op_types(onnx_dir / "pruned_quantized.onnx") & {"ConvInteger", "QLinearConv"}
    assert not onnx_op_types(onnx_dir / "pruned.onnx") & {"ConvInteger", "QLinearConv"}
    qdq_ops = onnx_op_types(onnx_dir / "pruned_quantized_qdq.onnx")
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= qdq_ops and not qdq_ops & {"ConvInteger", "QLinearConv"}
    qdq, _ = onnx_weight_sparsity(onnx_dir / "pruned_quantized_qdq.onnx")
    assert qdq == pytest.approx(summary["weight_sparsity_pruned_quantized_qdq"], abs=0.005)


def test_benchmark_table(smoke_run):
    bench = pd.read_csv(smoke_run / "benchmark.csv")
    expected = {(m, e, b) for m in ("dense", "dense_int8", "pruned", "pruned_quantized", "pruned_quantized_qdq")
                for e in ("deepsparse", "onnxruntime", "openvino") for b in (1, 32)}
    assert set(zip(bench["model"], bench["engine"], bench["batch_size"])) == expected
    assert (bench["rounds"] == 2).all() and bench["accuracy"].between(0, 1).all()
    assert (bench["size_gzip_bytes"] < bench["size_bytes"]).all()
    assert (bench["items_per_sec"] > 0).all()
    assert (bench["latency_p99_ms"] >= bench["latency_p50_ms"]).all()
    assert bench["num_cores"].nunique() == 1 and bench["isa"].isin(["avx2", "avx512"]).all()
    assert (bench["status"] == "ok").all() and bench["error"].isna().all()  # empty in the CSV
    graphs = bench.drop_duplicates("model").set_index("model")["graph"]
    assert (graphs["pruned_quantized"], graphs["pruned_quantized_qdq"]) == ("ConvInteger INT8", "QDQ INT8")
    # the QAT model runs as INT8 on OpenVINO in its QDQ form: u8/i8 convolutions, read back
    ov = bench[(bench["model"] == "pruned_quantized_qdq") & (bench["engine"] == "openvino")]
    assert len(ov) == 2 and all({"u8", "i8"} & set(p.split("+")) for p in ov["precision"]), list(ov["precision"])


def test_sparsify_records_agree_with_each_other(smoke_run):
    """summary.json, history.csv and layer_sparsity.csv describe one recipe run: the sparsity of
    the layers, weighted by size, is the summary's; the pruned model (taken just before QAT starts,
    at recipe epoch 1) has the accuracy recipe epoch 0 ended with; the trial is the winning
    setup's."""
    summary = json.loads((smoke_run / "sparsify" / "summary.json").read_text())
    history = pd.read_csv(smoke_run / "sparsify" / "history.csv")
    layers = pd.read_csv(smoke_run / "sparsify" / "layer_sparsity.csv")
    setups = pd.read_csv(smoke_run / "setups.csv")
    assert summary["setup"] == setups.loc[setups["test_acc_mean"].idxmax(), "setup"]  # ties: the first
    assert list(history["epoch"]) == [0, 1] and list(history["quantized"]) == [False, True]
    assert history["test_acc"].iloc[0] == pytest.approx(summary["test_acc_pruned"], abs=1e-9)
    assert history["sparsity"].iloc[-1] == pytest.approx(summary["weight_sparsity_pruned_quantized"], abs=1e-9)
    # resnet18 student: stem conv + layer1 (4) + layer2 (5) + layer3 cut to one block (3) + layer4 (5) + fc
    assert len(layers) == 19
    overall = (layers["sparsity"] * layers["params"]).sum() / layers["params"].sum()
    assert overall == pytest.approx(summary["weight_sparsity_pruned_quantized"], abs=1e-4)
    assert overall == pytest.approx(0.80, abs=0.005)


def test_exported_models_keep_a_dynamic_batch_axis_and_their_recorded_digests(smoke_run):
    summary = json.loads((smoke_run / "sparsify" / "summary.json").read_text())
    assert set(summary["sha256"]) == {*ONNX_MODELS, "dense_int8"}
    for name in (*ONNX_MODELS, "dense_int8"):
        path = smoke_run / "onnx" / f"{name}.onnx"
        assert onnx_input_shape(path) == ["batch", 3, 32, 32], name  # after the benchmark too
        assert sha256_file(path) == summary["sha256"][name], name
    assert not (smoke_run / "sparsify" / "recipe_checkpoint.pt").exists()  # done: nothing to resume


def test_the_exported_models_name_their_trial_and_preprocessing(smoke_run):
    """What a deployed file says about itself is this run's: its trial, setup, accuracy and the
    preprocessing the training used."""
    from trainables.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD

    summary = json.loads((smoke_run / "sparsify" / "summary.json").read_text())
    for name in ONNX_MODELS:
        meta = read_metadata(smoke_run / "onnx" / f"{name}.onnx")
        assert (meta["variant"], meta["input_layout"], meta["input_dtype"]) == (name, "NCHW", "float32")
        assert json.loads(meta["normalization_mean"]) == list(CIFAR10_MEAN)
        assert json.loads(meta["normalization_std"]) == list(CIFAR10_STD)
        assert json.loads(meta["class_names"]) == list(CIFAR10_CLASSES)
        assert (meta["source_trial"], meta["source_setup"]) == (summary["trial_id"], summary["setup"])
        assert (meta["arch"], meta["stem"], meta["recipe_epochs"]) == ("resnet18", "cifar", "2")
        assert float(meta["test_acc"]) == pytest.approx(summary[f"test_acc_{name}"], abs=1e-6)


def test_the_deployment_snippet_classifies_a_test_image_from_the_file_alone(smoke_run, cifar_root, tmp_path):
    """docs/outputs.md's snippet ("Using an exported model"), run as written but for its two paths,
    prints the class that the project's own preprocessing (``trainables.batches.normalize``) and
    onnxruntime give."""
    import onnxruntime as ort
    import torch
    from torchvision.io import read_image, write_png

    from trainables.batches import normalize
    from trainables.data import CIFAR10_CLASSES

    model = smoke_run / "onnx" / "pruned_quantized.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    images = [read_image(str(p)) for p in sorted((cifar_root / "test").glob("*/*.jpg"))[::10]]
    logits = session.run(None, {"input": normalize(torch.stack(images)).numpy()})[0]
    top2 = np.sort(logits, axis=1)[:, -2:]
    pick = int(np.argmax(top2[:, 1] - top2[:, 0]))  # the clearest decision: engines may differ by ~1e-3
    image = tmp_path / "image.png"  # lossless, so the snippet's PIL sees the pixels used here
    write_png(images[pick], str(image))
    expected = CIFAR10_CLASSES[int(logits[pick].argmax())]

    page = (REPO_ROOT / "docs" / "outputs.md").read_text()
    code = re.search(r"## Using an exported model.*?```python\n(.*?)```", page, re.S).group(1)
    code = re.sub(r"^MODEL = .*$", f"MODEL = {str(model)!r}", code, count=1, flags=re.M)
    code = re.sub(r"^IMAGE = .*$", f"IMAGE = {str(image)!r}", code, count=1, flags=re.M)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("deepsparse:", "onnxruntime:"))]
    assert lines == [f"deepsparse:  {expected}", f"onnxruntime: {expected}"], proc.stdout


def test_the_run_prints_one_line_per_epoch_and_no_known_noise(smoke_run):
    """The smoke run prints one line per epoch of every trial and of the recipe, and none of the
    libraries' known noise. (A resumed launch printing each trial's epochs from its last checkpoint
    on: ``test_e2e_seeds.py``.)"""
    log = (smoke_run / "orchestrate.log").read_text()
    for noise in ("TracerWarning", "UserWarning", "Transformed", "may not respect num_cores", "TensorBoard",
                  "Checkpoint successfully created", "Trial status", "Wrote the latest version",
                  "snapshotting", "Started a local Ray instance"):
        assert noise not in log, noise
    assert len(log.splitlines()) < 120  # the benchmark table: 30 rows (5 models x 3 engines x 2 batch sizes)
    for setup, frame in _histories(smoke_run).items():
        prefix = "[teacher]" if setup == "teacher" else f"[students {setup}]"
        printed = [int(e) for e in re.findall(rf"{re.escape(prefix)} epoch (\d+): test_acc", log)]
        assert printed == [int(e) for e in frame["epoch"]], (setup, printed)
    assert len(re.findall(r"recipe epoch \d/2: loss", log)) == 2


def test_finished_experiments_keep_only_the_weights_of_the_best_and_latest_epoch(smoke_run):
    for experiment in ("teacher", "students"):
        analysis = tune.ExperimentAnalysis(str(smoke_run / experiment))
        for trial in analysis.trials:
            frame = analysis.trial_dataframes[trial.trial_id]
            kept = sorted(Path(trial.path).glob("checkpoint_*"))
            assert all(sorted(p.name for p in c.iterdir()) == ["model.pt"] for c in kept), kept
            epochs = [int(c.name.split("_")[1]) + 1 for c in kept]
            assert len(frame) in epochs  # the latest
            accs = list(frame.sort_values("training_iteration").drop_duplicates("training_iteration",
                                                                                keep="last")["test_acc"])
            assert len(accs) - accs[::-1].index(max(accs)) in epochs  # the best: the latest of tied epochs
            assert len(kept) <= 2


def test_recipe_epochs_are_timed_before_and_during_qat(smoke_run):
    history = pd.read_csv(smoke_run / "sparsify" / "history.csv")
    summary = json.loads((smoke_run / "sparsify" / "summary.json").read_text())
    assert list(history["precision"]) == ["float32", "float32"]  # a CPU: no autocast
    assert (history["epoch_seconds"] > 0).all()
    assert summary["epoch_seconds_before_qat"] == pytest.approx(history["epoch_seconds"][0])
    assert summary["epoch_seconds_qat"] == pytest.approx(history["epoch_seconds"][1])


def test_the_recipe_trains_with_the_winning_setups_loss_by_default(smoke_run):
    """``--sparsify-loss setup`` (the default): the summary names the loss, its terms are logged."""
    summary = json.loads((smoke_run / "sparsify" / "summary.json").read_text())
    history = pd.read_csv(smoke_run / "sparsify" / "history.csv")
    terms = {"ce": ["ce"], "kd": ["ce", "soft_ce"], "kd_feat": ["ce", "soft_ce", "mse_layer1",
                                                                 "mse_layer2", "mse_layer4"]}
    assert summary["loss"] == summary["setup"]
    for name in ("pruned", "pruned_quantized", "pruned_quantized_qdq"):
        assert read_metadata(smoke_run / "onnx" / f"{name}.onnx")["recipe_loss"] == summary["loss"]
    assert "recipe_loss" not in read_metadata(smoke_run / "onnx" / "dense.onnx")
    assert [c for c in history.columns if c.startswith("loss_")] == [f"loss_{t}" for t in terms[summary["loss"]]]
    assert json.loads((smoke_run / "config.json").read_text())["sparsify_loss"] == "setup"


def test_a_kd_feat_trial_is_sparsified_with_its_loss_and_the_teacher(smoke_run, tmp_path):
    """The path a ce winner does not take: the smoke run's kd_feat trial through the recipe (in
    this process, on a copy of the run, with the stage's own settings) with the frozen teacher's
    soft targets and feature MSE, also in the QAT epoch. Catches a recipe that falls back to
    cross-entropy, drops a term, or uses another temperature."""
    out = copy_run(smoke_run, tmp_path / "kd_feat", "config.json", "teacher.pt", "teacher", "students")
    summary = sparsify_in_process(out, "kd_feat")
    assert (summary["setup"], summary["loss"], summary["temperature"]) == ("kd_feat", "kd_feat", SMOKE.temperature)
    history = pd.read_csv(out / "sparsify" / "history.csv")
    terms = ["loss_ce", "loss_soft_ce", "loss_mse_layer1", "loss_mse_layer2", "loss_mse_layer4"]
    assert [c for c in history.columns if c.startswith("loss_")] == terms
    assert list(history["quantized"]) == [False, True]  # the feature MSE also ran in the QAT epoch
    assert np.allclose(history["train_loss"], history[terms].mean(axis=1), rtol=1e-4)
    assert read_metadata(out / "onnx" / "pruned_quantized.onnx")["recipe_loss"] == "kd_feat"
    assert summary["weight_sparsity_pruned_quantized"] == pytest.approx(0.8, abs=0.01)
