#!/usr/bin/env python
"""Distill, sparsify, benchmark: the whole model-compression study, orchestrated by Ray.

Stages (each one hop away from here):
  1. teacher   ``trainables.train.train_teacher``  - fine-tune a ResNet teacher (one Tune trial)
  2. students  ``trainables.train.train_student``  - three setups (ce, kd, kd_feat) at once under Tune
  3. sparsify  ``trainables.sparsify``             - best student -> SparseML recipe -> ONNX
  4. bench     ``bench.benchmark``                 - DeepSparse / onnxruntime on a CPU-only actor
  5. report    ``report.ipynb``                    - executed notebook -> HTML/PDF (``--report``)

Usage: ``python orchestrate.py --preset smoke --data-root DIR`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # Neural Magic packages: no phoning home

PROJECT_DIR = Path(__file__).resolve().parent
SETUPS = ("ce", "kd", "kd_feat")
STAGES = ("teacher", "students", "sparsify", "bench")
TASK_BATCH_RANGE = (128, 512)  # the task: Adam, batch size 128..512
REQUIRED_PACKAGES = ("torch", "torchvision", "ray", "sparseml", "deepsparse", "onnx",
                     "onnxruntime", "pandas", "numpy", "tabulate", "yaml")


class StudyError(Exception):
    """A problem with the user's input or machine, reported as one line and exit code 2."""


@dataclass
class StudyConfig:
    """Every setting of one study. Presets fill it; any field can be overridden on the CLI.

    Units: learning rates are Adam step sizes; epochs count passes over the (subset of the)
    training set; ``bench_seconds``/``bench_warmup_seconds`` are seconds; ``*_subset`` are image
    counts (0 = the whole split); ``cpus_per_trial``/``gpus_per_trial`` are Ray resource units
    (fractions allowed; ``None`` = share the machine between the concurrent student trials).
    """

    preset: str = "full"
    data_root: str | None = None
    download: bool = False
    output_dir: str = "runs/full"
    arch: str = "resnet101"
    stem: str = "cifar"
    teacher_weights: str | None = "imagenet"
    train_subset: int = 0
    test_subset: int = 0
    batch_size: int = 256
    lr: float = 1e-3
    teacher_lr: float = 1e-4
    temperature: float = 4.0
    tolerance: float = 0.01
    patience: int = 2
    max_epochs: int = 50
    teacher_max_epochs: int = 30
    setups: tuple[str, ...] = SETUPS
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    address: str | None = None
    seed: int = 0
    dashboard: bool = True
    recipe: str = str(PROJECT_DIR / "recipes" / "prune_quantize.yaml")
    recipe_epochs: float = 55.0
    bench_cores: int | None = None
    bench_batch_sizes: tuple[int, ...] = (1, 32)
    bench_warmup_seconds: float = 2.0
    bench_seconds: float = 10.0
    stop_after: str = "bench"
    report: bool = False


PRESETS: dict[str, dict] = {
    # The assignment as written: ResNet-101 on all of CIFAR-10, ImageNet init, 55 recipe epochs. GPU.
    "full": {},
    # Same pipeline on 2 CPU cores in well under an hour: resnet18-based models, a few thousand images.
    "cpu": dict(output_dir="runs/cpu", arch="resnet18", teacher_weights=None,
                train_subset=2000, test_subset=1000, batch_size=128, teacher_lr=1e-3,
                max_epochs=6, teacher_max_epochs=6, recipe_epochs=4.0, bench_seconds=5.0),
    # The same code path on a few hundred images; what the end-to-end test runs.
    "smoke": dict(output_dir="runs/smoke", arch="resnet18", teacher_weights=None,
                  train_subset=300, test_subset=200, batch_size=128, teacher_lr=1e-3,
                  max_epochs=3, teacher_max_epochs=2, recipe_epochs=2.0,
                  bench_warmup_seconds=0.5, bench_seconds=2.0),
}


