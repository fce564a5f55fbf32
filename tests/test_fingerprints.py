"""A result always matches its inputs: every stage records what it read (``study.fingerprint``), and a
changed input reruns exactly the stages it affects (``study.reruns``, ``driver.reruns``).

Most tests ask ``orchestrate.py --dry-run`` about a copy of the smoke run after changing one input;
one (the story of the issue) really reruns the recipe, one interrupts such a rerun."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

import orchestrate
from study import STAGES, StudyConfig, StudyError, make_config
from study.config import RUNTIME_FIELDS, config_json
from study.files import sha256_file
from study.fingerprint import LABEL_FIELDS, STAGE_FIELDS, differences, make_fingerprint, write_fingerprint
from study.reruns import StageState, check_absorbable, plan

from helpers import copy_run, kill_orchestrate_when, run_orchestrate

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = REPO_ROOT / "recipes" / "prune_quantize.yaml"
#: The '.[tracking]' extra: the story test then also checks what MLflow shows after the rerun.
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
RUN = ("config.json", "teacher.pt", "teacher", "students", "onnx", "sparsify", "fingerprints",
       "results.csv", "setups.csv", "benchmark.csv", "onnx_accuracy.json")


def dry_run(capsys, out: Path, data_root: Path, *args) -> dict:
    """``orchestrate.main([... '--dry-run'])`` on ``out``: stage -> its line (exit code 0 checked)."""
    capsys.readouterr()
    code = orchestrate.main(["--preset", "smoke", "--no-dashboard", "--data-root", str(data_root),
                             "--output-dir", str(out), "--dry-run", *map(str, args)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0, lines
    found = {stage: next(line for line in lines if line.startswith(f"[{stage}] would ")) for stage in STAGES}
    return found


def actions(found: dict) -> dict:
    return {stage: line.split("]", 1)[1].split(":", 1)[0].strip() for stage, line in found.items()}


SKIP_ALL = {s: "would skip" for s in STAGES}


@pytest.fixture
def run_copy(smoke_run, tmp_path) -> Path:
    return copy_run(smoke_run, tmp_path / "run", *RUN)


# ---------------------------------------------------------------------------------------------
# The rule, on its own


def test_every_config_field_is_read_by_a_stage_or_is_runtime():
    """Every StudyConfig field is declared: read by a stage (STAGE_FIELDS), runtime or a label.
    Catches a new field that no rerun would ever compare (it would be refused, never absorbed)."""
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    declared = {n for fields in STAGE_FIELDS.values() for n in fields} | set(RUNTIME_FIELDS) | set(LABEL_FIELDS)
    assert names - declared == set()
    assert declared - names == set()


def test_a_changed_stage_reruns_itself_and_every_later_stage_only():
    """plan: the first changed stage and those after it rerun, the earlier ones are skipped; no
    fingerprint is 'record'; an interrupted attempt resumes with the same inputs, restarts with
    others. Catches a rerun that does not propagate, or one that reruns earlier stages."""
    fp = {s: make_fingerprint(s, {"temperature": 4.0}, {}, {}) for s in STAGES}
    changed = make_fingerprint("sparsify", {"temperature": 2.0}, {}, {})
    states = {s: StageState(True, fp[s], fp[s]) for s in STAGES}
    states["sparsify"] = StageState(True, fp["sparsify"], changed)
    got = {d.stage: (d.action, d.reason) for d in plan(states)}
    assert got == {"teacher": ("skip", "inputs unchanged"), "students": ("skip", "inputs unchanged"),
                   "sparsify": ("rerun", "temperature 4.0 -> 2.0"), "bench": ("rerun", "sparsify reruns first")}
    legacy = plan({"teacher": StageState(True, None, fp["teacher"], fp["teacher"]["fields"])})
    assert legacy[0].action == "record" and "no fingerprint" in legacy[0].reason
    bench = {**fp["bench"], "fields": {**fp["bench"]["fields"], "deepsparse": True}}  # not a config field
    legacy = plan({"bench": StageState(True, None, bench, fp["bench"]["fields"])})
    assert legacy[0].action == "record"  # config.json cannot hold it: not a change
    unfinished = {**fp["students"], "complete": False}
    assert plan({"students": StageState(False, unfinished, fp["students"])})[0].action == "resume"
    other = make_fingerprint("students", {"temperature": 2.0}, {}, {})
    assert plan({"students": StageState(False, unfinished, other)})[0].action == "restart"


def test_paths_are_not_compared_contents_are(tmp_path):
    """A moved file with the same bytes is the same input; the same path with other bytes is not.
    Catches a fingerprint keyed by paths (a moved data root or recipe would rerun, an edited one not)."""
    (tmp_path / "a.yaml").write_text("x: 1\n")
    (tmp_path / "b.yaml").write_text("x: 1\n")
    one = make_fingerprint("sparsify", {"recipe": str(tmp_path / "a.yaml")}, {}, {"recipe": str(tmp_path / "a.yaml")})
    two = make_fingerprint("sparsify", {"recipe": str(tmp_path / "b.yaml")}, {}, {"recipe": str(tmp_path / "b.yaml")})
    assert differences(one, two) == []
    (tmp_path / "b.yaml").write_text("x: 2\n")
    two = make_fingerprint("sparsify", {"recipe": str(tmp_path / "b.yaml")}, {}, {"recipe": str(tmp_path / "b.yaml")})
    assert differences(one, two)[0].startswith("recipe b.yaml changed (sha256 ")


def test_a_change_no_stage_reads_is_refused_and_says_why(monkeypatch):
    """The refusal is kept only for a field no stage declares. Catches a refusal that is gone (the
    change would pass silently) or one that fires for a field a stage absorbs."""
    import study.fingerprint as fingerprint

    saved = json.loads(config_json(make_config("smoke")))
    check_absorbable(saved, {**saved, "lr": 0.5})  # a students field: absorbed, no error
    monkeypatch.setitem(fingerprint.STAGE_FIELDS, "students",
                        tuple(n for n in STAGE_FIELDS["students"] if n != "lr"))
    with pytest.raises(StudyError, match=r"\(lr: 0\.001 -> 0\.5\).*no stage declares.*--overwrite"):
        check_absorbable(saved, {**saved, "lr": 0.5})


# ---------------------------------------------------------------------------------------------
# One input of each kind, asked with --dry-run on a copy of the smoke run


def test_the_finished_smoke_run_is_skipped_whole(run_copy, cifar_root, capsys):
    """A finished run asked again with the same command: every stage skipped. Catches a
    fingerprint that is not stable from one run to the next (data, files, fields)."""
    assert actions(dry_run(capsys, run_copy, cifar_root)) == SKIP_ALL


def test_an_edited_recipe_reruns_sparsify_and_bench(run_copy, cifar_root, tmp_path, capsys):
    """The recipe by content: a copy at another path is the same recipe, the same path edited is
    not. Catches a recipe recorded by path (the issue's story: nothing reran)."""
    recipe = tmp_path / "my-recipe.yaml"
    shutil.copy(RECIPE, recipe)
    assert actions(dry_run(capsys, run_copy, cifar_root, "--recipe", recipe)) == SKIP_ALL
    recipe.write_text(recipe.read_text().replace("final_sparsity: 0.80", "final_sparsity: 0.50"))
    found = dry_run(capsys, run_copy, cifar_root, "--recipe", recipe)
    assert actions(found) == {"teacher": "would skip", "students": "would skip", "sparsify": "would rerun",
                              "bench": "would rerun"}
    assert "recipe my-recipe.yaml changed (sha256 " in found["sparsify"]
    assert "sparsify reruns first" in found["bench"]


def test_an_overwritten_teacher_weights_file_reruns_everything(run_copy, cifar_root, tmp_path, capsys):
    """--teacher-weights PATH by content: the file overwritten at the same path reruns the teacher
    and all after it. Catches a weights file recorded by path only."""
    from driver.reruns import current_fingerprint

    weights = tmp_path / "init.pt"
    shutil.copy(run_copy / "teacher.pt", weights)
    saved = json.loads((run_copy / "config.json").read_text())
    config = make_config("smoke", data_root=str(cifar_root), output_dir=str(run_copy), dashboard=False,
                         teacher_weights=str(weights), recipe=saved["recipe"])
    (run_copy / "config.json").write_text(config_json(config))  # as if made with --teacher-weights PATH
    recorded = json.loads((run_copy / "fingerprints" / "teacher.json").read_text())
    write_fingerprint(run_copy / "fingerprints" / "teacher.json",
                      {**current_fingerprint("teacher", config, recorded["data"]), "complete": True})
    assert actions(dry_run(capsys, run_copy, cifar_root, "--teacher-weights", weights)) == SKIP_ALL
    torch = pytest.importorskip("torch")
    payload = torch.load(weights, map_location="cpu")
    payload["extra"] = {"changed": True}
    torch.save(payload, weights)
    found = dry_run(capsys, run_copy, cifar_root, "--teacher-weights", weights)
    assert actions(found) == {s: "would rerun" for s in STAGES}
    assert "teacher_weights init.pt changed (sha256 " in found["teacher"]


def _data_copy(cifar_root: Path, dest: Path) -> Path:
    shutil.copytree(cifar_root, dest, ignore=shutil.ignore_patterns("cifar10-uint8.pt"))
    return dest


def test_a_moved_data_root_with_the_same_images_is_skipped(run_copy, cifar_root, tmp_path, capsys):
    """The data root may move: another path with the same images skips every stage. Catches a data
    fingerprint keyed by the root's path."""
    moved = _data_copy(cifar_root, tmp_path / "moved")
    assert actions(dry_run(capsys, run_copy, moved)) == SKIP_ALL


def test_one_changed_image_reruns_everything(run_copy, cifar_root, tmp_path, capsys):
    """One training image rewritten in place (same path): the teacher and every stage after it
    rerun, naming the training images. Catches a data fingerprint that trusts the path, or a data
    cache that serves the old tensors (its key held only folder mtimes)."""
    data = _data_copy(cifar_root, tmp_path / "data")
    assert actions(dry_run(capsys, run_copy, data)) == SKIP_ALL  # also writes the copy's cache
    images = sorted((data / "train" / "cat").iterdir())
    shutil.copyfile(sorted((data / "train" / "dog").iterdir())[0], images[0])
    found = dry_run(capsys, run_copy, data)
    assert actions(found) == {s: "would rerun" for s in STAGES}
    assert "training images changed (sha256 " in found["teacher"]


def test_a_students_field_reruns_students_sparsify_and_bench_and_keeps_the_teacher(run_copy, cifar_root, capsys):
    """--temperature is read by the students (and sparsify), not the teacher. Catches a change that
    reruns too much (the teacher) or is refused (the old --overwrite rule)."""
    found = dry_run(capsys, run_copy, cifar_root, "--temperature", "2.0")
    assert actions(found) == {"teacher": "would skip", "students": "would rerun", "sparsify": "would rerun",
                              "bench": "would rerun"}
    assert "temperature 4.0 -> 2.0" in found["students"]


def test_a_run_made_before_fingerprints_is_recorded_not_rerun(run_copy, cifar_root, capsys):
    """No fingerprints/ (an older run): every stage 'record', nothing reruns; a field that differs
    from its config.json still reruns that stage. Catches an old run retrained, or taken as current."""
    shutil.rmtree(run_copy / "fingerprints")
    found = dry_run(capsys, run_copy, cifar_root)
    assert actions(found) == {s: "would record its inputs" for s in STAGES}
    assert "no fingerprint" in found["teacher"]
    found = dry_run(capsys, run_copy, cifar_root, "--bench-seconds", "3")
    assert actions(found)["bench"] == "would rerun" and "bench_seconds 0.5 -> 3.0" in found["bench"]


# ---------------------------------------------------------------------------------------------
# Real reruns


def _state(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, sha256_file(p))
            for p in [path / "teacher.pt", *sorted(path.glob("teacher/*/checkpoint_*/*")),
                      *sorted(path.glob("students/*/checkpoint_*/*"))] if p.is_file()}


