"""--mlflow (driver/tracking.py) on a tiny fabricated run directory and a local file store.

No Ray and no training: the tracker reads what the stages wrote, so a folder with Tune-shaped trial
folders (params.json, result.json), sparsify/, onnx/ and the tables is all it needs. The smoke run
with --mlflow is run by hand (docs/tracking.md).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")  # the '.[tracking]' extra

from driver import tracking  # noqa: E402
from study import RunLayout, StudyError, decision_rule, make_config  # noqa: E402
from study.config import RUNTIME_FIELDS, config_json  # noqa: E402
from stages.pipeline import PIPELINE  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SETUP_TERMS = {"ce": ["ce"], "kd": ["ce", "soft_ce"], "kd_feat": ["ce", "soft_ce", "feat_mse"]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trial(folder: Path, trial_id: str, params: dict, epochs: int, terms: list[str]) -> None:
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    lines = []
    for epoch in range(1, epochs + 1):
        result = {"training_iteration": epoch, "epoch": epoch, "trial_id": trial_id,
                  "test_acc": round(0.1 + 0.07 * epoch + 0.01 * len(terms), 4), "train_loss": 3.0 - epoch / 2,
                  "epoch_seconds": 10.0 + epoch, "train_images_per_sec": 30.0 + epoch, "warmup_seconds": 0.0,
                  "trial_started_at": 1_700_000_000.5, "timestamp": 1_700_000_000 + 20 * epoch,
                  "done": epoch == epochs, "config": params}
        result.update({f"loss_{t}": 1.0 / (epoch + i) for i, t in enumerate(terms)})
        lines.append(json.dumps(result))
    (folder / "result.json").write_text("\n".join(lines) + "\n")


def make_run(root: Path, mlflow_option: str | None = "local"):
    """A finished smoke-sized run directory (teacher, three students, recipe, bench, tables) and
    its StudyConfig."""
    config = make_config("smoke", output_dir=str(root), data_root=str(root / "data"), mlflow=mlflow_option)
    layout = RunLayout(root)
    root.mkdir(parents=True, exist_ok=True)
    layout.config.write_text(config_json(config))
    base = {"arch": "resnet18", "stem": "cifar", "lr": 1e-3, "batch_size": 128, "threads": 1}
    _trial(layout.teacher_dir / "train_teacher_aaaaa_00000_0_2026-01-01", "aaaaa_00000",
           {**base, "seed": 0}, epochs=2, terms=["ce"])
    for i, setup in enumerate(("ce", "kd", "kd_feat")):
        _trial(layout.students_dir / f"train_student_bbbbb_0000{i}_{i}_seed=0,setup={setup}_2026-01-01",
               f"bbbbb_0000{i}", {**base, "seed": 0, "setup": setup}, epochs=3 + i, terms=SETUP_TERMS[setup])
    layout.onnx_dir.mkdir()
    digests = {}
    for n, model in enumerate(("dense", "pruned", "pruned_quantized", "pruned_quantized_qdq")):
        layout.onnx(model).write_bytes(bytes([n]) * (1000 + n))
        digests[model] = _sha256(layout.onnx(model))
    layout.sparsify_dir.mkdir()
    layout.sparsify_summary.write_text(json.dumps({
        "trial_id": "train_student_bbbbb_00002_2_seed=0,setup=kd_feat_2026-01-01", "setup": "kd_feat",
        "loss": "kd_feat", "temperature": 4.0, "arch": "resnet18", "recipe": "recipes/prune_quantize.yaml",
        "recipe_epochs": 2.0, "test_acc_dense": 0.3, "test_acc_pruned": 0.25, "test_acc_pruned_quantized": 0.24,
        "test_acc_pruned_quantized_qdq": 0.24,
        "onnx": {m: str(layout.onnx(m)) for m in digests}, "sha256": digests}))
    layout.sparsify_history.write_text(
        "epoch,train_loss,loss_ce,test_acc,sparsity,lr,quantized,steps,precision,epoch_seconds\n"
        "0,2.39,2.39,0.175,0.8,0.0003,False,3,float32,25.9\n"
        "1,1.94,1.94,0.180,0.8,0.00004,True,3,int8,10.0\n")
    layout.layer_sparsity.write_text("layer,sparsity\nconv1,0.8\n")
    bench_rows = [("dense", "deepsparse", 1), ("dense", "onnxruntime", 1), ("pruned_quantized", "deepsparse", 32),
                  ("pruned_quantized_qdq", "openvino", 32)]
    with open(layout.benchmark, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "engine", "batch_size", "num_cores", "items_per_sec", "latency_mean_ms",
                         "latency_p50_ms", "latency_p99_ms", "isa", "vnni", "status", "error"])
        for k, (model, engine, batch) in enumerate(bench_rows):
            writer.writerow([model, engine, batch, 2, 300.0 + k, 3.0 + k, 2.9, 6.5, "avx512", True, "ok", ""])
    layout.onnx_accuracy.write_text(json.dumps({"dense": 0.3, "pruned": 0.25, "pruned_quantized": 0.24,
                                                "pruned_quantized_qdq": 0.23}))
    layout.results.write_text("model,test_acc\nce,0.3\n")
    layout.setups.write_text("setup,mean\nce,0.3\n")
    return config


def track_all(config) -> tracking.Tracker:
    """What run_study's hooks do on a full run."""
    tracker = tracking.open_tracker(config)
    for stage in ("teacher", "students", "sparsify", "bench"):
        tracker.sync(stage)
    tracker.finish(0)
    return tracker