def make_config(preset: str, **overrides) -> StudyConfig:
    """The preset's config with ``overrides`` (field name -> value; ``None`` = keep) applied.

    Raises StudyError for an unknown preset, an unknown field, or a value outside what the
    study allows (see ``validate``).
    """
    if preset not in PRESETS:
        raise StudyError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise StudyError(f"unknown config field(s) {unknown}; allowed: {sorted(names)}")
    values = {"preset": preset, **PRESETS[preset]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = StudyConfig(**values)
    validate(config)
    return config


def validate(config: StudyConfig) -> None:
    """Check every value that can be checked before any long work starts; StudyError if not."""
    low, high = TASK_BATCH_RANGE
    if not low <= config.batch_size <= high:
        raise StudyError(f"--batch-size {config.batch_size} is outside the allowed range {low}..{high}")
    for name in ("lr", "teacher_lr", "temperature", "tolerance", "bench_seconds"):
        if not getattr(config, name) > 0:
            raise StudyError(f"--{name.replace('_', '-')} {getattr(config, name)} must be > 0")
    for name in ("max_epochs", "teacher_max_epochs", "patience"):
        if getattr(config, name) < 1:
            raise StudyError(f"--{name.replace('_', '-')} {getattr(config, name)} must be >= 1")
    if config.recipe_epochs <= 0:
        raise StudyError(f"--recipe-epochs {config.recipe_epochs} must be > 0")
    for name in ("train_subset", "test_subset"):
        if getattr(config, name) < 0:
            raise StudyError(f"--{name.replace('_', '-')} {getattr(config, name)} must be >= 0 (0 = all)")
    bad = [s for s in config.setups if s not in SETUPS]
    if bad or not config.setups:
        raise StudyError(f"unknown setup(s) {bad or list(config.setups)}; allowed: {', '.join(SETUPS)}")
    from models import ARCHS, STEMS

    if config.arch not in ARCHS:
        raise StudyError(f"--arch {config.arch!r} unknown; allowed: {', '.join(ARCHS)}")
    if config.stem not in STEMS:
        raise StudyError(f"--stem {config.stem!r} unknown; allowed: {', '.join(STEMS)}")
    if config.stop_after not in STAGES:
        raise StudyError(f"--stop-after {config.stop_after!r} unknown; allowed: {', '.join(STAGES)}")
    if any(b < 1 for b in config.bench_batch_sizes):
        raise StudyError(f"--bench-batch-sizes {config.bench_batch_sizes} must all be >= 1")


# ---------------------------------------------------------------------------------------------
# Command line


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(part) for part in text.split(",") if part)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _shown(value) -> str:
    """A default as the user would type it: ``ce,kd`` for a tuple, ``none`` for None."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ("none", "") else text


def build_parser() -> argparse.ArgumentParser:
    """argparse parser: one option per StudyConfig field, help shows each preset's default."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets: " + "; ".join(
            f"{name}: {', '.join(f'{k}={v}' for k, v in values.items()) or 'the defaults'}"
            for name, values in PRESETS.items()),
    )
    parser.add_argument("--preset", default="full", help=f"one of {', '.join(PRESETS)} (default: full)")
    kinds = {"setups": _csv(str), "bench_batch_sizes": _csv(int), "teacher_weights": _optional_str,
             "data_root": _optional_str, "address": _optional_str}
    helps = {
        "data_root": "CIFAR-10 root: image folders train/<class>/, test/<class>/, or cifar-10-batches-py",
        "download": "download CIFAR-10 with torchvision into --data-root when it is not there",
        "teacher_weights": "'imagenet' (torchvision, needs network), 'none', or a teacher checkpoint path",
        "train_subset": "stratified subset of training images (0 = all 50,000)",
        "test_subset": "stratified subset of test images (0 = all 10,000)",
        "lr": "Adam learning rate of the students", "teacher_lr": "Adam learning rate of the teacher",
        "temperature": "softmax temperature of the soft targets",
        "tolerance": "stop rule: |acc_e - acc_(e-1)| < tolerance (accuracy 0..1) ...",
        "patience": "... for this many epochs in a row",
        "max_epochs": "safety bound on student epochs", "teacher_max_epochs": "safety bound on teacher epochs",
        "setups": "comma-separated student setups", "cpus_per_trial": "Ray CPUs per student trial (default: share)",
        "gpus_per_trial": "Ray GPUs per student trial (default: 1/#setups when a GPU is present)",
        "address": "address of an existing Ray cluster (default: start a local one)",
        "dashboard": "start the Ray dashboard", "recipe": "SparseML recipe YAML",
        "recipe_epochs": "num_epochs of the recipe (phases scale with it)",
        "bench_cores": "cores of the CPU-only benchmark actor (default: all of this machine's)",
        "bench_batch_sizes": "comma-separated batch sizes to benchmark",
        "stop_after": f"last stage to run: {', '.join(STAGES)}",
        "report": "execute report.ipynb and render it to HTML/PDF at the end",
    }
    for f in dataclasses.fields(StudyConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        defaults = {p: _shown(PRESETS[p].get(f.name, f.default)) for p in PRESETS}
        shown = _shown(f.default) if len(set(defaults.values())) == 1 else \
            ", ".join(f"{p}: {v}" for p, v in defaults.items())
        text = helps.get(f.name, f.name.replace("_", " "))
        if "default:" not in text:  # some helps explain their None default themselves
            text += f" (default: {shown})"
        if f.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        kind = kinds.get(f.name) or {"int": int, "float": float, "int | None": int,
                                     "float | None": float}.get(f.type, str)
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--overwrite", action="store_true",
                        help="reuse an --output-dir made with a different config (default: refuse)")
    parser.add_argument("--report-only", action="store_true",
                        help="only (re)build the report of the run in --output-dir")
    return parser


