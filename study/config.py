"""The study's settings: one dataclass, its presets, and the checks on its values.

Every field is declared once, with its help text beside it (``metadata["help"]``) and the function
that parses it from the command line (``metadata["parse"]``); ``orchestrate.build_parser`` turns
each field into one option. A preset is a dict of field values; a value given on the command line
always wins over the preset's, whatever it is (``none``, ``0`` and ``false`` included).

The student setups' table lives in ``study.setups`` (``SETUP_INFO``, ``LOSS_TERMS``, ...), the sweep's
grid and labels in ``study.sweep`` (``SWEEPABLE``, ``variants``, ``variant_label``, ...), the field
declaration and its CLI parsers in ``study.options`` (``option``, ``csv_of``, ...); their names are
re-exported here, so ``from study.config import SETUPS`` keeps working.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from study.options import csv_of, option, optional_number, optional_str
from study.setups import (  # noqa: F401  (re-exported: the setup table's names, as before the split)
    FEATURE_LAYERS, LOSS_TERMS, SETUP_INFO, SETUPS, LossTerm, Setup, needs_teacher, setup_needs)
from study.sweep import (  # noqa: F401  (re-exported: the sweep's names, as before the split)
    SWEEPABLE, sweep_item, swept_fields, variant_label, variants)

PROJECT_DIR = Path(__file__).resolve().parent.parent

#: The pipeline's stages, in order (``--stop-after`` names the last one to run).
STAGES: tuple[str, ...] = ("teacher", "students", "sparsify", "bench")
#: The task's allowed batch sizes for Adam: 128..512.
TASK_BATCH_RANGE = (128, 512)
#: torchvision ResNets a teacher can be (``models.build_teacher``); the student is the same
#: network with layer3 cut to its first block.
ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
#: Training images of CIFAR-10 (``--train-subset 0`` = all of them).
CIFAR10_TRAIN_IMAGES = 50_000
#: Input stems for 32x32 images (``models.resnet`` module docstring).
STEMS: tuple[str, ...] = ("cifar", "upsample")

#: Losses the sparsify stage can fine-tune with (``--sparsify-loss``): ``setup`` = the winning
#: setup's own loss (teacher soft targets, feature MSE for kd_feat), ``ce`` = labels only.
SPARSIFY_LOSSES: tuple[str, ...] = ("setup", "ce")


class StudyError(Exception):
    """A problem with the user's input or machine, reported as one line and exit code 2."""