def runs_by_stage(config) -> dict[str, list]:
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri(config))
    experiment = client.get_experiment_by_name(str(Path(config.output_dir).resolve()))
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    stages: dict[str, list] = {}
    for run in runs:
        stages.setdefault(run.data.tags.get("stage"), []).append(run)
    return stages


def metric_steps(client, runs) -> dict[tuple[str, str], list[int]]:
    return {(run.info.run_id, key): sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            for run in runs for key in run.data.metrics}


@pytest.fixture
def tracked(tmp_path):
    config = make_run(tmp_path / "run")
    track_all(config)
    return config


def test_one_parent_and_one_nested_run_per_trial_recipe_and_benchmark(tracked):
    """Catches: a stage or a trial not logged, a child run not nested under the study's parent run
    (tag mlflow.parentRunId), a second parent, the config missing from the parent's params or the
    decision rule from its tags, a store outside <output-dir>/mlruns for --mlflow local."""
    assert (Path(tracked.output_dir) / "mlruns").is_dir()
    stages = runs_by_stage(tracked)
    assert {k: len(v) for k, v in stages.items()} == {"study": 1, "teacher": 1, "students": 3, "sparsify": 1,
                                                       "bench": 1}
    parent = stages["study"][0]
    for stage, runs in stages.items():
        if stage != "study":
            assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs), stage
            assert all(r.info.status == "FINISHED" for r in runs), stage
    assert parent.data.tags["decision_rule"] == decision_rule(tracked)
    assert parent.data.params["lr"] == "0.001" and parent.data.params["setups"] == '["ce", "kd", "kd_feat"]'
    assert "output_dir" not in parent.data.params  # runtime fields are tags: a resume may change them
    assert parent.data.tags["runtime.mlflow"] == "local"
    assert sorted(r.data.tags["setup"] for r in stages["students"]) == ["ce", "kd", "kd_feat"]


def test_trial_runs_hold_every_epoch_of_result_json(tracked):
    """Catches: an epoch missing or logged at the wrong step (step must be training_iteration),
    a metric value that differs from Tune's result.json, a loss term or timing metric left out,
    the trial's params.json not logged as params."""
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri(tracked))
    runs = runs_by_stage(tracked)
    for run in runs["students"] + runs["teacher"]:
        params, results = tracking.read_trial(Path(tracked.output_dir) / run.data.tags["stage"]
                                              / run.data.tags["trial_dir"])
        for key in ("test_acc", "epoch_seconds", "train_images_per_sec", "train_loss",
                    *(k for k in results[0] if k.startswith("loss_"))):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert history == [(r["training_iteration"], r[key]) for r in results], (run.info.run_name, key)
        assert run.data.params["setup" if "setup" in params else "seed"] == str(params.get("setup", 0))
    kd_feat = next(r for r in runs["students"] if r.data.tags["setup"] == "kd_feat")
    assert {"loss_ce", "loss_soft_ce", "loss_feat_mse"} <= set(kd_feat.data.metrics)


