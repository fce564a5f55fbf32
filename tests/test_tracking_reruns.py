"""--mlflow (driver/tracking.py) when the files change under it: a resumed or repeated run, a stage
that reruns (new runs, the old ones tagged ``superseded_by``), a trial that Tune restarted. The
fabricated run directory and helpers of ``test_tracking.py``; one real Tune experiment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")  # the '.[tracking]' extra

from driver import tracking  # noqa: E402
from study import RunLayout, StudyError, make_config  # noqa: E402
from test_tracking import _sha256, make_run, metric_steps, runs_by_stage, track_all  # noqa: E402
from test_tracking import tracked  # noqa: E402,F401  (the fixture: a fabricated run, tracked once)


def test_rerun_adds_no_run_and_no_step_and_a_resume_adds_only_new_epochs(tracked):
    """Catches: a resumed or rerun study (a new process: a new Tracker) creating a second parent or
    trial run, or logging an epoch again (duplicate metric steps); a skipped stage logging again;
    and the opposite, a resume that logs nothing new (a trial's epochs after the first run)."""
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri(tracked))
    before = runs_by_stage(tracked)
    steps_before = metric_steps(client, [r for runs in before.values() for r in runs])
    track_all(tracked)
    after = runs_by_stage(tracked)
    assert {k: sorted(r.info.run_id for r in v) for k, v in after.items()} == \
        {k: sorted(r.info.run_id for r in v) for k, v in before.items()}
    assert metric_steps(client, [r for runs in after.values() for r in runs]) == steps_before
    # the ce student had one more epoch when the study resumed
    ce = next(r for r in after["students"] if r.data.tags["setup"] == "ce")
    result_json = Path(tracked.output_dir) / "students" / ce.data.tags["trial_dir"] / "result.json"
    last = json.loads(result_json.read_text().splitlines()[-1])
    result_json.write_text(result_json.read_text() + json.dumps({**last, "training_iteration": 4,
                                                                 "test_acc": 0.5}) + "\n")
    tracking.open_tracker(tracked).sync("students")
    assert [(m.step, m.value) for m in client.get_metric_history(ce.info.run_id, "test_acc")][-2:] == \
        [(3, last["test_acc"]), (4, 0.5)]
    assert len(runs_by_stage(tracked)["students"]) == 3


def _current(runs) -> list:
    return [r for r in runs if "superseded_by" not in r.data.tags]


def test_a_rerun_stage_gets_a_new_run_and_the_old_one_is_superseded(tracked, tmp_path):
    """The pattern of mlflow #4248, on the tracker alone: the recipe reran (a re-exported ONNX file
    of the same size, new accuracies, a new history) and results.csv changed at the same size.
    Catches: the old recipe run kept as the current one (old sha256 tag, accuracy, ONNX file), an
    artefact compared by name and size, the old run's values replaced instead of kept under
    ``superseded_by``, a new run for a stage whose files did not change (bench, trials); and a
    rerun back to the first files making the first run current again."""
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri(tracked))
    layout = RunLayout(tracked.output_dir)
    first = {p: p.read_bytes() for p in (layout.onnx("pruned"), layout.sparsify_summary, layout.sparsify_history,
                                        layout.results)}
    before = runs_by_stage(tracked)
    (old,) = before["sparsify"]
    old_digest = old.data.tags["sha256_pruned"]
    layout.onnx("pruned").write_bytes(bytes([7]) * len(first[layout.onnx("pruned")]))  # same size, new bytes
    summary = json.loads(layout.sparsify_summary.read_text())
    summary["sha256"]["pruned"] = new_digest = _sha256(layout.onnx("pruned"))
    summary["test_acc_pruned"] = 0.5
    layout.sparsify_summary.write_text(json.dumps(summary))
    layout.sparsify_history.write_text(layout.sparsify_history.read_text().replace("0.175", "0.275"))
    layout.results.write_text("model,test_acc\nce,0.4\n")
    track_all(tracked)
    after = runs_by_stage(tracked)
    assert {k: len(v) for k, v in after.items()} == {"study": 1, "teacher": 1, "students": 3, "sparsify": 2, "bench": 1}
    (new,) = _current(after["sparsify"])
    assert new.info.run_id != old.info.run_id and new.info.status == "FINISHED"
    assert (new.data.tags["sha256_pruned"], new.data.metrics["test_acc_pruned"]) == (new_digest, 0.5)
    history = client.get_metric_history(new.info.run_id, "test_acc")
    assert [(m.step, m.value) for m in history] == [(0, 0.275), (1, 0.18)]
    got = Path(client.download_artifacts(new.info.run_id, "onnx/pruned.onnx", str(tmp_path / "new")))
    assert _sha256(got) == new_digest
    (was,) = [r for r in after["sparsify"] if r.info.run_id == old.info.run_id]
    assert was.data.tags["superseded_by"] == new.info.run_id and was.info.status == "FINISHED"
    assert (was.data.tags["sha256_pruned"], was.data.metrics["test_acc_pruned"]) == (old_digest, 0.25)  # kept
    mlflow.set_tracking_uri(tracking.tracking_uri(tracked))
    holders = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string=f"tags.sha256_pruned = '{old_digest}'")
    assert [r.data.tags.get("superseded_by") for r in holders] == [new.info.run_id]  # none shows it as current
    parent = after["study"][0].info.run_id
    assert Path(client.download_artifacts(parent, "results.csv", str(tmp_path / "p"))).read_text() == \
        "model,test_acc\nce,0.4\n"
    for stage in ("teacher", "students", "bench"):
        assert sorted(r.info.run_id for r in after[stage]) == sorted(r.info.run_id for r in before[stage])
    for path, content in first.items():  # the files went back: so does MLflow
        path.write_bytes(content)
    track_all(tracked)
    again = runs_by_stage(tracked)
    assert [r.info.run_id for r in _current(again["sparsify"])] == [old.info.run_id]
    assert {r.data.tags.get("superseded_by") for r in again["sparsify"]} == {None, old.info.run_id}