@dataclass
class StudyConfig:
    """Every setting of one study. Presets fill it; any field can be overridden on the CLI.

    Units: learning rates are Adam step sizes; epochs count passes over the (subset of the)
    training set; ``bench_seconds``/``bench_warmup_seconds`` are seconds; ``*_subset`` are image
    counts (0 = the whole split); ``cpus_per_trial``/``gpus_per_trial`` are Ray resource units
    (fractions allowed; ``None`` = sized from the Ray nodes, ``study.resources``).
    Architecture and presets: ``ARCHITECTURE.md``.
    """

    preset: str = option("full", "preset the other defaults come from: full, cpu or smoke", str)
    data_root: str | None = option(
        "data", "CIFAR-10 root: image folders train/<class>/, test/<class>/, or cifar-10-batches-py/ "
        "(when not given, --download is on: CIFAR-10 is fetched into data/ if it holds no copy)",
        optional_str)
    download: bool = option(False, "fetch CIFAR-10 with torchvision into --data-root when it holds no copy; "
                            "on by itself when --data-root is not given", bool)
    output_dir: str = option("runs/full", "run directory: every output of the study goes here", str)
    arch: str = option("resnet101", "torchvision ResNet of the teacher; the students are the same network "
                       "with layer3 cut to its first block (resnet18, resnet34, resnet50, resnet101, resnet152)",
                       str)
    stem: str = option("cifar", "input stem: 'cifar' (3x3 stride-1 conv1, no max-pool, 32x32 input) or "
                       "'upsample' (images resized to 224x224, ImageNet stem kept)", str)
    teacher_weights: str | None = option(
        "imagenet", "teacher's initial weights: 'imagenet' (torchvision, needs network), 'none' (random) "
        "or a teacher checkpoint path", optional_str)
    train_subset: int = option(0, "stratified subset of training images (0 = all 50,000)", int)
    test_subset: int = option(0, "stratified subset of test images (0 = all 10,000)", int)
    batch_size: int = option(256, "batch size of every training stage (the task allows 128..512)", int)
    lr: float = option(1e-3, "Adam learning rate of the students", float)
    teacher_lr: float = option(1e-4, "Adam learning rate of the teacher", float)
    temperature: float = option(4.0, "softmax temperature T of the soft targets (soft CE is scaled by T^2)",
                                float)
    tolerance: float = option(0.01, "stop rule: a trial stops once its test accuracy (0..1) has changed by "
                              "less than this from one epoch to the next, --patience times in a row", float)
    patience: int = option(2, "stop rule: how many epochs in a row the test accuracy must change by less "
                           "than --tolerance", int)
    max_epochs: int = option(50, "safety bound on student epochs", int)
    teacher_max_epochs: int = option(30, "safety bound on teacher epochs", int)
    setups: tuple[str, ...] = option(SETUPS, "comma-separated student setups", csv_of(str))
    cpus_per_trial: float | None = option(
        None, "Ray CPUs per student trial ('none': the largest share with which all student trials fit "
        "on the nodes at once, at least 0.5)", optional_number(float))
    gpus_per_trial: float | None = option(
        None, "Ray GPUs per student trial, a fraction up to 1 or a whole number ('none': when a node has "
        "a GPU, the largest fraction with which all student trials (#setups x #seeds) fit on the GPU "
        "nodes at once)", optional_number(float))
    address: str | None = option(
        None, "Ray cluster to run on: HOST:PORT or ray://HOST:PORT of a running cluster, or 'auto' (the "
        "cluster `ray start` runs on this machine, or $RAY_ADDRESS); 'none': a new local Ray for this "
        "run only, never one that is already running", optional_str)
    seed: int = option(0, "random seed of the subsets and the validation split; the weight init and "
                       "augmentation stream of the teacher and of each setup's first seed", int)
    seeds: int = option(1, "seeds per student setup: seed, seed+1, ... each (setup, seed) is one Tune trial; "
                        "setups.csv gives mean, std and a 95-percent Student-t interval over them", int)
    val_size: int = option(
        0, "training images held out (stratified) as a validation split; 0: the stop rule and every 'best' "
        "choice read test_acc (the task's rule); > 0: they read val_acc, test_acc is only reported", int)
    compile: bool | None = option(
        None, "torch.compile the teacher and the students; when neither flag is given: on a GPU, "
        "not on a CPU", bool)
    dashboard: bool = option(True, "start the Ray dashboard of a local run (with --address: the cluster's "
                             "own, if it runs one)", bool)
    recipe: str = option(str(PROJECT_DIR / "recipes" / "prune_quantize.yaml"),
                         "SparseML recipe YAML of the sparsify stage (pruning, fine-tuning and QAT schedule)", str)
    recipe_epochs: float = option(55.0, "num_epochs of the recipe (its phases scale with it)", float)
    sparsify_loss: str = option(
        "setup", "loss of the recipe's fine-tuning and QAT: 'setup' (the winning setup's own loss: the "
        "frozen teacher's soft targets, for kd_feat also the feature MSE) or 'ce' (cross-entropy to the "
        "labels only)", str)
    sparsities: tuple[float, ...] = option(
        (), "comma-separated sparsity targets (fractions in (0, 1) of the prunable weights), e.g. 0.5,0.8,0.9: "
        "each is its own sparsify Ray task from the winning checkpoint, with the recipe's final_sparsity set to "
        "it; its outputs carry it (pruned_s50.onnx) unless it is the recipe's own; not given: the "
        "recipe's final_sparsity alone (0.8 in recipes/prune_quantize.yaml)", csv_of(float))
    channel_ratios: tuple[float, ...] = option(
        (), "comma-separated structured-pruning targets (fractions in (0, 1) of each layer's channels to remove), "
        "e.g. 0.3,0.5: each is its own sparsify Ray task that thins the winning checkpoint (Torch-Pruning), "
        "fine-tunes it with the setup's loss for --recipe-epochs and quantizes it (NNCF PTQ); outputs "
        "structured_c50.onnx and structured_c50_int8.onnx; not given: none", csv_of(float))
    ptq_calibration_images: int = option(
        300, "training images that calibrate the dense INT8 post-training-quantized peer (dense_int8, NNCF)", int)
    bench_cores: int | None = option(
        None, "cores of the CPU-only benchmark actor, on one node ('none': the physical cores of the node "
        "with the most CPUs, at most its Ray CPUs)", optional_number(int))
    bench_batch_sizes: tuple[int, ...] = option((1, 32), "comma-separated batch sizes to benchmark", csv_of(int))
    bench_warmup_seconds: float = option(2.0, "seconds of untimed warm-up per benchmark", float)
    bench_seconds: float = option(10.0, "seconds each benchmark is timed", float)
    deepsparse_python: str | None = option(
        None, "a Python 3.10/3.11 with deepsparse 1.7 installed (e.g. another venv's bin/python): the bench "
        "stage runs DeepSparse through the deepsparse.benchmark command beside it; for the Python 3.12 "
        "profile, which has no DeepSparse ('none': DeepSparse in this Python, or left out where absent)",
        optional_str)
    bench_rounds: int = option(3, "interleaved rounds of the whole benchmark matrix; each row holds the median "
                               "of its rounds and the rounds themselves", int)
    stop_after: str = option("bench", f"last stage to run: {', '.join(STAGES)}", str)
    report: bool = option(False, "execute report.ipynb and render it to HTML/PDF at the end", bool)
    mlflow: str | None = option(
        None, "track the study in MLflow (driver/tracking.py; needs the '.[tracking]' extra): 'local' (also the "
        "flag alone) = a file store in <output-dir>/mlruns (offline, no server), or a tracking URI "
        "(http://HOST:PORT, file:///PATH, sqlite:///PATH, databricks); 'none': off, MLflow is not imported",
        optional_str, const="local")
    sweep: tuple = option(
        (), "FIELD=V1,V2,...: train every student setup with each of these values of FIELD (repeatable: the grid "
        "is setups x every swept field x seeds, one Tune trial each; variants.csv compares the variants); "
        f"sweepable: {', '.join(SWEEPABLE)}", sweep_item, append=True)
    verbose: bool = option(False, "print everything the libraries print (Tune's status tables, export "
                           "warnings, SparseML and DeepSparse logs), not just one line per epoch and the "
                           "tables", bool)