def test_recipe_run_holds_history_and_the_onnx_files_with_their_recorded_digests(tracked, tmp_path, monkeypatch):
    """Catches: an ONNX artefact that is not the exported file (digest differs from
    sparsify/summary.json), an exported file changed by tracking, a sha256 tag that does not find the
    run (docs/tracking.md: from an ONNX file to its runs), the recipe's per-epoch history (accuracy, sparsity,
    precision) missing or at the wrong step, benchmark rows not logged per model/engine/batch."""
    layout = RunLayout(tracked.output_dir)
    summary = json.loads(layout.sparsify_summary.read_text())
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri(tracked))
    recipe = runs_by_stage(tracked)["sparsify"][0]
    folder = Path(client.download_artifacts(recipe.info.run_id, "onnx", str(tmp_path / "got")))
    assert {p.name: _sha256(p) for p in folder.iterdir()} == {f"{m}.onnx": d for m, d in summary["sha256"].items()}
    assert {m: _sha256(layout.onnx(m)) for m in summary["sha256"]} == summary["sha256"]  # files untouched
    for model, digest in summary["sha256"].items():
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(tracked))  # as docs/tracking.md's snippet does
        found = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                   filter_string=f"tags.sha256_{model} = '{digest}'")
        assert [r.info.run_id for r in found] == [recipe.info.run_id]
    assert [(m.step, m.value) for m in client.get_metric_history(recipe.info.run_id, "test_acc")] == \
        [(0, 0.175), (1, 0.18)]
    assert [m.value for m in client.get_metric_history(recipe.info.run_id, "precision_bits")] == [32, 8]
    assert [m.value for m in client.get_metric_history(recipe.info.run_id, "sparsity")] == [0.8, 0.8]
    bench = runs_by_stage(tracked)["bench"][0]
    assert bench.data.metrics["dense/onnxruntime/batch_1/items_per_sec"] == 301.0
    assert bench.data.metrics["pruned_quantized/deepsparse/batch_32/latency_mean_ms"] == 5.0
    assert bench.data.metrics["pruned_quantized_qdq/openvino/batch_32/items_per_sec"] == 303.0
    assert bench.data.metrics["onnx_test_acc/pruned_quantized_qdq"] == 0.23
    artefacts = {f.path for f in client.list_artifacts(runs_by_stage(tracked)["study"][0].info.run_id)}
    assert {"results.csv", "setups.csv", "config.json"} <= artefacts


def test_another_config_in_the_same_folder_gets_its_own_parent_run(tmp_path):
    """Catches: a run directory reused with --overwrite and another config continuing the old
    parent run (its params would then not be this study's, and MLflow refuses changed params)."""
    config = make_run(tmp_path / "run")
    track_all(config)
    other = make_config("smoke", output_dir=config.output_dir, data_root=config.data_root, mlflow="local", lr=0.01)
    tracking.open_tracker(other).finish(0)
    parents = runs_by_stage(config)["study"]
    assert sorted(p.data.params["lr"] for p in parents) == ["0.001", "0.01"]


