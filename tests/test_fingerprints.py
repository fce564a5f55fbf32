"""A result always matches its inputs: every stage records what it read (``study.fingerprint``), and a
changed input reruns exactly the stages it affects (``study.reruns``, ``driver.reruns``, from what
each stage declares: ``stages.pipeline.PIPELINE``).

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
from bench.cpu import cpu_isa
from study import STAGES, StudyConfig, make_config
from study.config import RUNTIME_FIELDS, config_json
from study.files import sha256_file
from stages.pipeline import BY_NAME, PIPELINE
from study.fingerprint import LABEL_FIELDS, differences, make_fingerprint, write_fingerprint
from study.reruns import StageState, plan
from study.sources import PACKAGES, ROOT, code_digests, source_files

from helpers import NODE_CPUS, SMOKE, copy_run, kill_orchestrate_when, run_orchestrate

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = REPO_ROOT / "recipes" / "prune_quantize.yaml"
#: The '.[tracking]' extra: the story test then also checks what MLflow shows after the rerun.
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
RUN = ("config.json", "teacher.pt", "teacher", "students", "onnx", "sparsify", "fingerprints",
       "results.csv", "setups.csv", "benchmark.csv", "onnx_accuracy.json")


def dry_run(capsys, out: Path, data_root: Path, *args) -> dict:
    """``orchestrate.main([... '--dry-run'])`` on ``out``: stage -> its line (exit code 0 checked)."""
    capsys.readouterr()
    code = orchestrate.main([*SMOKE, "--no-dashboard", "--data-root", str(data_root),
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


def test_every_config_field_is_read_by_exactly_one_stage_or_is_runtime():
    """Every StudyConfig field is declared once: by one stage (its ``fields``, the first that reads
    it; the later ones rerun after it), or as a runtime field or a label. Catches a new field that
    no rerun would ever compare (a change in it would keep results made under the old value), and
    one declared twice (which stage owns it?)."""
    names = [f.name for f in dataclasses.fields(StudyConfig)]
    declared = [n for stage in PIPELINE for n in stage.fields] + [*RUNTIME_FIELDS, *LABEL_FIELDS]
    assert [stage.name for stage in PIPELINE] == list(STAGES)
    assert sorted(declared) == sorted(names)


def test_a_changed_stage_reruns_itself_and_every_later_stage_only():
    """plan: the first changed stage and those after it rerun, the earlier ones are skipped; an
    interrupted attempt resumes with the same inputs, restarts with others. Catches a rerun that
    does not propagate, or one that reruns earlier stages."""
    fp = {s: make_fingerprint(BY_NAME[s], {"temperature": 4.0}, {}, {}) for s in STAGES}
    changed = make_fingerprint(BY_NAME["sparsify"], {"recipe_epochs": 2.0}, {}, {})
    states = {s: StageState(True, fp[s], fp[s]) for s in STAGES}
    states["sparsify"] = StageState(True, fp["sparsify"], changed)
    got = {d.stage: (d.action, d.reason) for d in plan(states)}
    assert got == {"teacher": ("skip", "inputs unchanged"), "students": ("skip", "inputs unchanged"),
                   "sparsify": ("rerun", "recipe_epochs None -> 2.0"), "bench": ("rerun", "sparsify reruns first")}
    unfinished = {**fp["students"], "complete": False}
    assert plan({"students": StageState(False, unfinished, fp["students"])})[0].action == "resume"
    other = make_fingerprint(BY_NAME["students"], {"temperature": 2.0}, {}, {})
    assert plan({"students": StageState(False, unfinished, other)})[0].action == "restart"


def _project_copy(dest: Path) -> Path:
    """The project's packages (``study.sources.PACKAGES``, every ``.py`` of them) copied under ``dest``."""
    for path in ROOT.glob("*/**/*.py"):
        if path.relative_to(ROOT).parts[0] in PACKAGES:
            target = dest / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return dest


def _plan_after_edit(root: Path, path: str, edit) -> dict:
    """stage -> (action, reason) after ``edit(text)`` rewrote ``root/path``, against fingerprints
    recorded before it (each stage's code only: fields, files and data the same)."""
    before = {s.name: make_fingerprint(s, {}, {}, {}, code=code_digests(s.code, root)) for s in PIPELINE}
    file = root / path
    file.write_text(edit(file.read_text()))
    states = {s.name: StageState(True, before[s.name],
                                 make_fingerprint(s, {}, {}, {}, code=code_digests(s.code, root))) for s in PIPELINE}
    return {d.stage: (d.action, d.reason) for d in plan(states)}