PRESETS: dict[str, dict] = {
    # The assignment as written: ResNet-101 on all of CIFAR-10, ImageNet init, 55 recipe epochs. GPU.
    "full": {},
    # Same pipeline on 2 CPU cores in well under an hour: resnet18-based models, a few thousand images.
    "cpu": dict(output_dir="runs/cpu", arch="resnet18", teacher_weights=None,
                train_subset=2000, test_subset=1000, batch_size=128, teacher_lr=1e-3,
                max_epochs=6, teacher_max_epochs=6, recipe_epochs=4.0, bench_seconds=5.0),
    # The same code path on a few hundred images; what the end-to-end test runs. Its student bound
    # (4) lies above the earliest epoch the stop rule can fire at (patience + 1 = 3), so a trial
    # stopped by the rule and one stopped by the bound end differently.
    "smoke": dict(output_dir="runs/smoke", arch="resnet18", teacher_weights=None,
                  train_subset=300, test_subset=200, batch_size=128, teacher_lr=1e-3,
                  max_epochs=4, teacher_max_epochs=2, recipe_epochs=2.0,
                  ptq_calibration_images=128, bench_warmup_seconds=0.2, bench_seconds=0.5, bench_rounds=2),
}

#: The largest ``--channel-ratios`` value: every arch's narrowest layers have 64 channels, and the
#: thinning keeps counts rounded down to multiples of 8 (``trainables.compress.structured.ROUND_TO``),
#: leaving whole a layer that would keep fewer: 64 * (1 - r) >= 8 needs r <= 0.875.
MAX_CHANNEL_RATIO = 0.85

