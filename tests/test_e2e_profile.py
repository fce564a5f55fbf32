"""The smoke preset end to end on the Python this suite runs on, as the README's main job runs it
but without ``--report`` (one launch): the Python 3.12 profile's proof in ``.ci/run`` (on the
default profile the ``smoke_run`` of ``test_e2e.py`` covers more).

``DEEPSPARSE_PYTHON=<a Python 3.10/3.11 with deepsparse 1.7>`` adds ``--deepsparse-python`` (``.ci/run``
sets it to the default profile's venv), so a 3.12 or 3.13 study also gets DeepSparse's benchmark.
"""

import json
import os
import sys

import pandas as pd
import pytest

from helpers import HAS_DEEPSPARSE, onnx_op_types, onnx_weight_sparsity, run_orchestrate

DEEPSPARSE_PYTHON = os.environ.get("DEEPSPARSE_PYTHON")


pytestmark = pytest.mark.skipif(sys.version_info < (3, 12), reason="the Python 3.12 profile's smoke run; on the "
                                "default profile test_e2e.py's smoke_run covers it")


@pytest.fixture(scope="module")
def profile_run(cifar_root, tmp_path_factory):
    args = ("--deepsparse-python", DEEPSPARSE_PYTHON) if DEEPSPARSE_PYTHON else ()
    return run_orchestrate(tmp_path_factory.mktemp("profile-run"), cifar_root, *args, timeout=2400)


def test_smoke_run_end_to_end_on_this_python(profile_run):
    results = pd.read_csv(profile_run / "results.csv")
    assert list(results["model"]) == ["teacher", "ce", "kd", "kd_feat", "pruned", "pruned_quantized",
                                      "pruned_quantized_qdq"]
    assert results["test_acc"].between(0, 1).all()
    sparse = results.set_index("model").loc[["pruned", "pruned_quantized", "pruned_quantized_qdq"]]
    assert sparse["weight_sparsity"].between(0.79, 0.81).all() and sparse["onnx_test_acc"].between(0, 1).all()
    onnx_dir = profile_run / "onnx"
    assert sorted(p.name for p in onnx_dir.glob("*.onnx")) == ["dense.onnx", "dense_int8.onnx", "pruned.onnx",
                                                             "pruned_quantized.onnx", "pruned_quantized_qdq.onnx"]
    assert onnx_weight_sparsity(onnx_dir / "pruned.onnx")[0] == pytest.approx(0.80, abs=0.01)
    assert onnx_op_types(onnx_dir / "pruned_quantized.onnx") & {"ConvInteger", "QLinearConv"}
    assert onnx_op_types(onnx_dir / "pruned_quantized_qdq.onnx") >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    summary = json.loads((profile_run / "sparsify" / "summary.json").read_text())
    assert set(summary["sha256"]) == {"dense", "dense_int8", "pruned", "pruned_quantized", "pruned_quantized_qdq"}
    assert onnx_op_types(onnx_dir / "dense_int8.onnx") >= {"QuantizeLinear", "DequantizeLinear"}  # NNCF's PTQ


def test_benchmark_rows_name_the_engine_versions_that_ran(profile_run):
    import onnxruntime

    bench = pd.read_csv(profile_run / "benchmark.csv")
    assert (bench["status"] == "ok").all() and (bench["items_per_sec"] > 0).all()
    models = ["dense", "dense_int8", "pruned", "pruned_quantized", "pruned_quantized_qdq"]
    for engine in ("onnxruntime", "openvino"):  # every model on every engine, at batch 1 and 32
        rows = bench[bench["engine"] == engine]
        assert sorted(set(zip(rows["model"], rows["batch_size"]))) == [(m, b) for m in models for b in (1, 32)]
        assert rows["accuracy"].between(0, 1).all()
    import openvino

    ort = bench[bench["engine"] == "onnxruntime"]
    assert ort["engine_version"].str.startswith(f"onnxruntime {onnxruntime.__version__}").all()
    assert (bench[bench["engine"] == "openvino"]["engine_version"] == f"openvino {openvino.__version__}").all()
    ds = bench[bench["engine"] == "deepsparse"]
    if HAS_DEEPSPARSE or DEEPSPARSE_PYTHON:
        assert sorted(set(zip(ds["model"], ds["batch_size"]))) == [(m, b) for m in models for b in (1, 32)]
        assert (ds["engine_version"] == "deepsparse 1.7.0").all()
        if not HAS_DEEPSPARSE:  # the deepsparse.benchmark command times; it does not run the test set
            assert ds["accuracy"].isna().all()
    else:
        assert ds.empty
        assert "--deepsparse-python PATH" in (profile_run / "orchestrate.log").read_text()
    if sys.version_info >= (3, 12):
        log = (profile_run / "orchestrate.log").read_text()
        assert "Traceback" not in log and "pkg_resources is deprecated" not in log
        assert "quantized tensor creation functions" not in log  # compat.QUIET_WARNINGS