def test_an_edited_source_file_reruns_the_stages_that_run_it_and_names_it(tmp_path):
    """The code is in the key: the students' loss doubled in trainables/losses.py reruns the
    students and every later stage, naming the file, and keeps the teacher (which runs no student
    loss); a comment added to report/ or bench/perf/ reruns nothing. Catches results kept under
    edited code (the key held no code), a key that misses a module the stage imports, or one that
    holds the report."""
    root = _project_copy(tmp_path / "project")
    got = _plan_after_edit(root, "trainables/losses.py", lambda text: text.replace(
        "loss = sum(summands[name] for name in names) / len(names)",
        "loss = 2.0 * sum(summands[name] for name in names) / len(names)"))
    assert got == {"teacher": ("skip", "inputs unchanged"),
                   "students": ("rerun", "code trainables/losses.py changed"),
                   "sparsify": ("rerun", "students reruns first"), "bench": ("rerun", "students reruns first")}
    got = _plan_after_edit(root, "trainables/compress/core.py", lambda text: text + "# a comment\n")
    assert got["students"][0] == "skip" and got["sparsify"] == ("rerun", "code trainables/compress/core.py changed")
    for path in ("report/tables.py", "bench/perf/study_time.py"):
        got = _plan_after_edit(root, path, lambda text: text + "# a comment\n")
        assert {d: action for d, (action, _) in got.items()} == {s: "skip" for s in STAGES}, path


def test_the_code_of_a_stage_is_what_its_modules_import():
    """Each stage's code, from the real import graph: its entry modules, their packages and what
    they import (inside functions too); nothing of report/ or bench/perf/, and the teacher's holds
    no student loss. Catches a stage whose code misses what it runs, or a teacher rerun by an edit
    to the students' loss."""
    code = {stage.name: source_files(stage.code) for stage in PIPELINE}
    assert not [p for files in code.values() for p in files if p.startswith(("report/", "bench/perf/"))]
    assert "trainables/losses.py" not in code["teacher"] and "trainables/student.py" not in code["teacher"]
    assert {"trainables/train.py", "trainables/batches.py", "models/resnet.py", "study/config.py",
            "driver/tuning.py", "trainables/stopper.py", "trainables/__init__.py"} <= set(code["teacher"])
    assert {"trainables/losses.py", "trainables/student.py", "trainables/train.py"} <= set(code["students"])
    assert {"trainables/compress/core.py", "trainables/compress/ptq.py", "trainables/losses.py",
            "driver/results.py", "driver/stats.py"} <= set(code["sparsify"])  # ptq, stats: imported in functions
    assert {"bench/benchmark.py", "trainables/batches.py", "stages/bench.py"} <= set(code["bench"])
    assert "trainables/compress/structured.py" in code["sparsify"] and "stages/sparsify.py" in code["sparsify"]
    assert not [p for files in code.values() for p in files
                if p in ("stages/runner.py", "stages/pipeline.py")]  # the order of the stages, the rerun rule
    assert not [p for files in code.values() for p in files
                if p.startswith(("study/reruns", "study/fingerprint", "driver/reruns"))]