def config_from_args(argv: list[str] | None = None) -> tuple[StudyConfig, argparse.Namespace]:
    """Parse ``argv`` into a validated StudyConfig (StudyError on bad values)."""
    args = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(StudyConfig)} - {"preset"}
    overrides = {name: getattr(args, name) for name in fields}
    return make_config(args.preset, **overrides), args


# ---------------------------------------------------------------------------------------------
# Start-up checks


def check_python(version=sys.version_info) -> None:
    """StudyError unless Python is 3.10 or 3.11 (deepsparse/sparseml 1.7 ship no other wheels)."""
    if not ((3, 10) <= tuple(version[:2]) <= (3, 11)):
        raise StudyError(f"Python {version[0]}.{version[1]} is not supported; use Python 3.10 or 3.11 "
                         "(deepsparse/sparseml 1.7 ship wheels only for those)")


def check_packages(names=REQUIRED_PACKAGES) -> None:
    """StudyError naming the first package of the stack that cannot be found."""
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise StudyError(f"package(s) {', '.join(missing)} not installed; run: pip install -e "
                         f"'{PROJECT_DIR}[report,test]'")


CPUINFO = Path("/proc/cpuinfo")


def check_avx2(cpuinfo: str | None = None) -> None:
    """StudyError unless the CPU has AVX2 (DeepSparse 1.7 needs AVX2, AVX-512 or NEON)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return  # not Linux: let deepsparse decide
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    if "avx2" not in flags.split() and "asimd" not in flags.split():
        raise StudyError("this CPU has no AVX2; DeepSparse needs AVX2 or AVX-512: run with "
                         "--stop-after students, or on another machine")


# ---------------------------------------------------------------------------------------------
# Stages


def load_data(config: StudyConfig):
    """CIFAR-10 as uint8 tensors (``trainables.data``), cut to the preset's stratified subsets."""
    from trainables.data import CIFAR10Tensors, DataRootError, load_cifar10, stratified_subset

    if config.data_root is None:
        raise StudyError("--data-root is required: a CIFAR-10 folder (image folders or "
                         "cifar-10-batches-py), or an empty folder with --download")
    try:
        data = load_cifar10(config.data_root, download=config.download)
    except DataRootError as err:
        raise StudyError(str(err)) from None
    train = (data.train_images, data.train_labels)
    test = (data.test_images, data.test_labels)
    try:
        if config.train_subset:
            train = stratified_subset(*train, config.train_subset, seed=config.seed)
        if config.test_subset:
            test = stratified_subset(*test, config.test_subset, seed=config.seed)
    except ValueError as err:
        raise StudyError(str(err)) from None
    return CIFAR10Tensors(*train, *test)


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """StudyError unless a TCP connection to ``--address`` (``host:port``, optionally ``ray://``)
    opens within ``timeout`` seconds; ``ray.init`` itself retries an unreachable head for minutes.
    ``None`` (start a local cluster) and ``auto`` (find a running local one) are left to Ray."""
    import socket

    if address in (None, "auto", "local"):
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise StudyError(f"--address {address!r} is not host:port (e.g. 10.0.0.1:6379), 'auto' or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise StudyError(f"cannot reach Ray cluster at --address {address!r}: {err.strerror or err}") from None


def start_ray(config: StudyConfig):
    """``ray.init`` (local, or ``--address``); prints the dashboard URL."""
    import ray

    runtime_env = None
    if config.address:  # a remote cluster: ship this project and the env var to its nodes
        runtime_env = {"working_dir": str(PROJECT_DIR), "env_vars": {"NM_DISABLE_ANALYTICS": "1"},
                       "excludes": ["runs/", ".git/", "*.onnx", "*.pt"]}
    check_address(config.address)
    try:
        context = ray.init(address=config.address, include_dashboard=config.dashboard,
                           dashboard_host="127.0.0.1", runtime_env=runtime_env)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise StudyError(f"cannot reach Ray cluster at --address {config.address!r}: "
                         f"{str(err).splitlines()[0]}") from None
    url = getattr(context, "dashboard_url", None)
    print(f"Ray dashboard: http://{url}" if url else "Ray dashboard: off (--no-dashboard)", flush=True)
    return context


def trial_resources(config: StudyConfig, role: str) -> dict:
    """Ray resources of one trial: the teacher takes the whole machine/one GPU, a student a share."""
    import ray

    total_cpus = ray.cluster_resources().get("CPU", 1.0)
    has_gpu = ray.cluster_resources().get("GPU", 0.0) > 0
    n = len(config.setups)
    if role == "teacher":
        cpus = config.cpus_per_trial * n if config.cpus_per_trial else total_cpus
        return {"cpu": cpus, "gpu": 1.0 if has_gpu else 0.0}
    cpus = config.cpus_per_trial or total_cpus / n
    gpus = config.gpus_per_trial if config.gpus_per_trial is not None else (1.0 / n if has_gpu else 0.0)
    return {"cpu": cpus, "gpu": gpus}


def trial_config(config: StudyConfig, role: str, resources: dict) -> dict:
    """The ``param_space`` handed to a trainable (plain values only)."""
    return {
        "arch": config.arch, "stem": config.stem, "num_classes": 10, "seed": config.seed,
        "batch_size": config.batch_size, "temperature": config.temperature,
        "lr": config.teacher_lr if role == "teacher" else config.lr,
        "max_epochs": config.teacher_max_epochs if role == "teacher" else config.max_epochs,
        "teacher_weights": config.teacher_weights, "threads": max(1, math.floor(resources["cpu"])),
    }


def run_tuner(config: StudyConfig, name: str, trainable, param_space: dict, resources: dict,
              max_epochs: int):
    """One Tune experiment under ``<output-dir>/<name>``; returns its ResultGrid.

    Stopping by AccuracyPlateauStopper, a checkpoint every epoch (the best two by test_acc and
    the latest are kept), failed trials retried from their last checkpoint.
    """
    from ray import tune

    from trainables.stopper import AccuracyPlateauStopper

    storage = str(Path(config.output_dir).resolve())
    path = os.path.join(storage, name)
    wrapped = tune.with_resources(trainable, resources)
    if tune.Tuner.can_restore(path):
        print(f"[{name}] restoring the experiment in {path}: finished trials are kept, "
              "unfinished ones resume from their last checkpoint", flush=True)
        tuner = tune.Tuner.restore(path, trainable=wrapped, resume_unfinished=True,
                                   restart_errored=True)
    else:
        tuner = tune.Tuner(
            wrapped,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=len(config.setups)),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                stop=AccuracyPlateauStopper(metric="test_acc", tolerance=config.tolerance,
                                            patience=config.patience, max_epochs=max_epochs),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute="test_acc",
                    checkpoint_score_order="max"),
                failure_config=tune.FailureConfig(max_failures=2),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    errors = [str(r.error).splitlines()[0] for r in grid if r.error]
    if errors:
        raise StudyError(f"{len(errors)} {name} trial(s) failed; first error: {errors[0]}")
    return grid


