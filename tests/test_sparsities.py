"""Issue 23 end to end, on a copy of the smoke run: ``--sparsities 0.5,0.8 --channel-ratios 0.5``
runs the sparsify stage for the new targets only (0.8, the recipe's own, is kept: only the target
lists changed; 0.5 by the recipe, channel ratio 0.5 by thinning) and the benchmark for every model
on every engine; nothing trains. Then back to 0.8 alone: a rerun
that keeps 0.8 (copied through ``rerun/``) and drops the 0.5 files, with no recipe run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers import copy_run, onnx_weight_sparsity, run_orchestrate
from study.files import sha256_file

RUN = ("config.json", "teacher.pt", "teacher", "students", "onnx", "sparsify", "fingerprints",
       "results.csv", "setups.csv", "variants.csv", "benchmark.csv", "onnx_accuracy.json")
MODELS = ("dense", "dense_int8", "pruned_s50", "pruned_quantized_s50", "pruned_quantized_qdq_s50", "pruned",
          "pruned_quantized", "pruned_quantized_qdq", "structured_c50", "structured_c50_int8")
ENGINES = ("deepsparse", "onnxruntime", "openvino")


@pytest.fixture(scope="module")
def two_targets(smoke_run, cifar_root, tmp_path_factory):
    """The copy after ``--sparsities 0.5,0.8`` (one benchmark round; the smoke run itself checks
    two, ``bench_rows`` their medians). Returns (run dir, {winning checkpoint path: (sha256, mtime)} before the run)."""
    out = copy_run(smoke_run, tmp_path_factory.mktemp("two-targets"), *RUN)
    fingerprint = json.loads((out / "fingerprints" / "sparsify.json").read_text())
    checkpoint = out / fingerprint["files"]["checkpoint"]["path"]
    before = (sha256_file(checkpoint), checkpoint.stat().st_mtime_ns)
    run_orchestrate(out, cifar_root, "--sparsities", "0.5,0.8", "--channel-ratios", "0.5", "--bench-rounds", "1",
                    log="targets.log", timeout=1800)
    return out, checkpoint, before


def test_only_the_new_target_runs_and_the_winner_checkpoint_is_read_not_written(two_targets):
    out, checkpoint, before = two_targets
    log = (out / "targets.log").read_text()
    # the outputs of 0.5 are missing: the stage runs in place, keeping the finished 0.8 target
    assert "[sparsify] run: no outputs yet" in log
    assert "[sparsify] target 0.8: made with these inputs, kept" in log
    assert log.count("recipe task submitted") == 1 and "[sparsify] target 0.5: recipe task submitted" in log
    assert log.count("thinning task submitted") == 1 and "[sparsify] target channel ratio 0.5: thinning task" in log
    assert "skipping the teacher stage" in log and "skipping the students stage" in log
    assert (sha256_file(checkpoint), checkpoint.stat().st_mtime_ns) == before  # read, never written
    assert not (out / "rerun").exists()


def test_each_target_has_its_models_digests_and_measured_sparsity(two_targets):
    out, _, _ = two_targets
    s50 = json.loads((out / "sparsify" / "summary_s50.json").read_text())
    s80 = json.loads((out / "sparsify" / "summary.json").read_text())
    assert (s50["sparsity"], s50["tag"], s80["sparsity"], s80["tag"]) == (0.5, "_s50", 0.8, "")
    assert set(s50["sha256"]) == {"pruned_s50", "pruned_quantized_s50", "pruned_quantized_qdq_s50"}  # dense: 0.8's
    assert set(s80["sha256"]) == {"dense", "dense_int8", "pruned", "pruned_quantized", "pruned_quantized_qdq"}
    for summary in (s50, s80):
        for name, digest in summary["sha256"].items():
            assert sha256_file(out / "onnx" / f"{name}.onnx") == digest, name
    assert s80["ptq_calibration_images"] == 128  # the smoke preset's
    # the weight sparsity read back from the exported files
    for name, want in (("pruned_s50", 0.50), ("pruned_quantized_s50", 0.50), ("pruned_quantized_qdq_s50", 0.50),
                       ("pruned", 0.80), ("pruned_quantized", 0.80), ("pruned_quantized_qdq", 0.80)):
        assert onnx_weight_sparsity(out / "onnx" / f"{name}.onnx")[0] == pytest.approx(want, abs=0.01), name
    c50 = json.loads((out / "sparsify" / "summary_c50.json").read_text())
    assert (c50["channel_ratio"], c50["tag"], set(c50["sha256"])) == (0.5, "_c50", {"structured_c50",
                                                                                    "structured_c50_int8"})
    results = pd.read_csv(out / "results.csv").set_index("model")
    assert results.loc["structured_c50_int8", "params"] == c50["params_structured"] < results.loc["pruned", "params"]
    assert results.loc["pruned_s50", "weight_sparsity"] == pytest.approx(0.50, abs=0.01)
    assert results.loc["pruned_quantized", "weight_sparsity"] == pytest.approx(0.80, abs=0.01)
    assert results.loc["pruned_quantized_qdq_s50", "weight_sparsity"] == pytest.approx(0.50, abs=0.01)


def test_benchmark_has_every_model_on_every_engine_with_accuracy_and_size(two_targets):
    out, _, _ = two_targets
    bench = pd.read_csv(out / "benchmark.csv")
    assert set(zip(bench["model"], bench["engine"], bench["batch_size"])) == {
        (m, e, b) for m in MODELS for e in ENGINES for b in (1, 32)}
    assert (bench["status"] == "ok").all(), bench[bench["status"] != "ok"][["model", "engine", "error"]]
    assert bench["accuracy"].between(0, 1).all() and (bench["items_per_sec"] > 0).all()
    assert (bench["rounds"] == 1).all()
    assert all(len(json.loads(r)) == 1 for r in bench["items_per_sec_rounds"])
    sizes = bench.drop_duplicates("model").set_index("model")
    assert (sizes["size_gzip_bytes"] < sizes["size_bytes"]).all()
    # zeros compress: the 80 % model's gzip is smaller than the 50 % one's, which is smaller than dense
    assert sizes.loc["pruned", "size_gzip_bytes"] < sizes.loc["pruned_s50", "size_gzip_bytes"] < \
        sizes.loc["dense", "size_gzip_bytes"]
    assert sizes.loc["dense_int8", "graph"] == "QDQ INT8" and sizes.loc["pruned_quantized", "graph"] == \
        "ConvInteger INT8" and sizes.loc["dense", "graph"] == "FP32"
    assert sizes.loc["pruned_quantized_qdq", "graph"] == sizes.loc["pruned_quantized_qdq_s50", "graph"] == "QDQ INT8"
    assert (sizes.loc["structured_c50", "graph"], sizes.loc["structured_c50_int8", "graph"]) == ("FP32", "QDQ INT8")
    # MACs and parameters per model, from the files' metadata: the thinned model about a quarter of dense
    assert sizes.loc["pruned", "macs"] == sizes.loc["dense_int8", "macs"] == sizes.loc["dense", "macs"]
    assert sizes.loc["structured_c50_int8", "macs"] == sizes.loc["structured_c50", "macs"] < 0.3 * sizes.loc[
        "dense", "macs"]
    assert sizes.loc["structured_c50", "params"] < 0.3 * sizes.loc["dense", "params"]
    accuracy = json.loads((out / "onnx_accuracy.json").read_text())
    assert set(accuracy) == set(MODELS)
    ds = bench[(bench["engine"] == "deepsparse")].drop_duplicates("model").set_index("model")["accuracy"]
    assert all(accuracy[m] == pytest.approx(ds[m]) for m in MODELS)


def test_the_report_draws_the_front_and_says_what_paid_off(two_targets):
    import matplotlib

    matplotlib.use("Agg")
    import report
    from report.findings import pareto_front

    out, _, _ = two_targets
    run = report.load_run(out)
    figure = report.pareto_chart(run)
    bench = run.benchmark
    for ax, batch in zip(figure.axes, (1, 32)):
        rows = bench[bench["batch_size"] == batch]
        (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"]
        assert len(line.get_xdata()) == pareto_front(rows["items_per_sec"], rows["accuracy"]).sum() >= 1
    sentences = report.findings(run)
    assert any("the fastest model within 1 point of its dense parent's accuracy is" in s for s in sentences)
    assert any("dense INT8 peer" in s for s in sentences)
    log = (out / "targets.log").read_text()
    assert "the fastest model within 1 point of its dense parent's accuracy is" in log  # the printed summary


def test_back_to_one_target_keeps_it_and_drops_the_other_without_a_recipe(two_targets, cifar_root):
    """Runs last (it changes the copy): ``--sparsities 0.8 --stop-after sparsify`` reruns the stage
    through ``rerun/``, keeping the 0.8 files byte for byte and dropping the 0.5 and channel-ratio 0.5 ones."""
    out, _, _ = two_targets
    kept = {p.name: sha256_file(p) for p in (out / "onnx").iterdir() if "_s50" not in p.name and "_c50" not in p.name}
    run_orchestrate(out, cifar_root, "--sparsities", "0.8", "--stop-after", "sparsify", log="back.log")
    log = (out / "back.log").read_text()
    assert "[sparsify] rerun: sparsities [0.5, 0.8] -> [0.8]" in log
    assert "[sparsify] target 0.8: made with these inputs, kept" in log and "recipe task submitted" not in log
    assert {p.name: sha256_file(p) for p in (out / "onnx").iterdir()} == kept
    assert not (out / "sparsify" / "summary_s50.json").exists() and not (out / "rerun").exists()
    assert not (out / "sparsify" / "summary_c50.json").exists()