def test_a_trial_that_tune_restarted_has_one_run(tmp_path):
    """ray #40652's restart path, in a real Tune experiment: the kd trial's worker is killed at
    every attempt (Tune retries it, max_failures=2, then marks it errored: the stage fails); the same
    command again restores the experiment, and Tune restarts the errored trial under a new trial id
    and folder, while the errored one's folder (with its epoch 1) stays in students/. Catches: one
    MLflow run per trial folder (two kd runs, the errored one never ended), instead of one run per
    trial of the final grid."""
    ray = pytest.importorskip("ray")
    from ray import tune

    from driver.tuning import run_tuner

    def dies_at_epoch_2_while_marked(config):  # nested: pickled by value, Ray's workers need not import this module
        """Two epochs; the kd trial's worker dies before its 2nd while the file config["marker"] exists."""
        import os

        from ray import tune

        for epoch in (1, 2):
            if epoch == 2 and config["setup"] == "kd" and os.path.exists(config["marker"]):
                os._exit(1)
            tune.report({"test_acc": 0.1 * epoch, "train_loss": 1.0 / epoch, "epoch_seconds": 1.0,
                         "trial_started_at": 1_700_000_000.0})

    config = make_config("smoke", output_dir=str(tmp_path / "run"), data_root=str(tmp_path / "data"),
                         mlflow="local", setups=("ce", "kd"), max_epochs=2)
    marker = tmp_path / "kill-kd"
    marker.touch()
    space = {"setup": tune.grid_search(["ce", "kd"]), "seed": 0, "marker": str(marker)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with pytest.raises(StudyError, match="1 students trial"):
            run_tuner(config, "students", dies_at_epoch_2_while_marked, space, {"cpu": 1.0, "gpu": 0.0}, 2)
        marker.unlink()
        grid = run_tuner(config, "students", dies_at_epoch_2_while_marked, space, {"cpu": 1.0, "gpu": 0.0}, 2)
    finally:
        ray.shutdown()
    layout = RunLayout(config.output_dir)
    folders = [tracking.read_trial(p.parent) for p in layout.students_dir.glob("*/result.json")]
    assert sorted(params["setup"] for params, results in folders if results) == ["ce", "kd", "kd"]  # the leftover
    final = {r.config["setup"]: r.metrics["trial_id"] for r in grid}
    tracking.open_tracker(config).sync("students")
    runs = runs_by_stage(config)["students"]
    assert sorted((r.data.tags["setup"], r.data.tags["trial_id"]) for r in runs) == sorted(final.items())
    assert all(r.info.status == "FINISHED" and r.data.metrics["test_acc"] == 0.2 for r in runs)