def test_mlflow_is_a_runtime_field_and_its_cli_values(tmp_path):
    """Catches: --mlflow read as an input of a stage (a finished run given it would rerun; it is a
    RUNTIME_FIELD), and the CLI values: 'local', the flag alone (= local, before another option
    or last), a URI, 'none' (off, the default) and a bad value."""
    import orchestrate

    assert "mlflow" in RUNTIME_FIELDS and not any("mlflow" in stage.fields for stage in PIPELINE)
    parse = orchestrate.config_from_args
    assert parse(["--preset", "smoke"])[0].mlflow is None
    assert parse(["--preset", "smoke", "--mlflow", "local"])[0].mlflow == "local"
    assert parse(["--preset", "smoke", "--mlflow"])[0].mlflow == "local"
    assert parse(["--mlflow", "--preset", "smoke"])[0].mlflow == "local"
    assert parse(["--preset", "smoke", "--mlflow", "http://127.0.0.1:5000"])[0].mlflow == "http://127.0.0.1:5000"
    assert parse(["--preset", "smoke", "--mlflow", "none"])[0].mlflow is None
    with pytest.raises(StudyError, match="--mlflow"):
        parse(["--preset", "smoke", "--mlflow", "mlruns"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_one_line_and_exit_code_2_before_any_training(tmp_path, capsys):
    """Catches: a tracking server that does not answer found only after training (or hanging in
    MLflow's retries for minutes), a traceback instead of one line, an exit code other than 2."""
    import orchestrate

    out = tmp_path / "run"
    started = time.monotonic()
    code = orchestrate.main(["--preset", "smoke", "--stop-after", "students", "--data-root", str(tmp_path / "none"),
                             "--output-dir", str(out), "--mlflow", f"http://127.0.0.1:{_free_port()}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not answer" in err, err
    assert time.monotonic() - started < 60
    assert not RunLayout(out).config.exists()  # checked before the run directory is written to
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()  # before Ray started


def test_a_uri_mlflow_does_not_accept_is_one_line_and_exit_code_2(tmp_path, capsys):
    """Catches: an unknown URI scheme (MLflow raises while building its client) ending in a
    traceback and exit code 1 instead of one line and exit code 2 (seen: ``--mlflow nonsense://x``)."""
    import orchestrate

    out = tmp_path / "run"
    code = orchestrate.main(["--preset", "smoke", "--stop-after", "students", "--data-root", str(tmp_path / "none"),
                             "--output-dir", str(out), "--mlflow", "nonsense://x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --mlflow nonsense://x: not a tracking URI MLflow accepts ("), err
    assert not RunLayout(out).config.exists()


BLOCK_MLFLOW = """
import sys
class _Hide:
    def __init__(self, finder): self.finder = finder
    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] == "mlflow" else self.finder.find_spec(name, path, target)
    def __getattr__(self, attr): return getattr(self.finder, attr)
sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
"""


def test_without_the_flag_nothing_imports_mlflow(tmp_path):
    """Catches: a module-level `import mlflow` in driver/tracking.py or orchestrate.py, or a hook
    that imports it without --mlflow; and with --mlflow but MLflow not installed, anything but one
    StudyError line naming the extra, from a run and from ``--dry-run``. Runs in a subprocess in
    which mlflow cannot be imported."""
    run = tmp_path / "run"
    make_run(run)
    script = BLOCK_MLFLOW + textwrap.dedent(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("mlflow") is None, "the blocker did not block"
        import orchestrate
        from driver import tracking
        from study import StudyError, make_config
        config = make_config("smoke", output_dir={str(run)!r}, data_root="d")
        tracker = tracking.open_tracker(config)
        for stage in ("teacher", "students", "sparsify", "bench"):
            tracker.sync(stage)
        assert tracker.finish(3) == 3
        assert not [m for m in sys.modules if m.split(".")[0] == "mlflow"]
        try:
            tracking.open_tracker(make_config("smoke", output_dir={str(run)!r}, data_root="d", mlflow="local"))
        except StudyError as err:
            assert "'.[tracking]'" in str(err), err
        else:
            raise AssertionError("no StudyError without mlflow")
        fresh = {str(tmp_path / "fresh")!r}
        assert orchestrate.main(["--preset", "smoke", "--output-dir", fresh, "--data-root", "d", "--mlflow",
                                 "--dry-run"]) == 2  # --dry-run checks what the run would check
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "ok", done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: --mlflow needs MLflow"), done.stderr[-3000:]
    assert not (run / "mlruns").exists() and not (tmp_path / "fresh").exists()


def test_mlflow_server_on_the_store_answers_its_runs_over_rest(tracked, tmp_path):
    """Catches: a local store that `mlflow server --backend-store-uri <output-dir>/mlruns` (what
    docs/tracking.md's `mlflow ui` line opens) cannot read, or whose runs it does not list (7: study, teacher,
    3 students, recipe, benchmark). The server listens on 127.0.0.1 only and is stopped by its pid."""
    port = _free_port()
    store = Path(tracked.output_dir) / "mlruns"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store.as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(1)
        name = str(Path(tracked.output_dir).resolve())
        with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name={urllib.parse.quote(name)}",
                                    timeout=10) as reply:
            experiment_id = json.load(reply)["experiment"]["experiment_id"]
        request = urllib.request.Request(f"{base}/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [experiment_id], "max_results": 100}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            runs = json.load(reply)["runs"]
        stages = sorted(t["value"] for r in runs for t in r["data"]["tags"] if t["key"] == "stage")
        assert stages == ["bench", "sparsify", "students", "students", "students", "study", "teacher"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: the group this test started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_a_store_failing_after_a_stage_is_one_warning_line_not_the_end_of_the_study(tmp_path, capsys):
    """Catches: a tracking server that goes away during the study ending it with a traceback after
    the stage's work is done (its outputs are on disk; rerunning fills MLflow in), and finish()
    then losing the study's exit code."""
    config = make_run(tmp_path / "run")
    tracker = tracking.open_tracker(config)

    def broken(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("API request failed: connection refused")

    tracker.client.search_runs = tracker.client.log_artifact = tracker.client.list_artifacts = broken
    tracker.sync("students")
    assert tracker.finish(0) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(lines) == 2 and all("connection refused" in line for line in lines), lines


def test_a_finished_smoke_run_rerun_with_mlflow_fills_the_store_from_its_files(smoke_run, cifar_root, tmp_path,
                                                                             monkeypatch):
    """The issue's acceptance run, on a copy of the session's smoke run (every stage is skipped, so
    nothing trains): ``--mlflow local`` writes a store in which ``mlflow.search_runs`` finds the
    parent, 1 teacher, 3 student, 1 recipe and 1 benchmark run; each student's test_acc history is
    its result.json; the ONNX artefacts have the digests of sparsify/summary.json; the same command
    again, with the folder given as a relative ``--output-dir`` (as the default ``runs/<preset>``
    is), skips every stage and adds no run and no metric step. Catches hooks that log only stages
    that ran, or log another run's files, and a stage that hands Ray Tune a relative experiment path
    (pyarrow: "URI has empty scheme", exit 1; seen on the skipped students stage)."""
    from helpers import REPO_ROOT, copy_run, run_orchestrate

    out = copy_run(smoke_run, tmp_path / "tracked", "config.json", "teacher.pt", "teacher", "students", "sparsify",
                   "onnx", "benchmark.csv", "onnx_accuracy.json", "results.csv", "setups.csv", "fingerprints")
    config = make_config("smoke", output_dir=str(out), mlflow="local")
    run_orchestrate(out, cifar_root, "--mlflow", "local")
    log = (out / "orchestrate.log").read_text()
    assert "epoch 1: test_acc" not in log and "recipe epoch" not in log  # nothing trained
    mlflow.set_tracking_uri(tracking.tracking_uri(config))
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.data.tags["stage"] for r in runs) == ["bench", "sparsify", "students", "students", "students",
                                                         "study", "teacher"]
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri(config))
    for run in (r for r in runs if r.data.tags["stage"] == "students"):
        lines = (out / "students" / run.data.tags["trial_dir"] / "result.json").read_text().splitlines()
        epochs = {json.loads(line)["training_iteration"]: json.loads(line)["test_acc"] for line in lines}
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test_acc")) == \
            sorted(epochs.items()), run.data.tags["setup"]
    summary = json.loads((out / "sparsify" / "summary.json").read_text())
    recipe = next(r for r in runs if r.data.tags["stage"] == "sparsify")
    folder = Path(client.download_artifacts(recipe.info.run_id, "onnx", str(tmp_path / "got")))
    assert {p.name: _sha256(p) for p in folder.iterdir()} == {f"{m}.onnx": d for m, d in summary["sha256"].items()}
    steps = metric_steps(client, runs)
    monkeypatch.chdir(REPO_ROOT)  # orchestrate_command runs there: the relative folder is the same
    run_orchestrate(Path(os.path.relpath(out, REPO_ROOT)), cifar_root, "--mlflow", "local", log="again.log")
    log = (out / "again.log").read_text()
    for stage in ("teacher", "students", "sparsify", "benchmark"):
        assert f"skipping the {stage} stage" in log, (stage, log[-3000:])
    assert "epoch 1: test_acc" not in log and "recipe epoch" not in log
    again = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in runs)
    assert metric_steps(client, again) == steps