def test_the_story_an_edited_recipe_reruns_only_sparsify_and_bench(run_copy, cifar_root, tmp_path, capsys):
    """The issue's story: a run made with --recipe my-recipe.yaml, the recipe edited in place
    (final_sparsity 0.80 -> 0.50), the same command again: --dry-run says sparsify and bench rerun
    and why; the run then keeps the teacher and students untouched (mtime and sha256 of every
    checkpoint) and ends with pruned weight_sparsity 0.50; the old tables are in previous/.
    Catches a stale result printed again, or a rerun that retrains the expensive stages. With MLflow
    (``--mlflow local``, its store first filled from the run as it was): ``_mlflow_shows_the_rerun``."""
    recipe = tmp_path / "my-recipe.yaml"
    shutil.copy(RECIPE, recipe)
    tracked = ("--mlflow", "local") if HAS_MLFLOW else ()
    if HAS_MLFLOW:  # the store as the first run, made with --mlflow, left it
        from driver import tracking

        config = orchestrate.config_from_args(["--preset", "smoke", "--data-root", str(cifar_root), "--output-dir",
                                               str(run_copy), "--no-dashboard", "--recipe", str(recipe), *tracked])[0]
        tracker = tracking.open_tracker(config)
        for stage in STAGES:
            tracker.sync(stage)
        tracker.finish(0)
        old_summary = json.loads((run_copy / "sparsify" / "summary.json").read_text())
    recipe.write_text(recipe.read_text().replace("final_sparsity: 0.80", "final_sparsity: 0.50"))
    found = dry_run(capsys, run_copy, cifar_root, "--recipe", recipe)
    assert actions(found) == {"teacher": "would skip", "students": "would skip", "sparsify": "would rerun",
                              "bench": "would rerun"}
    before, old_results = _state(run_copy), (run_copy / "results.csv").read_text()
    run_orchestrate(run_copy, cifar_root, "--recipe", recipe, *tracked, log="rerun.log")
    log = (run_copy / "rerun.log").read_text()
    assert "[sparsify] rerun: recipe my-recipe.yaml changed (sha256 " in log
    assert "[teacher] " in log and "skipping the teacher stage" in log and "skipping the students stage" in log
    assert _state(run_copy) == before
    results = pd.read_csv(run_copy / "results.csv").set_index("model")
    assert results.loc["pruned", "weight_sparsity"] == pytest.approx(0.50, abs=0.01)
    (kept,) = (run_copy / "previous").iterdir()
    assert (kept / "results.csv").read_text() == old_results
    assert json.loads((kept / "config.json").read_text())["recipe"] != str(recipe)
    assert not (run_copy / "rerun").exists()
    assert actions(dry_run(capsys, run_copy, cifar_root, "--recipe", recipe)) == SKIP_ALL
    if HAS_MLFLOW:
        _mlflow_shows_the_rerun(config, old_summary, run_copy)