def stage_teacher(config: StudyConfig, data) -> Path:
    """Stage 1: fine-tune the teacher; its best-accuracy checkpoint becomes ``teacher.pt``."""
    from ray import tune

    from models import load_checkpoint
    from trainables.train import MODEL_FILE, train_teacher
    from trainables.utils import atomic_copy

    target = Path(config.output_dir) / "teacher.pt"
    if target.exists():
        try:
            load_checkpoint(target)
        except ValueError as err:
            raise StudyError(f"{err}; delete it to train the teacher again") from None
        print(f"[teacher] {target} exists: skipping the teacher stage", flush=True)
        return target
    resources = trial_resources(config, "teacher")
    grid = run_tuner(config, "teacher", tune.with_parameters(train_teacher, data=data),
                     trial_config(config, "teacher", resources), resources,
                     config.teacher_max_epochs)
    best = grid[0].get_best_checkpoint("test_acc", "max")
    with best.as_directory() as directory:
        atomic_copy(Path(directory) / MODEL_FILE, target)
    return target


def stage_students(config: StudyConfig, data, teacher_path: Path):
    """Stage 2: one Tune experiment, a grid over the setups, all trials running at once."""
    import torch
    from ray import tune

    from trainables.train import train_student

    teacher = torch.load(teacher_path, map_location="cpu")
    resources = trial_resources(config, "student")
    space = trial_config(config, "student", resources)
    space["setup"] = tune.grid_search(list(config.setups))
    trainable = tune.with_parameters(train_student, data=data, teacher=teacher)
    return run_tuner(config, "students", trainable, space, resources, config.max_epochs)