def test_imports_are_read_inside_functions_relative_and_from_packages(tmp_path):
    """source_files: ``import a.b`` runs ``a/__init__``; ``from a import m`` may name a module; a
    relative import resolves against its package; a third-party import is left out, also when it
    is installed beside the project. Catches a walk that reads only top-level imports, drops
    packages' ``__init__`` or walks into torch."""
    for name, text in {"a/__init__.py": "", "a/b.py": "import os\ndef f():\n    from . import c\n",
                       "a/c.py": "from .d import x\n", "a/d.py": "x = 1\n", "e.py": "import torch\n",
                       "main.py": "from a import b\nimport e\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "torch").mkdir()  # a package installed beside the project, as in site-packages
    (tmp_path / "torch" / "__init__.py").write_text("")
    assert source_files(["main"], tmp_path, ("a", "e", "main")) == (
        "a/__init__.py", "a/b.py", "a/c.py", "a/d.py", "e.py", "main.py")
    with pytest.raises(ValueError, match="not a module"):
        source_files(["nope"], tmp_path, ("nope",))


def test_the_project_packages_are_the_import_linters():
    """study.sources.PACKAGES is pyproject.toml's import-linter ``root_packages``. Catches a new
    top-level package whose modules no stage's code would hold."""
    import re

    from study.sources import PACKAGES

    line = re.search(r"^root_packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert sorted(PACKAGES) == sorted(name.strip(' "') for name in line.split(","))


def test_paths_are_not_compared_contents_are(tmp_path):
    """A moved file with the same bytes is the same input; the same path with other bytes is not.
    Catches a fingerprint keyed by paths (a moved data root or recipe would rerun, an edited one not)."""
    (tmp_path / "a.yaml").write_text("x: 1\n")
    (tmp_path / "b.yaml").write_text("x: 1\n")
    one = make_fingerprint(BY_NAME["sparsify"], {"recipe": str(tmp_path / "a.yaml")}, {}, {"recipe": str(tmp_path / "a.yaml")})
    two = make_fingerprint(BY_NAME["sparsify"], {"recipe": str(tmp_path / "b.yaml")}, {}, {"recipe": str(tmp_path / "b.yaml")})
    assert differences(one, two) == []
    (tmp_path / "b.yaml").write_text("x: 2\n")
    two = make_fingerprint(BY_NAME["sparsify"], {"recipe": str(tmp_path / "b.yaml")}, {}, {"recipe": str(tmp_path / "b.yaml")})
    assert differences(one, two)[0].startswith("recipe b.yaml changed (sha256 ")


def test_a_run_made_before_fingerprints_is_refused_in_one_line_and_left_untouched(tmp_path, capsys, cifar_root):
    """A run directory with a stage's outputs but no fingerprints/ (made before fingerprints
    existed): a run and --dry-run both exit 2 with one line naming --overwrite and --output-dir,
    and touch nothing; --overwrite is allowed. Catches an old run taken as current, retrained
    under it, or written to before the refusal."""
    out = tmp_path / "old"
    (out / "students").mkdir(parents=True)
    (out / "teacher.pt").write_bytes(b"weights")
    (out / "config.json").write_text("{}")
    (out / "results.csv").write_text("model,test_acc\nteacher,0.5\n")
    before = {str(p): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in out.rglob("*")}
    for extra in (("--dry-run",), ()):  # --dry-run first: a run that is not refused would train
        code = orchestrate.main([*SMOKE, "--no-dashboard", "--data-root", str(cifar_root),
                                 "--output-dir", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: --output-dir {out} holds teacher, students outputs without their "
                                 "fingerprints"), err
        assert "--overwrite" in err[0] and "new --output-dir" in err[0]
    assert {str(p): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in out.rglob("*")} == before
    code = orchestrate.main([*SMOKE, "--no-dashboard", "--data-root", str(cifar_root),
                             "--output-dir", str(out), "--dry-run", "--overwrite"])
    assert code == 0 and "would remove the earlier run" in capsys.readouterr().out


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
                         teacher_weights=str(weights), recipe=saved["recipe"], train_subset=saved["train_subset"],
                         test_subset=saved["test_subset"])
    (run_copy / "config.json").write_text(config_json(config))  # as if made with --teacher-weights PATH
    recorded = json.loads((run_copy / "fingerprints" / "teacher.json").read_text())
    write_fingerprint(run_copy / "fingerprints" / "teacher.json",
                      {**current_fingerprint(BY_NAME["teacher"], config, recorded["data"]), "complete": True})
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


def test_an_edited_source_file_reruns_from_the_first_stage_that_runs_it(run_copy, cifar_root, capsys):
    """--dry-run on the smoke run whose students were recorded with another trainables/losses.py
    (as after an edit of it): the teacher is kept, the students rerun naming the file, and every
    later stage after them. Catches a run's fingerprints made without the code (the issue's
    story: "would skip: inputs unchanged" under an edited loss)."""
    path = run_copy / "fingerprints" / "students.json"
    recorded = json.loads(path.read_text())
    recorded["code"]["trainables/losses.py"] = "0" * 64
    write_fingerprint(path, recorded)
    found = dry_run(capsys, run_copy, cifar_root)
    assert found["students"] == "[students] would rerun: code trainables/losses.py changed"
    assert actions(found) == {"teacher": "would skip", "students": "would rerun", "sparsify": "would rerun",
                              "bench": "would rerun"}


# ---------------------------------------------------------------------------------------------
# Real reruns


def _state(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, sha256_file(p))
            for p in [path / "teacher.pt", *sorted(path.glob("teacher/*/checkpoint_*/*")),
                      *sorted(path.glob("students/*/checkpoint_*/*"))] if p.is_file()}


#: The story's benchmark: one round at batch 1.
STORY_BENCH = ("--bench-rounds", "1", "--bench-batch-sizes", "1")


def test_the_story_an_edited_recipe_reruns_only_sparsify_and_bench(run_copy, cifar_root, tmp_path, capsys, two_nodes):
    """The issue's story: a run made with --recipe my-recipe.yaml, the recipe edited in place
    (final_sparsity 0.80 -> 0.50), the same command again: --dry-run says sparsify and bench rerun
    and why; the run then keeps the teacher and students untouched (mtime and sha256 of every
    checkpoint) and ends with pruned weight_sparsity 0.50; the old tables are in previous/.
    Catches a stale result printed again, or a rerun that retrains the expensive stages. The rerun
    benchmarks in one round at batch 1 (``STORY_BENCH``: that the bench reruns is checked, not its
    speed). The rerun goes through a two-node Ray cluster (``--address``): the recipe and the
    benchmark each on one node, the benchmark with that node's cores (not the cluster's 4). With MLflow
    (``--mlflow local``, its store first filled from the run as it was): ``_mlflow_shows_the_rerun``."""
    recipe = tmp_path / "my-recipe.yaml"
    shutil.copy(RECIPE, recipe)
    tracked = ("--mlflow", "local") if HAS_MLFLOW else ()
    if HAS_MLFLOW:  # the store as the first run, made with --mlflow and these flags, left it
        from driver import tracking

        config = orchestrate.config_from_args([*SMOKE, "--data-root", str(cifar_root), "--output-dir",
                                               str(run_copy), "--no-dashboard", "--recipe", str(recipe), *STORY_BENCH,
                                               *tracked])[0]
        tracker = tracking.open_tracker(config)
        for stage in STAGES:
            tracker.sync(stage)
        tracker.finish(0)
        old_summary = json.loads((run_copy / "sparsify" / "summary.json").read_text())
    recipe.write_text(recipe.read_text().replace("final_sparsity: 0.80", "final_sparsity: 0.50"))
    found = dry_run(capsys, run_copy, cifar_root, "--recipe", recipe, *STORY_BENCH)
    assert actions(found) == {"teacher": "would skip", "students": "would skip", "sparsify": "would rerun",
                              "bench": "would rerun"}
    before, old_results = _state(run_copy), (run_copy / "results.csv").read_text()
    run_orchestrate(run_copy, cifar_root, "--recipe", recipe, *STORY_BENCH, *tracked, "--address", two_nodes.address,
                    log="rerun.log")
    log = (run_copy / "rerun.log").read_text()
    assert "[sparsify] rerun: recipe my-recipe.yaml changed (sha256 " in log
    assert "[teacher] " in log and "skipping the teacher stage" in log and "skipping the students stage" in log
    assert _state(run_copy) == before
    cores = min(NODE_CPUS, cpu_isa()["num_cores"])
    assert "[resources] 2 node(s)" in log and f"[bench] {cores} cores on node " in log
    bench = pd.read_csv(run_copy / "benchmark.csv")
    assert set(bench["num_cores"]) == {cores} and (bench["status"] == "ok").all()
    results = pd.read_csv(run_copy / "results.csv").set_index("model")
    assert results.loc["pruned", "weight_sparsity"] == pytest.approx(0.50, abs=0.01)
    (kept,) = (run_copy / "previous").iterdir()
    assert (kept / "results.csv").read_text() == old_results
    assert json.loads((kept / "config.json").read_text())["recipe"] != str(recipe)
    assert not (run_copy / "rerun").exists()
    assert actions(dry_run(capsys, run_copy, cifar_root, "--recipe", recipe, *STORY_BENCH)) == SKIP_ALL
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
