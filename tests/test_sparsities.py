"""Issue 23 end to end, on a copy of the smoke run: ``--sparsities 0.5,0.8 --channel-ratios 0.5
--stop-after sparsify`` runs the sparsify stage for the new targets only (0.8, the recipe's own, is
kept: only the target lists changed; 0.5 by the recipe, channel ratio 0.5 by thinning); nothing
trains. The files are read back (sparsity, graph, MACs and parameters, digests), and the bench
stage's inputs are every model of every target. Then back to 0.8 alone: a rerun that keeps 0.8
(copied through ``rerun/``) and drops the 0.5 files, with no recipe run.

The benchmark itself is measured elsewhere: on the smoke run's five models (``test_e2e.py``), on
two nodes (``test_fingerprints.py``'s story), and each engine on the thinned files
(``test_structured.py``); its rows, front and sentences on given tables in ``test_ptq_bench.py``."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers import SMOKE, copy_run, onnx_weight_sparsity, run_orchestrate
from study.files import sha256_file

RUN = ("config.json", "teacher.pt", "teacher", "students", "onnx", "sparsify", "fingerprints",
       "results.csv", "setups.csv", "variants.csv", "benchmark.csv", "onnx_accuracy.json")
MODELS = ("dense", "dense_int8", "pruned_s50", "pruned_quantized_s50", "pruned_quantized_qdq_s50", "pruned",
          "pruned_quantized", "pruned_quantized_qdq", "structured_c50", "structured_c50_int8")
TARGETS = ("--sparsities", "0.5,0.8", "--channel-ratios", "0.5", "--stop-after", "sparsify")


@pytest.fixture(scope="module")
def two_targets(smoke_run, cifar_root, tmp_path_factory):
    """The copy after ``TARGETS``. Returns (run dir, winning checkpoint path, its (sha256, mtime)
    before the run)."""
    out = copy_run(smoke_run, tmp_path_factory.mktemp("two-targets"), *RUN)
    fingerprint = json.loads((out / "fingerprints" / "sparsify.json").read_text())
    checkpoint = out / fingerprint["files"]["checkpoint"]["path"]
    before = (sha256_file(checkpoint), checkpoint.stat().st_mtime_ns)
    run_orchestrate(out, cifar_root, *TARGETS, log="targets.log", timeout=1800)
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
    assert "[teacher] epoch" not in log and "[students ce] epoch" not in log
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


def test_the_bench_stage_reads_every_model_of_every_target_with_its_graph_and_cost(two_targets, cifar_root):
    """The bench stage's inputs are the ten files; the graph and the MACs and parameters recorded
    in each file's metadata (what ``benchmark.csv`` reports) are those of its kind: the thinned
    model about a quarter of dense."""
    import orchestrate
    from bench.rows import graph_kind, model_cost
    from stages.pipeline import BY_NAME

    out, _, _ = two_targets
    config = orchestrate.config_from_args([*SMOKE, "--data-root", str(cifar_root), "--output-dir", str(out),
                                           *TARGETS])[0]
    assert BY_NAME["bench"].files(config) == {f"{m}.onnx": f"onnx/{m}.onnx" for m in MODELS}
    graphs = {m: graph_kind(out / "onnx" / f"{m}.onnx") for m in MODELS}
    assert graphs == {"dense": "FP32", "dense_int8": "QDQ INT8", "pruned_s50": "FP32",
                      "pruned_quantized_s50": "ConvInteger INT8", "pruned_quantized_qdq_s50": "QDQ INT8",
                      "pruned": "FP32", "pruned_quantized": "ConvInteger INT8", "pruned_quantized_qdq": "QDQ INT8",
                      "structured_c50": "FP32", "structured_c50_int8": "QDQ INT8"}
    cost = {m: model_cost(out / "onnx" / f"{m}.onnx") for m in MODELS}
    assert len({cost[m] for m in MODELS if not m.startswith("structured")}) == 1  # pruning keeps every MAC
    assert cost["structured_c50"] == cost["structured_c50_int8"]
    assert cost["structured_c50"][0] < 0.3 * cost["dense"][0] and cost["structured_c50"][1] < 0.3 * cost["dense"][1]


def test_the_report_lists_every_compressed_model_of_every_target(two_targets):
    """The report's compression table (``report.tables.sparse_table``) has a row for each of the
    eight compressed models, in ``results.csv`` order, after the dense parent's."""
    import report

    out, _, _ = two_targets
    table = report.tables.sparse_table(report.load_run(out))
    compressed = [m for m in pd.read_csv(out / "results.csv")["model"] if m.startswith(("pruned", "structured"))]
    assert len(compressed) == 8 and list(table["model"])[1:] == compressed


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