RESULT_COLUMNS = ("model", "test_acc", "best_test_acc", "epochs", "params", "seconds", "weight_sparsity",
                  "onnx_test_acc", "base", "started_at", "finished_at")


def training_rows(config: StudyConfig, teacher_dir: Path, students) -> list[dict]:
    """One results row per trained model (teacher, then the setups in ``config.setups`` order):
    test_acc at the stop and best_test_acc (0..1), epochs, params, seconds (sum of epoch times),
    started_at/finished_at (unix seconds; they show whether the student trials overlapped)."""
    from ray import tune

    from models import build_student, build_teacher, count_parameters

    def row(model, frame, params):
        return {"model": model, "test_acc": frame["test_acc"].iloc[-1],
                "best_test_acc": frame["test_acc"].max(), "epochs": int(frame["training_iteration"].iloc[-1]),
                "params": params, "seconds": float(frame["epoch_seconds"].sum()),
                "started_at": float(frame["trial_started_at"].iloc[0]),
                "finished_at": float(frame["timestamp"].iloc[-1])}

    teacher_frame = next(iter(tune.ExperimentAnalysis(str(teacher_dir)).trial_dataframes.values()))
    rows = [row("teacher", teacher_frame,
                count_parameters(build_teacher(config.arch, stem=config.stem, weights=None)))]
    student_params = count_parameters(build_student(config.arch, stem=config.stem))
    by_setup = {result.config["setup"]: result for result in students}
    rows += [row(setup, by_setup[setup].metrics_dataframe, student_params) for setup in config.setups]
    return rows