#: Fields that change where and how a run executes, not what it computes: a resumed run may
#: differ in them (the data root may move; the data it holds is checked when loaded).
RUNTIME_FIELDS = ("data_root", "download", "output_dir", "dashboard", "address", "report", "stop_after",
                  "cpus_per_trial", "gpus_per_trial", "verbose", "mlflow", "deepsparse_python")


def selection_metric(config) -> str:
    """The metric the stop rule and every "best" choice (best epoch, best trial, winning setup) read:
    ``"val_acc"`` when the run holds out a validation split (``val_size`` > 0), else ``"test_acc"``
    (the task's rule, the default). ``config``: a StudyConfig or its ``config.json`` dict (an empty
    dict, a run directory without ``config.json``: ``"test_acc"``)."""
    val_size = config.get("val_size", 0) if isinstance(config, dict) else config.val_size
    return "val_acc" if val_size else "test_acc"


def decision_rule(config, capital: bool = False) -> str:
    """One sentence naming the decision rule of a run (``selection_metric``), for the printed table,
    the report and ``config.json`` readers; ``capital``: "Decision rule: ..." to start a sentence.
    ``config``: a StudyConfig or its ``config.json`` dict."""
    val_size = config.get("val_size", 0) if isinstance(config, dict) else config.val_size
    head = "Decision rule" if capital else "decision rule"
    if val_size:
        return (f"{head}: val_acc on {val_size:,} training images held out of training (stratified); "
                "the stop rule, best epoch, best trial and winning setup read val_acc, test_acc is only reported")
    return (f"{head}: test_acc (the task's rule); the stop rule, best epoch, best trial and winning "
            "setup read test accuracy, so the reported test accuracy is also the selection quantity")


def make_config(preset: str, **overrides) -> StudyConfig:
    """The preset's config with ``overrides`` (field name -> value) applied, every one of them:
    an explicit ``None``, ``0`` or ``False`` wins over the preset's value.

    Raises StudyError for an unknown preset, an unknown field, or a value outside what the
    study allows (see ``validate``).
    """
    if preset not in PRESETS:
        raise StudyError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise StudyError(f"unknown config field(s) {unknown}; allowed: {sorted(names)}")
    config = StudyConfig(**{**PRESETS[preset], **overrides, "preset": preset})
    validate(config)
    config = normalize_sweep(config)
    validate(config)
    return config


def normalize_sweep(config: StudyConfig) -> StudyConfig:
    """``config`` with its ``sweep`` parsed and checked: a tuple of ``(field, values)``, each value
    parsed by the field's own CLI parser (when given as text) and checked as the scalar flag is
    (``validate`` on a config holding that value); ``setups=...`` becomes the config's ``setups``
    (the grid's setup axis) and leaves the sweep. StudyError (one line) for a field that is not
    sweepable (naming the sweepable ones), a field given twice, no values, a value given twice, or
    a value the scalar flag refuses (naming it and the allowed range)."""
    parsers = {f.name: f.metadata["parse"] for f in dataclasses.fields(StudyConfig)}
    sweep, setups, seen = [], config.setups, set()
    for item in config.sweep or ():
        try:
            name, values = item
        except (TypeError, ValueError):
            raise StudyError(f"--sweep {item!r}: give FIELD=V1,V2,... (sweepable: {', '.join(SWEEPABLE)})") from None
        shown = f"--sweep {name}={','.join(map(str, values))}"
        if name not in SWEEPABLE:
            raise StudyError(f"{shown}: {name!r} cannot be swept; sweepable: {', '.join(SWEEPABLE)}")
        if name in seen:
            raise StudyError(f"{shown}: {name} is swept twice; give all its values in one --sweep")
        seen.add(name)
        if name == "setups":
            parsed = tuple(v for part in values for v in (parsers["setups"](part) if isinstance(part, str)
                                                          else (part,)))
        else:
            try:
                parsed = tuple(parsers[name](v) if isinstance(v, str) else v for v in values)
            except ValueError as err:
                raise StudyError(f"{shown}: {err}") from None
        if not parsed:
            raise StudyError(f"{shown}: no values; give FIELD=V1,V2,...")
        if len(set(parsed)) != len(parsed):
            raise StudyError(f"{shown}: a value is given twice")
        for value in parsed:
            try:
                validate(dataclasses.replace(config, sweep=(), **{name: parsed if name == "setups" else value}))
            except StudyError as err:
                raise StudyError(f"{shown}: {err}") from None
        if name == "setups":
            setups = parsed
        else:
            sweep.append((name, parsed))
    return dataclasses.replace(config, sweep=tuple(sweep), setups=tuple(setups))