def _mlflow_shows_the_rerun(config, old_summary: dict, run_dir: Path) -> None:
    """After the story's rerun, MLflow (mlflow #4248: it kept the old values as current): one parent;
    the recipe and benchmark runs each a new run that carries the new ``sha256_pruned`` tag, the
    new accuracies and sparsity, beside the old one, which keeps its values and is tagged
    ``superseded_by`` the new one (no run shows the old digest as current); the teacher's and
    students' runs neither duplicated nor superseded."""
    import mlflow

    from driver import tracking

    client = mlflow.tracking.MlflowClient(tracking.tracking_uri(config))
    experiment = client.get_experiment_by_name(str(run_dir.resolve()))
    stages: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        stages.setdefault(run.data.tags["stage"], []).append(run)
    assert {k: len(v) for k, v in stages.items()} == {"study": 1, "teacher": 1, "students": 3, "sparsify": 2,
                                                       "bench": 2}
    current = {k: [r for r in v if "superseded_by" not in r.data.tags] for k, v in stages.items()}
    assert {k: len(v) for k, v in current.items()} == {"study": 1, "teacher": 1, "students": 3, "sparsify": 1,
                                                        "bench": 1}
    summary = json.loads((run_dir / "sparsify" / "summary.json").read_text())
    accuracies = json.loads((run_dir / "onnx_accuracy.json").read_text())
    (recipe,), (bench,) = current["sparsify"], current["bench"]
    assert recipe.data.tags["sha256_pruned"] == summary["sha256"]["pruned"] != old_summary["sha256"]["pruned"]
    assert recipe.data.metrics["test_acc_pruned"] == summary["test_acc_pruned"]
    assert recipe.data.metrics["weight_sparsity_pruned"] == pytest.approx(0.50, abs=0.01)
    assert bench.data.metrics["onnx_test_acc/pruned"] == accuracies["pruned"]
    for stage, new in (("sparsify", recipe), ("bench", bench)):
        (old,) = [r for r in stages[stage] if r.info.run_id != new.info.run_id]
        assert old.data.tags["superseded_by"] == new.info.run_id and old.info.status == "FINISHED", stage
    (old_recipe,) = [r for r in stages["sparsify"] if r.info.run_id != recipe.info.run_id]
    assert old_recipe.data.tags["sha256_pruned"] == old_summary["sha256"]["pruned"]
    assert old_recipe.data.metrics["test_acc_pruned"] == old_summary["test_acc_pruned"]