def sparsified_rows(summary: dict, rows: list[dict]) -> list[dict]:
    """Rows ``pruned`` and ``pruned_quantized`` from the sparsify summary: torch test accuracy,
    measured weight sparsity (0..1), recipe epochs, and the setup they came from (``base``)."""
    params = next(row["params"] for row in rows if row["model"] == summary["setup"])
    return [{"model": name, "test_acc": summary[f"test_acc_{name}"], "params": params,
             "weight_sparsity": summary[f"weight_sparsity_{name}"], "epochs": int(summary["recipe_epochs"])
             if float(summary["recipe_epochs"]).is_integer() else summary["recipe_epochs"],
             "base": summary["setup"]} for name in ("pruned", "pruned_quantized")]


def stage_sparsify(config: StudyConfig, data, students) -> dict:
    """Stage 3: the best student (highest test accuracy of any epoch) through the recipe, as a
    Ray task on the training device; returns ``sparsify/summary.json``'s content."""
    import ray

    from trainables.sparsify import sparsify_outputs, sparsify_student

    paths = sparsify_outputs(config.output_dir)
    if all(path.exists() for path in paths.values()):
        print(f"[sparsify] {paths['summary']} exists: skipping the sparsify stage", flush=True)
        return json.loads(paths["summary"].read_text())
    best = students.get_best_result("test_acc", "max", scope="all")
    checkpoint = best.get_best_checkpoint("test_acc", "max")
    print(f"[sparsify] best trial: {best.path.rsplit('/', 1)[-1]} (setup {best.config['setup']}, "
          f"test_acc {best.metrics_dataframe['test_acc'].max():.4f}); recipe {config.recipe}", flush=True)
    resources = trial_resources(config, "teacher")
    task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(sparsify_student)
    try:
        return ray.get(task.remote(
            checkpoint, data, recipe=config.recipe, recipe_epochs=config.recipe_epochs,
            batch_size=config.batch_size, seed=config.seed, threads=max(1, math.floor(resources["cpu"])),
            output_dir=str(Path(config.output_dir).resolve()), trial_id=best.path.rsplit("/", 1)[-1],
            setup=best.config["setup"]))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, ValueError):  # bad recipe and the like: the one line it carries
            raise StudyError(str(err.cause)) from None
        raise