def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(config: StudyConfig) -> None:
    """Check every value that can be checked before any long work starts; StudyError if not (the
    first problem found, in the order of the checks below)."""
    _check_training(config)
    _check_choices(config)
    _check_run(config)
    _check_outputs(config)


def _check_training(config: StudyConfig) -> None:
    """The numbers of the training stages: batch size, rates, epochs, subsets, seeds, val split."""
    low, high = TASK_BATCH_RANGE
    if not low <= config.batch_size <= high:
        raise StudyError(f"--batch-size {config.batch_size} is outside the allowed range {low}..{high}")
    for name in ("lr", "teacher_lr", "temperature", "tolerance", "bench_seconds", "bench_warmup_seconds"):
        if not getattr(config, name) > 0:
            raise StudyError(f"{_flag(name)} {getattr(config, name)} must be > 0")
    for name in ("max_epochs", "teacher_max_epochs", "patience"):
        if getattr(config, name) < 1:
            raise StudyError(f"{_flag(name)} {getattr(config, name)} must be >= 1")
    if config.recipe_epochs <= 0:
        raise StudyError(f"--recipe-epochs {config.recipe_epochs} must be > 0")
    for name in ("train_subset", "test_subset"):
        if getattr(config, name) < 0:
            raise StudyError(f"{_flag(name)} {getattr(config, name)} must be >= 0 (0 = all)")
    if config.seeds < 1:
        raise StudyError(f"--seeds {config.seeds} must be >= 1")
    train_images = config.train_subset or CIFAR10_TRAIN_IMAGES
    if config.val_size and not 10 <= config.val_size < train_images:
        raise StudyError(f"--val-size {config.val_size} must be 0 (no validation split) or between 10 "
                         f"(one image per class) and {train_images - 1} (the training images minus one)")


def _check_choices(config: StudyConfig) -> None:
    """The fields that name one of a fixed set: setups, arch, stem, sparsify loss, last stage."""
    bad = [s for s in config.setups if s not in SETUPS]
    if bad or not config.setups:
        raise StudyError(f"unknown setup(s) {bad or list(config.setups)}; allowed: {', '.join(SETUPS)}")
    if config.arch not in ARCHS:
        raise StudyError(f"--arch {config.arch!r} unknown; allowed: {', '.join(ARCHS)}")
    if config.stem not in STEMS:
        raise StudyError(f"--stem {config.stem!r} unknown; allowed: {', '.join(STEMS)}")
    if config.sparsify_loss not in SPARSIFY_LOSSES:
        raise StudyError(f"--sparsify-loss {config.sparsify_loss!r} unknown; allowed: "
                         f"{', '.join(SPARSIFY_LOSSES)}")
    if config.stop_after not in STAGES:
        raise StudyError(f"--stop-after {config.stop_after!r} unknown; allowed: {', '.join(STAGES)}")