def test_an_interrupted_rerun_leaves_the_previous_results_in_place(run_copy, cifar_root, tmp_path, capsys):
    """A recipe rerun killed after its first recipe epoch: results.csv, the summary and the ONNX
    models are still the previous ones and readable, and the next run still knows it must rerun.
    Catches a rerun that writes over the old outputs before its new ones are complete."""
    recipe = tmp_path / "my-recipe.yaml"
    recipe.write_text(RECIPE.read_text().replace("final_sparsity: 0.80", "final_sparsity: 0.50"))
    results, summary = (run_copy / "results.csv").read_text(), (run_copy / "sparsify" / "summary.json").read_text()
    onnx = {p.name: sha256_file(p) for p in (run_copy / "onnx").iterdir()}
    kill_orchestrate_when(run_copy, cifar_root, lambda: (run_copy / "rerun" / "sparsify" / "recipe_checkpoint.pt").exists(),
                          "--recipe", recipe)
    assert (run_copy / "results.csv").read_text() == results
    assert len(pd.read_csv(run_copy / "results.csv")) > 0
    assert (run_copy / "sparsify" / "summary.json").read_text() == summary
    assert {p.name: sha256_file(p) for p in (run_copy / "onnx").iterdir()} == onnx
    assert actions(dry_run(capsys, run_copy, cifar_root, "--recipe", recipe))["sparsify"] == "would rerun"