def stage_bench(config: StudyConfig, data, onnx_paths: dict) -> tuple["pd.DataFrame", dict]:
    """Stage 4: a CPU-only Ray actor with a fixed core count benchmarks every exported model
    (DeepSparse; onnxruntime on the dense one) at each batch size, and measures each ONNX
    model's test accuracy in DeepSparse. Returns (benchmark table, {model: onnx_test_acc})."""
    import pandas as pd
    import ray

    from bench.benchmark import make_cpu_benchmark_actor
    from trainables.data import normalize
    from trainables.sparsify import ONNX_MODELS
    from trainables.utils import atomic_write_text

    target = Path(config.output_dir) / "benchmark.csv"
    accuracy_file = Path(config.output_dir) / "onnx_accuracy.json"
    if target.exists() and accuracy_file.exists():
        print(f"[bench] {target} exists: skipping the benchmark stage", flush=True)
        return pd.read_csv(target), json.loads(accuracy_file.read_text())
    cores = config.bench_cores or int(ray.cluster_resources().get("CPU", 1))
    actor = make_cpu_benchmark_actor(cores)
    jobs = [(name, engine, batch) for name in ONNX_MODELS
            for engine in (("deepsparse", "onnxruntime") if name == "dense" else ("deepsparse",))
            for batch in config.bench_batch_sizes]
    rows = []
    for name, engine, batch in jobs:  # one at a time: runs must not compete for the cores
        row = ray.get(actor.run.remote(str(onnx_paths[name]), batch, engine=engine,
                                       warmup_s=config.bench_warmup_seconds,
                                       duration_s=config.bench_seconds))
        rows.append({**row, "model": name})
        print(f"[bench] {name:16s} {engine:11s} batch {batch:3d}: {row['items_per_sec']:9.1f} items/s, "
              f"p50 {row['latency_p50_ms']:.2f} ms", flush=True)
    images = normalize(data.test_images).numpy()
    labels = data.test_labels.numpy()
    accuracies = {name: ray.get(actor.accuracy.remote(str(onnx_paths[name]), images, labels, 32))
                  for name in ONNX_MODELS}
    ray.kill(actor)
    columns = ["model", "engine", "batch_size", "num_cores", "items_per_sec", "latency_mean_ms",
               "latency_p50_ms", "latency_p99_ms", "isa", "vnni"]
    table = pd.DataFrame(rows)[columns]
    atomic_write_text(accuracy_file, json.dumps(accuracies, indent=2))
    atomic_write_text(target, table.to_csv(index=False))
    return table, accuracies


def fastest_model(bench: "pd.DataFrame", batch_size: int) -> str:
    """One line naming the highest-throughput (model, engine) at ``batch_size`` and its ratio to
    dense onnxruntime, the baseline a user would otherwise deploy."""
    rows = bench[bench["batch_size"] == batch_size].sort_values("items_per_sec", ascending=False)
    best = rows.iloc[0]
    base = rows[(rows["model"] == "dense") & (rows["engine"] == "onnxruntime")]["items_per_sec"]
    ratio = f", {best['items_per_sec'] / base.iloc[0]:.2f}x dense onnxruntime" if len(base) else ""
    return (f"fastest at batch {batch_size} on this CPU ({best['isa']}, vnni={best['vnni']}): "
            f"{best['model']} in {best['engine']}, {best['items_per_sec']:.1f} items/s{ratio}")