def _check_run(config: StudyConfig) -> None:
    """Where and how the run executes: output dir, Ray resources, MLflow, the DeepSparse Python."""
    if "://" in config.output_dir:
        raise StudyError(f"--output-dir {config.output_dir}: URIs are not supported (the sparsify and bench "
                         "stages write plain files); use a folder on a filesystem every node mounts")
    if config.cpus_per_trial is not None and not config.cpus_per_trial > 0:
        raise StudyError(f"--cpus-per-trial {config.cpus_per_trial} must be > 0 (or 'none')")
    gpus = config.gpus_per_trial
    if gpus is not None and (gpus < 0 or (gpus > 1 and not float(gpus).is_integer())):
        raise StudyError(f"--gpus-per-trial {gpus} must be a fraction 0..1 or a whole number (Ray's rule)")
    if config.bench_cores is not None and config.bench_cores < 1:
        raise StudyError(f"--bench-cores {config.bench_cores} must be >= 1 (or 'none')")
    if config.mlflow is not None and config.mlflow != "local" and "://" not in config.mlflow \
            and config.mlflow != "databricks":
        raise StudyError(f"--mlflow {config.mlflow!r}: give 'local' (<output-dir>/mlruns), a tracking URI "
                         "(http://HOST:PORT, file:///PATH, sqlite:///PATH, databricks) or 'none'")
    if config.deepsparse_python is not None:
        python = Path(config.deepsparse_python)
        if not (python.is_file() and os.access(python, os.X_OK)):
            raise StudyError(f"--deepsparse-python {config.deepsparse_python}: not an executable file; give the "
                             "bin/python of a Python 3.10/3.11 environment with deepsparse 1.7 installed")
        if not (python.parent / "deepsparse.benchmark").is_file():
            raise StudyError(f"--deepsparse-python {config.deepsparse_python}: no deepsparse.benchmark command "
                             f"beside it in {python.parent}; install deepsparse==1.7.0 into that environment")


def _check_outputs(config: StudyConfig) -> None:
    """What the run makes and measures: the sweep's shape, sparsity and channel targets, PTQ
    calibration, benchmark rounds and batch sizes."""
    if config.sweep and not isinstance(config.sweep, (tuple, list)):
        raise StudyError(f"--sweep {config.sweep!r}: give FIELD=V1,V2,...")
    from study.layout import percent_tag

    targets = config.sparsities or ()
    if len({percent_tag("", t) for t in targets}) != len(targets) or not all(0 < t < 1 for t in targets):
        raise StudyError(f"--sparsities {','.join(map(str, targets)) or '(none)'}: give distinct fractions "
                         "between 0 and 1 (exclusive), e.g. 0.5,0.8,0.9, that differ in percent to 4 decimals")
    ratios = config.channel_ratios or ()
    if len({percent_tag("", r) for r in ratios}) != len(ratios) or not all(0 < r <= MAX_CHANNEL_RATIO for r in ratios):
        raise StudyError(f"--channel-ratios {','.join(map(str, ratios)) or '(none)'}: give distinct fractions "
                         f"above 0 and at most {MAX_CHANNEL_RATIO}, e.g. 0.3,0.5, that differ in percent to 4 decimals "
                         "(above it the 64-channel layers would keep fewer than 8 channels)")
    if config.ptq_calibration_images < 1:
        raise StudyError(f"--ptq-calibration-images {config.ptq_calibration_images} must be >= 1")
    if config.bench_rounds < 1:
        raise StudyError(f"--bench-rounds {config.bench_rounds} must be >= 1")
    if any(b < 1 for b in config.bench_batch_sizes):
        raise StudyError(f"--bench-batch-sizes {config.bench_batch_sizes} must all be >= 1")


def config_json(config: StudyConfig) -> str:
    """``config`` as the text of a run's ``config.json`` (JSON object, one key per field; tuples
    become lists, None null), plus the two derived keys ``selection_metric`` and ``decision_rule``
    that say which rule the run's choices used."""
    return json.dumps({**dataclasses.asdict(config), "selection_metric": selection_metric(config),
                       "decision_rule": decision_rule(config)}, indent=2)