def test_a_bench_made_without_deepsparse_reruns_once_deepsparse_runs_and_not_the_other_way(
        run_copy, cifar_root, capsys, monkeypatch):
    """The Python 3.12 profile's bench without DeepSparse, then ``--deepsparse-python``: the bench
    reruns (the engine is an input, though ``--deepsparse-python`` is a runtime field). A bench made
    with DeepSparse is kept by a later run that has none. Catches a rerun decided by config fields
    alone."""
    import study.requirements

    bench = run_copy / "fingerprints" / "bench.json"
    recorded = json.loads(bench.read_text())
    assert recorded["fields"]["deepsparse"] is True  # made on the default profile, DeepSparse in process
    monkeypatch.setattr(study.requirements, "has_deepsparse", lambda: False)
    assert actions(dry_run(capsys, run_copy, cifar_root)) == SKIP_ALL  # kept: its DeepSparse rows stay
    del recorded["fields"]["deepsparse"]  # as the Python 3.12 profile records a bench without DeepSparse
    write_fingerprint(bench, recorded)
    assert actions(dry_run(capsys, run_copy, cifar_root)) == SKIP_ALL
    found = dry_run(capsys, run_copy, cifar_root, "--deepsparse-python", sys.executable)
    assert actions(found) == {**SKIP_ALL, "bench": "would rerun"}
    assert found["bench"] == "[bench] would rerun: deepsparse (not recorded) -> True"