def stage_report(config: StudyConfig) -> int:
    """Stage 5: execute ``report.ipynb`` on the run and render it to HTML and PDF (``report.py``)."""
    from report import ReportError, render_report

    if not (Path(config.output_dir) / "results.csv").exists():
        raise StudyError(f"no finished run in --output-dir {config.output_dir} (results.csv missing)")
    try:
        paths = render_report(config.output_dir)
    except (ReportError, ValueError) as err:
        raise StudyError(str(err)) from None
    print("report: " + ", ".join(str(paths[k]) for k in ("notebook", "html", "pdf") if paths.get(k)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the study; returns the process exit code (0 ok, 2 bad input or machine)."""
    try:
        check_python()
        check_packages()
        config, args = config_from_args(argv)
        if args.report_only:
            return stage_report(config)
        if config.stop_after in ("sparsify", "bench"):
            check_avx2()
        return run_study(config, args)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# Fields that change where and how a run executes, not what it computes: a resumed run may differ
# in them (the data root may move; the data it holds is checked when loaded).
RUNTIME_FIELDS = ("data_root", "download", "output_dir", "dashboard", "address", "report", "stop_after",
                  "cpus_per_trial", "gpus_per_trial")
# Everything a run writes into --output-dir (removed by --overwrite before a new run starts).
RUN_OUTPUTS = ("config.json", "teacher", "teacher.pt", "students", "onnx", "sparsify", "results.csv",
               "benchmark.csv", "onnx_accuracy.json", "report.ipynb", "report.html", "report.pdf")


def check_output_dir(config: StudyConfig, overwrite: bool) -> bool:
    """Refuse an --output-dir whose ``config.json`` differs from ``config`` (outside
    RUNTIME_FIELDS) unless ``overwrite``. Returns True when an earlier run there is to be replaced
    (``remove_run_outputs``, once every other check has passed)."""
    out = Path(config.output_dir)
    saved = out / "config.json"
    if not saved.exists():
        return False
    try:
        previous = json.loads(saved.read_text())
    except (OSError, ValueError) as err:
        raise StudyError(f"{saved} is unreadable ({err}); pass --overwrite to start a new run there") from None
    current = json.loads(json.dumps(dataclasses.asdict(config)))
    changed = [k for k in current if k not in RUNTIME_FIELDS and previous.get(k) != current[k]]
    if changed and not overwrite:
        diff = "; ".join(f"{k}: {previous.get(k)!r} -> {current[k]!r}" for k in changed[:3])
        raise StudyError(f"--output-dir {out} holds a run made with a different config ({diff}); "
                         "pass --overwrite to replace it, or choose another --output-dir")
    return bool(changed)


def remove_run_outputs(out: Path) -> None:
    """Delete what an earlier run wrote into ``out`` (RUN_OUTPUTS); other files are kept."""
    import shutil

    print(f"--overwrite: removing the earlier run in {out}", flush=True)
    for name in RUN_OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def check_inputs(config: StudyConfig, teacher_stage: bool) -> None:
    """Everything that can fail after hours of training, checked before any: the recipe (when the
    sparsify stage will run) and the teacher's initial weights (when the teacher stage will run:
    'imagenet' is downloaded now, a checkpoint path must hold a teacher of this arch and stem)."""
    if config.stop_after in ("sparsify", "bench"):
        from trainables.sparsify_core import load_recipe

        try:
            load_recipe(config.recipe, num_epochs=config.recipe_epochs)
        except ValueError as err:
            raise StudyError(str(err)) from None
    if config.teacher_weights is not None and teacher_stage:
        from models import build_teacher

        try:
            build_teacher(config.arch, stem=config.stem, weights=config.teacher_weights)
        except (ValueError, RuntimeError) as err:
            raise StudyError(f"--teacher-weights {config.teacher_weights}: {err}") from None


def run_study(config: StudyConfig, args: argparse.Namespace) -> int:
    """All stages in order, skipping those whose outputs are already complete."""
    import pandas as pd

    from trainables.utils import atomic_write_text

    out = Path(config.output_dir)
    replace = check_output_dir(config, args.overwrite)
    data = load_data(config)
    check_inputs(config, teacher_stage=replace or not (out / "teacher.pt").exists())
    start_ray(config)
    if replace:
        remove_run_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(dataclasses.asdict(config), indent=2))
    print(f"data: {len(data.train_labels)} training / {len(data.test_labels)} test images; "
          f"output: {out.resolve()}", flush=True)
    teacher_path = stage_teacher(config, data)
    if config.stop_after == "teacher":
        return 0
    students = stage_students(config, data, teacher_path)
    rows = training_rows(config, out.resolve() / "teacher", students)
    bench = None
    if config.stop_after in ("sparsify", "bench"):
        summary = stage_sparsify(config, data, students)
        rows += sparsified_rows(summary, rows)
        if config.stop_after == "bench":
            bench, accuracies = stage_bench(config, data, summary["onnx"])
            for row in rows:  # the exported models' own accuracy, run in DeepSparse
                name = "dense" if row["model"] == summary["setup"] else row["model"]
                row["onnx_test_acc"] = accuracies.get(name)
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    print("\nAccuracy (test set, 0..1):\n" + table.drop(columns=["started_at", "finished_at"]).to_markdown(
        index=False, floatfmt=".4f"))
    if bench is not None:
        print("\nThroughput (items/s) and latency (ms):\n" + bench.to_markdown(index=False, floatfmt=".2f"))
        for batch in config.bench_batch_sizes:
            print(fastest_model(bench, batch))
    if config.report:
        return stage_report(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
