"""Bad input, interruption and failing trials: one clear line, nothing lost, resume to the same result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torchvision.io import write_png

import orchestrate
from models import build_teacher, save_checkpoint
from study import make_config
from trainables.data import CIFAR10_CLASSES

from helpers import SMOKE, copy_run, sparsify_in_process

REPO_ROOT = Path(__file__).resolve().parent.parent
EARLIER = "model,test_acc\nteacher,0.5\n"


@pytest.fixture
def earlier_run(tmp_path, cifar_root):
    """An output dir holding an earlier smoke run's config and results (with this data root)."""
    out = tmp_path / "run"
    out.mkdir()
    config = make_config("smoke", data_root=str(cifar_root), output_dir=str(out), dashboard=False,
                         train_subset=150, test_subset=100)  # helpers.SMOKE
    import dataclasses

    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    (out / "results.csv").write_text(EARLIER)
    return out


def run_main(capsys, *argv):
    code = orchestrate.main([*SMOKE, "--no-dashboard", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_refused(code, err, *needles):
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in err[0], (needle, err[0])


def image_tree(root: Path, classes=CIFAR10_CLASSES, size=32, per_class=1) -> Path:
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                write_png(torch.zeros(3, size, size, dtype=torch.uint8), str(folder / f"{i}.png"))
    return root


def test_data_root_problems_are_one_line(tmp_path, capsys, earlier_run):
    cases = {
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
        "wrong classes": image_tree(tmp_path / "classes", classes=CIFAR10_CLASSES[:9] + ("zebra",)),
        "wrong size": image_tree(tmp_path / "size", size=64),
    }
    (tmp_path / "empty").mkdir()
    expected = {"missing": "does not exist", "empty": "--download", "wrong classes": "zebra",
                "wrong size": "64"}
    for case, root in cases.items():
        code, err = run_main(capsys, "--data-root", root, "--output-dir", earlier_run)
        assert_refused(code, err, root, expected[case])
        assert (earlier_run / "results.csv").read_text() == EARLIER, case


def test_download_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    code, err = run_main(capsys, "--data-root", tmp_path / "data", "--download",
                         "--output-dir", tmp_path / "run")
    assert_refused(code, err, "network")
    assert not (tmp_path / "run").exists()


def test_teacher_weights_problems_are_one_line(tmp_path, capsys, earlier_run, cifar_root, monkeypatch):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    other_arch = tmp_path / "resnet34.pt"
    save_checkpoint(build_teacher("resnet34", weights=None), other_arch, arch="resnet34", stem="cifar",
                    num_classes=10, role="teacher")
    import torchvision.models._api as api
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    (earlier_run / "config.json").unlink()  # an earlier run's results, with any config
    for weights, needle in [(tmp_path / "missing.pt", "missing.pt"), (corrupt, "corrupt.pt"),
                            (other_arch, "resnet34"), ("imagenet", "imagenet")]:
        code, err = run_main(capsys, "--data-root", cifar_root, "--output-dir", earlier_run,
                             "--teacher-weights", weights)
        assert_refused(code, err, "--teacher-weights", needle)
    assert "pass --teacher-weights none (random init) or --teacher-weights PATH" in err[0]  # imagenet
    assert "weights=None" not in err[0]
    assert (earlier_run / "results.csv").read_text() == EARLIER


def test_recipe_problems_are_one_line(tmp_path, capsys, earlier_run, cifar_root):
    not_yaml = tmp_path / "bad.yaml"
    not_yaml.write_text("training_modifiers: [\n  - !EpochRangeModifier\n    end_epoch: : 3\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("version: 1.1.0\nnum_epochs: 3\nmodifiers:\n  - !MagicPruningModifier\n    end_epoch: 3.0\n")
    (earlier_run / "config.json").unlink()  # an earlier run's results, with any config
    for recipe, needle in [(tmp_path / "none.yaml", "not found"), (not_yaml, "not valid YAML"),
                           (unknown, "MagicPruningModifier")]:
        code, err = run_main(capsys, "--data-root", cifar_root, "--output-dir", earlier_run,
                             "--recipe", recipe)
        assert_refused(code, err, recipe, needle)
    assert (earlier_run / "results.csv").read_text() == EARLIER


def test_unreachable_address_is_one_line(capsys, earlier_run, cifar_root):
    code, err = run_main(capsys, "--data-root", cifar_root, "--output-dir", earlier_run,
                         "--address", "127.0.0.1:1")
    assert_refused(code, err, "cannot reach Ray cluster at --address '127.0.0.1:1'")
    code, err = run_main(capsys, "--data-root", cifar_root, "--output-dir", earlier_run,
                         "--address", "nonsense")
    assert_refused(code, err, "is not host:port")
    assert (earlier_run / "results.csv").read_text() == EARLIER


def test_a_different_config_reruns_what_reads_it(capsys, earlier_run, cifar_root):
    """A changed field that a stage reads (--lr: the students) is absorbed by rerunning that stage
    (here --dry-run: exit 0, no refusal; that every field is some stage's or a runtime field is
    tests/test_fingerprints.py's). Catches the old blanket refusal of a changed config."""
    code = orchestrate.main([*SMOKE, "--no-dashboard", "--data-root", str(cifar_root),
                             "--output-dir", str(earlier_run), "--lr", "0.002", "--dry-run"])
    assert code == 0 and "[students] would run" in capsys.readouterr().out
    assert (earlier_run / "results.csv").read_text() == EARLIER


def test_no_avx2_is_one_line(capsys, monkeypatch, cifar_root, earlier_run, tmp_path):
    (tmp_path / "cpuinfo").write_text("processor : 0\nflags : fpu sse2 avx\n")
    monkeypatch.setattr(orchestrate, "CPUINFO", tmp_path / "cpuinfo")
    code, err = run_main(capsys, "--data-root", cifar_root, "--output-dir", earlier_run)
    assert_refused(code, err, "no AVX2", "--stop-after students")
    assert (earlier_run / "results.csv").read_text() == EARLIER


# ---------------------------------------------------------------------------------------------
# Interruption. A run killed during its students stage resumes: the seeds-and-sweep run
# (conftest.py ``sweep_seeds_run``, checked in test_e2e_seeds.py); a trial killed and retried ends
# as one never killed (below, at the end). Below: the recipe, and what a rerun checks.

TRAINED_STATE = ("config.json", "teacher.pt", "teacher", "students")


def test_an_interrupted_recipe_resumes_to_the_same_results(smoke_run, tmp_path, monkeypatch, capsys):
    """The smoke run's recipe, run again in this process on a copy of its trained state, stops
    right after its first epoch's recipe checkpoint is written (as a kill then would leave it); the
    rerun resumes from that checkpoint and ends with the uninterrupted run's accuracies,
    sparsities, history and dense model. Catches a resume that restarts the recipe, skips or
    replays part of its schedule, or restores other weights, masks or optimizer state."""
    from trainables.compress.core import RecipeRun

    out = copy_run(smoke_run, tmp_path / "recipe", *TRAINED_STATE)
    straight = json.loads((smoke_run / "sparsify" / "summary.json").read_text())
    checkpoint = out / "sparsify" / "recipe_checkpoint.pt"

    class Killed(Exception):
        pass

    save = RecipeRun.save

    def save_then_die(self, path, extra=None):
        save(self, path, extra)
        raise Killed

    monkeypatch.setattr(RecipeRun, "save", save_then_die)
    with pytest.raises(Killed):
        sparsify_in_process(out, straight["setup"])
    assert checkpoint.exists() and not (out / "sparsify" / "summary.json").exists()
    monkeypatch.setattr(RecipeRun, "save", save)
    capsys.readouterr()
    resumed = sparsify_in_process(out, straight["setup"])
    assert "resumed the recipe after epoch 1/2" in capsys.readouterr().out
    for key in ("trial_id", "loss", "test_acc_dense", "test_acc_pruned", "test_acc_pruned_quantized",
                "test_acc_pruned_quantized_qdq", "weight_sparsity_pruned", "weight_sparsity_pruned_quantized"):
        assert resumed[key] == straight[key], key
    assert resumed["sha256"]["dense"] == straight["sha256"]["dense"]  # exported before the kill, kept
    columns = ["epoch", "train_loss", "test_acc", "sparsity", "lr", "quantized", "steps"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "sparsify" / "history.csv")[columns],
                                  pd.read_csv(smoke_run / "sparsify" / "history.csv")[columns])
    assert not checkpoint.exists()


def test_a_changed_onnx_model_stops_a_resumed_run(smoke_run, cifar_root, tmp_path):
    """The exported models are checked against sparsify/summary.json's sha256 on every rerun."""
    import onnx

    out = copy_run(smoke_run, tmp_path / "changed", *TRAINED_STATE, "fingerprints", "onnx", "sparsify")
    model = onnx.load(str(out / "onnx" / "dense.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 32  # what DeepSparse's ORT did
    onnx.save(model, str(out / "onnx" / "dense.onnx"))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "orchestrate.py"), *SMOKE,
                           "--no-dashboard", "--data-root", str(cifar_root), "--output-dir", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out / 'onnx' / 'dense.onnx'} has changed"), err
    assert not (out / "benchmark.csv").exists()


# ---------------------------------------------------------------------------------------------
# A trial whose worker dies mid-run continues from its last checkpoint.


def test_a_killed_trial_finishes_from_its_checkpoint_with_the_results_of_a_trial_never_killed(tmp_path, cifar_root):
    """Two ce student trials under Tune on 64 training and 32 test images of the real tree (2 epochs
    of 2 steps, 1 CPU and 1 thread each, side by side): one whose worker process dies in its 2nd
    epoch's report and is retried, one never killed. The retried one starts from epoch 1's checkpoint (epoch 1 not redone), and both end
    with the same epoch-2 test accuracy and train loss. Catches a resume that redoes or skips
    epochs, or restores other weights, optimizer state or data order."""
    import ray
    from ray import tune

    from trainables.data import CIFAR10Tensors, load_cifar10
    from trainables.stopper import AccuracyPlateauStopper

    tree = load_cifar10(cifar_root)
    data = CIFAR10Tensors(tree.train_images[::2][:64], tree.train_labels[::2][:64], tree.test_images[::3][:32],
                          tree.test_labels[::3][:32])

    def flaky_student(config, data, teacher):
        """train_student; with a ``marker``, its worker process dies once, in its 2nd epoch's report."""
        from ray import tune

        import trainables.student as student
        import trainables.train as train

        if config["marker"] is None:
            return student.train_student(config, data, teacher)
        marker = Path(config["marker"])
        log = marker.with_suffix(".log")  # each attempt: what it started from, the epochs it reported
        with open(log, "a") as stream:
            stream.write("checkpoint\n" if tune.get_checkpoint() else "fresh\n")
        report = tune.report

        def dying_report(metrics, checkpoint=None):
            if metrics["epoch"] == 2 and not marker.exists():
                marker.touch()
                os._exit(1)
            with open(log, "a") as stream:
                stream.write(f"{metrics['epoch']}\n")
            report(metrics, checkpoint=checkpoint)

        train.tune.report = dying_report
        student.train_student(config, data, teacher)

    teacher = {"arch": "resnet18", "stem": "cifar", "num_classes": 10,
               "state_dict": build_teacher("resnet18", weights=None).state_dict()}
    config = {"arch": "resnet18", "stem": "cifar", "num_classes": 10, "seed": 0, "batch_size": 32,
              "temperature": 4.0, "lr": 1e-3, "max_epochs": 2, "threads": 1, "setup": "ce",
              "marker": tune.grid_search([str(tmp_path / "died-once"), None])}
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        grid = tune.Tuner(
            tune.with_resources(tune.with_parameters(flaky_student, data=data, teacher=teacher), {"cpu": 1}),
            param_space=config,
            run_config=tune.RunConfig(name="flaky", storage_path=str(tmp_path), verbose=0,
                                      stop=AccuracyPlateauStopper(max_epochs=2),
                                      failure_config=tune.FailureConfig(max_failures=1)),
        ).fit()
    finally:
        ray.shutdown()
    assert (tmp_path / "died-once").exists()
    killed, straight = sorted(grid, key=lambda result: result.config["marker"] is None)
    assert killed.error is None and straight.error is None
    # Epoch 1 is not redone: the retried worker started from epoch 1's checkpoint and reported
    # epoch 2 only. (On a loaded machine Tune can lose the dead worker's epoch-1 row: [2] then.)
    assert (tmp_path / "died-once.log").read_text().split() == ["fresh", "1", "checkpoint", "2"]
    assert list(killed.metrics_dataframe["epoch"]) in ([1, 2], [2]), list(killed.metrics_dataframe["epoch"])
    assert list(straight.metrics_dataframe["epoch"]) == [1, 2]
    assert (killed.metrics["epoch"], killed.metrics["test_acc"], killed.metrics["train_loss"]) == \
        (straight.metrics["epoch"], straight.metrics["test_acc"], straight.metrics["train_loss"])
