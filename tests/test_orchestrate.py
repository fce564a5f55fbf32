"""The command line: presets, overrides, and one-line errors for bad input (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import orchestrate
import stages.report
import stages.runner
from study import StudyError, make_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_presets_fill_the_config_and_overrides_win():
    smoke = make_config("smoke")
    assert (smoke.arch, smoke.train_subset, smoke.test_subset, smoke.batch_size) == ("resnet18", 300, 200, 128)
    full = make_config("full")
    assert (full.arch, full.teacher_weights, full.recipe_epochs, full.train_subset) == ("resnet101", "imagenet", 55.0, 0)
    custom = make_config("cpu", batch_size=512, lr=0.01, setups=("kd",))
    assert (custom.batch_size, custom.lr, custom.setups, custom.arch) == (512, 0.01, ("kd",), "resnet18")


def test_cli_overrides_are_parsed_into_the_config():
    config, _ = orchestrate.config_from_args(
        ["--preset", "smoke", "--batch-size", "256", "--setups", "ce,kd", "--teacher-weights", "none",
         "--no-dashboard", "--bench-batch-sizes", "1,8", "--temperature", "2.5"])
    assert config.batch_size == 256 and config.setups == ("ce", "kd")
    assert config.teacher_weights is None and config.dashboard is False
    assert config.bench_batch_sizes == (1, 8) and config.temperature == 2.5


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 64}, "--batch-size 64 is outside the allowed range 128..512"),
    ({"batch_size": 513}, "--batch-size 513 is outside the allowed range 128..512"),
    ({"lr": 0.0}, "--lr 0.0 must be > 0"),
    ({"temperature": -1.0}, "--temperature -1.0 must be > 0"),
    ({"max_epochs": 0}, "--max-epochs 0 must be >= 1"),
    ({"setups": ("ce", "dark")}, "unknown setup(s) ['dark']; allowed: ce, kd, kd_feat"),
    ({"arch": "vgg16"}, "--arch 'vgg16' unknown; allowed: resnet18, resnet34, resnet50, resnet101, resnet152"),
    ({"sparsify_loss": "mse"}, "--sparsify-loss 'mse' unknown; allowed: setup, ce"),
    ({"train_subset": -5}, "--train-subset -5 must be >= 0 (0 = all)"),
])
def test_bad_values_raise_one_line(overrides, message):
    with pytest.raises(StudyError) as info:
        make_config("smoke", **overrides)
    assert str(info.value) == message


def test_unknown_preset():
    with pytest.raises(StudyError, match=r"^unknown preset 'huge'; allowed: full, cpu, smoke$"):
        make_config("huge")


def test_python_and_cpu_checks():
    orchestrate.check_python((3, 11, 7))
    orchestrate.check_python((3, 12, 0))  # the Python 3.12 profile, which covers 3.12 and 3.13
    orchestrate.check_python((3, 13, 0))
    with pytest.raises(StudyError, match=r"^Python 3\.14 is not supported; use Python 3\.10 or 3\.11 \(the "
                       r"default profile\) or 3\.12 or 3\.13 \(the Python 3\.12 profile, docs/profiles\.md\)"):
        orchestrate.check_python((3, 14, 0))
    orchestrate.check_avx2("processor : 0\nflags : fpu sse2 avx avx2 fma\n")
    with pytest.raises(StudyError, match="this CPU has no AVX2"):
        orchestrate.check_avx2("processor : 0\nflags : fpu sse2 avx\n")
    with pytest.raises(StudyError, match=r"package\(s\) no_such_pkg_xyz not installed"):
        orchestrate.check_packages(("torch", "no_such_pkg_xyz"))


def test_training_stages_alone_need_neither_sparseml_nor_python_3_11():
    for version in ((3, 12, 1), (3, 13, 0), (3, 14, 0)):  # --stop-after teacher/students: any Python >= 3.10
        orchestrate.check_python(version, sparsify=False)
    orchestrate.check_python((3, 13, 0), sparsify=True)
    for version in ((3, 14, 0), (3, 15, 0)):
        with pytest.raises(StudyError, match=r"or run only the training stages \(--stop-after students\)"):
            orchestrate.check_python(version, sparsify=True)
    with pytest.raises(StudyError, match=r"^Python 3\.9 is not supported"):
        orchestrate.check_python((3, 9, 18), sparsify=False)
    assert [orchestrate.sparsify_stages(s) for s in ("teacher", "students", "sparsify", "bench")] == \
        [False, False, True, True]
    training = orchestrate.required_packages("students")
    assert training == orchestrate.required_packages("teacher") == \
        ("torch", "torchvision", "ray", "pandas", "numpy", "scipy", "tabulate")
    assert set(orchestrate.required_packages("bench", (3, 11, 7))) - set(training) == \
        {"sparseml", "deepsparse", "onnx", "onnxruntime", "openvino", "nncf", "yaml"}
    # Python 3.12/3.13: no DeepSparse wheel (the bench stage runs onnxruntime, DeepSparse via --deepsparse-python)
    for version in ((3, 12, 1), (3, 13, 0)):
        assert set(orchestrate.required_packages("bench", version)) - set(training) == \
            {"sparseml", "sparsezoo", "onnx", "onnxruntime", "openvino", "nncf", "yaml"}


def test_a_run_that_stops_early_says_what_it_left_out_and_how_to_run_it(monkeypatch):
    import importlib.util

    assert stages.runner.skipped_stages_line("bench") is None
    assert stages.runner.skipped_stages_line("students", (3, 11, 7)) == (
        "skipped the sparsify and bench stage(s) (--stop-after students); run the same command with --stop-after bench")
    assert stages.runner.skipped_stages_line("sparsify").startswith("skipped the bench stage(s) (--stop-after sparsify)")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sparseml" else real(name, *a))
    line = stages.runner.skipped_stages_line("teacher", (3, 12, 1))
    assert line.startswith("skipped the students, sparsify and bench stage(s) (--stop-after teacher)")
    assert line.endswith("after installing SparseML for Python 3.12: pip install --no-deps --ignore-requires-python "
                         f"-r {REPO_ROOT}/requirements/py312-sparseml.txt")
    assert "after installing SparseML for Python 3.13: pip install" in stages.runner.skipped_stages_line("students",
                                                                                                      (3, 13, 0))
    # Python 3.14: no install would make those stages run there (check_python refuses them)
    assert stages.runner.skipped_stages_line("students", (3, 14, 0)) == (
        "skipped the sparsify and bench stage(s) (--stop-after students); they run on Python 3.10 to 3.13")


def test_python_3_12_or_3_13_without_sparseml_is_told_the_second_install_step(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("sparseml", "sparsezoo") else real(name, *a))
    with pytest.raises(StudyError) as info:
        orchestrate.check_packages(("torch", "sparseml", "sparsezoo"), project=tmp_path, version=(3, 12, 1))
    assert str(info.value) == (
        "package(s) sparseml, sparsezoo not installed: on Python 3.12 the sparsify and bench stages need SparseML "
        "1.7, whose metadata refuses 3.12; run: pip install --no-deps --ignore-requires-python -r "
        f"{tmp_path}/requirements/py312-sparseml.txt (or run only the training stages: --stop-after students)")
    with pytest.raises(StudyError, match=r"^package\(s\) sparseml, sparsezoo not installed: on Python 3\.13 the "
                       r"sparsify and bench stages need SparseML 1\.7, whose metadata refuses 3\.13; run: pip install "
                       r"--no-deps --ignore-requires-python -r "):
        orchestrate.check_packages(("torch", "sparseml", "sparsezoo"), project=tmp_path, version=(3, 13, 0))
    with pytest.raises(StudyError, match=r"not installed; run: pip install -e"):  # 3.11: the ordinary install
        orchestrate.check_packages(("torch", "sparseml"), project=tmp_path, version=(3, 11, 7))


def test_deepsparse_python_is_checked_up_front(tmp_path):
    missing = run_cli("--preset", "smoke", "--deepsparse-python", str(tmp_path / "python"), "--dry-run")
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"error: --deepsparse-python {tmp_path / 'python'}: not an executable file; "
                                      "give the bin/python of a Python 3.10/3.11 environment with deepsparse 1.7 "
                                      "installed")
    bare = tmp_path / "bin" / "python"
    bare.parent.mkdir()
    bare.symlink_to(sys.executable)
    lonely = run_cli("--preset", "smoke", "--deepsparse-python", str(bare), "--dry-run")
    assert lonely.returncode == 2 and "no deepsparse.benchmark command beside it" in lonely.stderr
    # a deepsparse.benchmark beside a Python that cannot import deepsparse: --dry-run says so, as a run would
    broken = tmp_path / "broken" / "bin"
    broken.mkdir(parents=True)
    (broken / "deepsparse.benchmark").write_text("")
    (broken / "python").write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'deepsparse'\" >&2\nexit 1\n")
    (broken / "python").chmod(0o755)
    refused = run_cli("--preset", "smoke", "--deepsparse-python", str(broken / "python"), "--dry-run")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"error: --deepsparse-python {broken / 'python'}: cannot import deepsparse there "
                                      "(ModuleNotFoundError: No module named 'deepsparse'); give a Python 3.10/3.11 "
                                      "with deepsparse==1.7.0 installed")


def run_cli(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, str(REPO_ROOT / "orchestrate.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_options_defaults_and_presets():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for option in ("--data-root", "--output-dir", "--batch-size", "--lr", "--temperature", "--max-epochs",
                   "--train-subset", "--teacher-weights", "--cpus-per-trial", "--gpus-per-trial",
                   "--address", "--seed", "--no-dashboard", "--report"):
        assert option in proc.stdout, option
    assert "Presets (each sets these fields" in proc.stdout and "smoke: output_dir=runs/smoke" in proc.stdout
    assert max(map(len, proc.stdout.splitlines())) <= 100  # wrapped, also the presets epilog
    assert "full: 256, cpu: 128, smoke: 128" in proc.stdout  # per-preset batch size defaults


def test_bad_input_exits_2_with_one_line_and_keeps_earlier_results(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.csv").write_text("model,test_acc\nteacher,0.9\n")
    proc = run_cli("--preset", "smoke", "--batch-size", "64", "--output-dir", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --batch-size 64 is outside the allowed range 128..512"
    assert (out / "results.csv").read_text() == "model,test_acc\nteacher,0.9\n"


def test_missing_data_root_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_cli("--preset", "smoke", "--data-root", str(missing), "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Explicit values always win: one field per kind of parser, through the CLI into config.json.

#: (preset, field, command-line text, the value it must become): one field per kind of CLI parser
#: (``study.config``: str, int, float, bool, comma-separated str/int, optional str, optional int/float),
#: each with a value the preset does not have, plus the explicit ``none``, ``0`` and ``false``
#: that once lost to a preset's value. bools: True -> --flag, False -> --no-flag.
CLI_CASES = [
    ("full", "arch", "resnet34", "resnet34"),                # str
    ("smoke", "batch_size", "300", 300),                     # int
    ("smoke", "train_subset", "0", 0),                       # int 0 over the preset's 300
    ("full", "temperature", "1.5", 1.5),                     # float
    ("cpu", "recipe_epochs", "55", 55.0),                    # float given as an int, preset's 4.0
    ("full", "dashboard", False, False),                     # bool: --no-flag over a True default
    ("full", "compile", True, True),                         # bool whose default is None
    ("full", "compile", False, False),
    ("full", "setups", "kd,ce", ("kd", "ce")),               # comma-separated str
    ("full", "bench_batch_sizes", "1,8,64", (1, 8, 64)),     # comma-separated int
    ("full", "sparsities", "0.5,0.9", (0.5, 0.9)),           # comma-separated float
    ("full", "teacher_weights", "/x/teacher.pt", "/x/teacher.pt"),  # optional str (a path)
    ("full", "teacher_weights", "none", None),
    ("smoke", "teacher_weights", "imagenet", "imagenet"),    # over the preset's None
    ("full", "data_root", "none", None),
    ("full", "cpus_per_trial", "0.5", 0.5),                  # optional float
    ("full", "gpus_per_trial", "0", 0.0),                    # 0, not none
    ("full", "bench_cores", "1", 1),                         # optional int
    ("smoke", "sweep", "temperature=2,8", (("temperature", (2.0, 8.0)),)),  # repeatable FIELD=V1,V2
]


def test_every_kind_of_parser_has_a_case_and_each_case_differs_from_its_preset():
    """A field with a new kind of parser gets a case above; a case whose value the preset already
    has would pass without the override working."""
    import dataclasses

    from study import PRESETS, StudyConfig

    fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    kinds = {fields[name].metadata["parse"].__name__ for _, name, _, _ in CLI_CASES}
    assert {f.metadata["parse"].__name__ for f in fields.values()} <= kinds
    for preset, name, _, value in CLI_CASES:
        assert PRESETS[preset].get(name, fields[name].default) != value, (preset, name)


@pytest.mark.parametrize("preset, name, text, expected", CLI_CASES)
def test_a_value_given_on_the_command_line_ends_up_in_the_config_and_config_json(preset, name, text, expected):
    import json

    from study.config import config_json

    flag = "--" + name.replace("_", "-")
    argv = ([flag] if text else ["--no-" + flag[2:]]) if isinstance(text, bool) else [flag, text]
    config, _ = orchestrate.config_from_args(["--preset", preset, *argv])
    assert config.preset == preset
    assert getattr(config, name) == expected, (argv, getattr(config, name))
    saved = json.loads(config_json(config))
    assert saved[name] == json.loads(json.dumps(expected)), argv  # tuples (nested too) as JSON lists


def test_the_bare_command_reads_data_and_downloads_there():
    config, _ = orchestrate.config_from_args([])
    assert (config.preset, config.data_root, config.download) == ("full", "data", True)
    config, _ = orchestrate.config_from_args(["--data-root", "mine"])  # given: only read
    assert (config.data_root, config.download) == ("mine", False)
    config, _ = orchestrate.config_from_args(["--no-download"])
    assert (config.data_root, config.download) == ("data", False)


def test_the_bare_command_offline_fails_in_one_line_naming_data_root(tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    monkeypatch.chdir(tmp_path)
    assert orchestrate.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download CIFAR-10 into 'data'"), err
    assert "point --data-root at a local copy" in err[0]
    assert not (tmp_path / "runs").exists()


def test_missing_packages_outside_the_venv_say_to_activate_it(tmp_path):
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    with pytest.raises(StudyError, match=r"activate the project's virtual environment first "
                                         rf"\(\. {tmp_path}/\.venv/bin/activate\)"):
        orchestrate.check_packages(("no_such_pkg_xyz",), prefix="/usr", project=tmp_path)
    with pytest.raises(StudyError, match=r"not installed; run: pip install -e"):  # inside it
        orchestrate.check_packages(("no_such_pkg_xyz",), prefix=str(tmp_path / ".venv"), project=tmp_path)
    with pytest.raises(StudyError, match=r"not installed; run: pip install -e"):  # no .venv at all
        orchestrate.check_packages(("no_such_pkg_xyz",), prefix="/usr", project=tmp_path / "none")


def test_every_option_has_a_description():
    for action in orchestrate.build_parser()._actions:
        text = (action.help or "").split(" (default:")[0]
        assert len(text.split()) >= 3, (action.option_strings, action.help)


def _bench(failed: int = 0):
    import pandas as pd

    rows = [("dense", "onnxruntime", 1, 100.0, 10.0), ("dense", "deepsparse", 1, 150.0, 6.0),
            ("pruned", "deepsparse", 1, 300.0, 3.0), ("dense", "onnxruntime", 16, 900.0, 17.0)]
    frame = pd.DataFrame([{"model": m, "engine": e, "batch_size": b, "num_cores": 2, "items_per_sec": ips,
                           "latency_mean_ms": p50, "latency_p50_ms": p50, "latency_p99_ms": p50,
                           "isa": "avx2", "vnni": False, "amx": "", "status": "ok", "error": ""}
                          for m, e, b, ips, p50 in rows])
    for i in range(failed):  # the last rows fail: no measurements
        frame.loc[len(frame) - 1 - i, ["items_per_sec", "latency_mean_ms", "latency_p50_ms",
                                       "latency_p99_ms", "status", "error"]] = \
            [float("nan")] * 4 + ["error", "RuntimeError: boom"]
    return frame


@pytest.mark.parametrize("failed", [0, 1, 4])
def test_the_end_of_a_run_prints_the_tables_the_cpu_and_the_fastest_models(monkeypatch, capsys, failed):
    import driver.results
    from report import fastest_model

    monkeypatch.setattr(driver.results, "summary_text", lambda config, table, setups: "SUMMARY")
    stages.report.print_results(None, None, None, None)
    assert capsys.readouterr().out == "SUMMARY\n"
    bench = _bench(failed)
    stages.report.print_results(None, None, None, bench)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["SUMMARY", "", "Throughput (items/s, median of the rounds), latency (ms), test accuracy "
                                        "in the engine, size (bytes):"]
    assert ("error" in lines[3]) == bool(failed)  # status/error columns only when one failed
    table = lines[3:3 + len(bench) + 2]
    assert len(table) == len(bench) + 2 and all(line.startswith("|") for line in table)
    ends = lines[3 + len(bench) + 2:]
    if failed == len(bench):
        assert ends == []
    else:
        assert ends == ["CPU: avx2, VNNI False, AMX none"] + [fastest_model(bench, b) for b in ((1, 16) if failed == 0 else (1,))]


def test_a_pruning_window_without_a_step_is_refused_before_any_training():
    # smoke: 300 training images; at batch 512 one step per epoch, and with 2 recipe epochs pruning
    # ends at 0.5 and QAT starts at 1: no step falls between them (recipe.check_pruning_window)
    config = make_config("smoke", batch_size=512, teacher_weights=None)
    assert stages.runner.steps_per_epoch(config) == 1
    with pytest.raises(StudyError, match=r"pruning ends at epoch 0.5 and QAT starts at epoch 1, but with 1 "):
        stages.runner.check_inputs(config, teacher_stage=False)
    ok = make_config("smoke", teacher_weights=None)  # batch 128: 3 steps per epoch
    assert stages.runner.steps_per_epoch(ok) == 3
    stages.runner.check_inputs(ok, teacher_stage=False)
    swept = make_config("smoke", teacher_weights=None, sweep=(("batch_size", ("128", "512")),))
    assert stages.runner.steps_per_epoch(swept) == 1  # the largest batch a trial trains with
