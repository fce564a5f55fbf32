"""The runner: start Ray, check the inputs, plan each stage (skip, run, resume or rerun:
``driver.reruns``), run the stages in order (``stages.pipeline.run_stage``) and write the result
tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from study import RunLayout, StudyConfig, StudyError, decision_rule
from study.config import PROJECT_DIR, config_json
from study.noise import VERBOSE_ENV, verbose
from study.reruns import check_output_dir
from study.requirements import NEWEST_SPARSIFY_PYTHON, PY312_SPARSEML_INSTALL
from stages.base import Context
from stages.bench import check_deepsparse_python
from stages.pipeline import BY_NAME, PIPELINE, run_stage
from stages.report import print_results, stage_report

# Ray, torch and the training code are imported inside the functions: orchestrate.py imports this
# module before it has checked the Python version and the installed packages.


def start_ray(config: StudyConfig):
    """Join the cluster at ``--address`` (shipping this project as the job's ``working_dir``) or
    start a local Ray of this run's own (``driver.cluster.connect``), print the dashboard line,
    then size every request of the run from the cluster's nodes and print that plan. Returns the
    nodes. StudyError (one line) for an unreachable cluster or a request that no node can hold."""
    import logging

    from study.resources import plan_resources
    from driver.cluster import cluster_nodes, connect
    from driver.tuning import student_trials

    runtime_env = None
    if config.address:  # an existing cluster: ship this project (and --verbose) to its nodes
        runtime_env = {"working_dir": str(PROJECT_DIR), "excludes": ["runs/", ".git/", "*.onnx", "*.pt"],
                       "env_vars": {VERBOSE_ENV: "1" if verbose() else "0"}}
    # Unless --verbose, the driver's "ray" logger shows warnings only (no "Started a local Ray").
    print(connect(config.address, config.dashboard, runtime_env,
                  logging_level=logging.INFO if verbose() else logging.WARNING), flush=True)
    nodes = cluster_nodes()
    print(plan_resources(config, nodes, student_trials(config)).describe(), flush=True)
    return nodes


def steps_per_epoch(config: StudyConfig) -> int:
    """Optimizer steps per epoch of the sparsify stage's training data: ``ceil(N / B)`` for the
    training images N (``--train-subset`` or all 50,000, less ``--val-size``) at the largest batch
    size B a trial of the run trains with (``--batch-size``, or a swept one)."""
    import math

    from study.config import CIFAR10_TRAIN_IMAGES, variants

    images = (config.train_subset or CIFAR10_TRAIN_IMAGES) - config.val_size
    batch = max(int(values.get("batch_size", config.batch_size)) for _, values in variants(config))
    return max(1, math.ceil(images / batch))


def check_inputs(config: StudyConfig, teacher_stage: bool) -> None:
    """Everything that can fail after hours of training, checked before any: the recipe (when the
    sparsify stage will run: it loads, and some optimizer step falls between the end of pruning and
    the start of QAT at ``steps_per_epoch``, ``check_pruning_window``) and the teacher's initial weights (when the teacher stage will run:
    'imagenet' is downloaded now, a checkpoint path must hold a teacher of this arch and stem)."""
    if config.stop_after in ("sparsify", "bench"):
        from trainables.compress.core import check_pruning_window, load_recipe, recipe_phases

        try:
            for sparsity in config.sparsities or (None,):  # each target's recipe; None: the recipe's own
                manager = load_recipe(config.recipe, num_epochs=config.recipe_epochs,
                                      **({} if sparsity is None else {"final_sparsity": sparsity}))
                check_pruning_window(recipe_phases(manager), steps_per_epoch(config))
        except ValueError as err:
            raise StudyError(str(err)) from None
    if config.teacher_weights is not None and teacher_stage:
        from models import WeightsUnavailableError, build_teacher

        try:
            build_teacher(config.arch, stem=config.stem, weights=config.teacher_weights)
        except WeightsUnavailableError as err:  # offline, or a broken download in the hub cache
            raise StudyError(f"--teacher-weights {config.teacher_weights}: {err.detail}; pass --teacher-weights "
                             "none (random init) or --teacher-weights PATH (a teacher.pt of this project)") from None
        except (ValueError, RuntimeError) as err:
            raise StudyError(f"--teacher-weights {config.teacher_weights}: {err}") from None


def skipped_stages_line(stop_after: str, version=sys.version_info) -> str | None:
    """The line a run that stops before the bench stage ends with: which stages it left out and how
    to run them (on Python 3.12 or 3.13 without SparseML: how to install it first; on a newer Python:
    which Pythons run them); None for a full run."""
    left = {"teacher": "students, sparsify and bench", "students": "sparsify and bench",
            "sparsify": "bench"}.get(stop_after)
    if left is None:
        return None
    if tuple(version[:2]) > NEWEST_SPARSIFY_PYTHON:  # check_python refuses those stages here
        return (f"skipped the {left} stage(s) (--stop-after {stop_after}); they run on Python 3.10 to "
                f"{NEWEST_SPARSIFY_PYTHON[0]}.{NEWEST_SPARSIFY_PYTHON[1]}")
    line = f"skipped the {left} stage(s) (--stop-after {stop_after}); run the same command with --stop-after bench"
    import importlib.util

    if tuple(version[:2]) >= (3, 12) and stop_after != "sparsify" \
            and importlib.util.find_spec("sparseml") is None:
        line += (f" after installing SparseML for Python {version[0]}.{version[1]}: "
                 + PY312_SPARSEML_INSTALL.format(project=PROJECT_DIR))
    return line


def load_data(config: StudyConfig) -> tuple:
    """``(data, digests)``: the run's tensors (``trainables.batches.study_data``) and their
    fingerprint (``trainables.digests.data_digests``); StudyError (one line) for a bad data root."""
    from trainables.batches import study_data
    from trainables.digests import data_digests

    try:
        data = study_data(config)
    except ValueError as err:  # DataRootError and subset errors: one line naming the problem
        raise StudyError(str(err)) from None
    return data, data_digests(data)


def dry_run(config: StudyConfig, overwrite: bool) -> int:
    """``--dry-run``: one line per stage, what a run would do with it and why (``driver.reruns``);
    loads the data tensors (their fingerprint), starts no Ray and loads no model. A
    ``--deepsparse-python`` is checked as a run checks it (``check_deepsparse_python``), and
    ``--mlflow`` needs MLflow installed (``check_tracking``; no store is opened)."""
    from driver.reruns import plan_run
    from driver.tracking import check_tracking

    if check_output_dir(config, overwrite, PIPELINE):
        print(f"--overwrite: would remove the earlier run in {config.output_dir} and run every stage")
        return 0
    if config.deepsparse_python and config.stop_after == "bench":
        check_deepsparse_python(config.deepsparse_python)
    if config.mlflow is not None:
        check_tracking(config, probe=False)
    _, digests = load_data(config)
    for decision in plan_run(PIPELINE, config, digests):
        print(decision.line(dry_run=True))
    return 0


def start_reruns(config: StudyConfig, decisions: list, digests: dict):
    """Print the plan (one line per stage); when a stage reruns, first keep the result tables and
    config of the run so far in ``previous/<timestamp>/``; then write this run's ``config.json``.
    Returns the ``driver.reruns.Reruns`` the runner applies to each stage."""
    from driver.reruns import Reruns, archive_previous
    from study.files import atomic_write_text

    layout = RunLayout(config.output_dir)
    for decision in decisions:
        if decision.action != "run" or layout.config.exists():
            print(decision.line(), flush=True)
    reruns = Reruns(config, decisions, digests)
    if reruns.reruns_any():
        kept = archive_previous(layout)
        if kept is not None:
            print(f"previous results kept in {kept}", flush=True)
    atomic_write_text(layout.config, config_json(config))
    return reruns


def run_study(config: StudyConfig, args: argparse.Namespace) -> int:
    """All stages in order (``prepare_run`` first), each skipped, run, resumed or rerun by
    ``stages.pipeline.run_stage``; then ``results.csv``, the printed tables and, with ``--report``,
    the report. Returns the exit code."""
    import pandas as pd

    from study.files import atomic_write_text
    from driver.results import result_columns, set_onnx_accuracy, sparsified_rows, sparsify_trial, trial_variant

    data, reruns, tracker = prepare_run(config, args.overwrite)
    ctx = Context(config, data, RunLayout(config.output_dir))
    ctx.teacher = run_stage(BY_NAME["teacher"], ctx, reruns)
    tracker.sync("teacher")  # --mlflow
    if config.stop_after == "teacher":
        print(skipped_stages_line("teacher"), flush=True)
        return tracker.finish(0)
    students = run_stage(BY_NAME["students"], ctx, reruns)
    tracker.sync("students")  # --mlflow
    rows, table_of_variants = training_tables(config, students)
    bench = None
    if config.stop_after in ("sparsify", "bench"):
        ctx.best = sparsify_trial(config, students, rows)
        values = trial_variant(config, ctx.best.config)[1]
        ctx.summary = run_stage(BY_NAME["sparsify"], ctx, reruns)
        tracker.sync("sparsify")  # --mlflow
        rows += sparsified_rows(ctx.summary, rows, seed=ctx.best.config["seed"], values=values)
        if config.stop_after == "bench":
            bench, accuracies = run_stage(BY_NAME["bench"], ctx, reruns)
            tracker.sync("bench")  # --mlflow
            set_onnx_accuracy(rows, accuracies, ctx.summary["setup"], ctx.best.config["seed"], values)
    table = pd.DataFrame(rows, columns=list(result_columns(config)))
    atomic_write_text(ctx.layout.results, table.to_csv(index=False))
    print_results(config, table, table_of_variants, bench)
    if skipped_stages_line(config.stop_after):
        print(skipped_stages_line(config.stop_after), flush=True)
    return tracker.finish(stage_report(config) if config.report else 0)  # --mlflow: tables, report.pdf


def training_tables(config: StudyConfig, students) -> tuple:
    """The rows of the teacher and every student trial (``driver.results.training_rows``) and the
    variants table, written with ``variants.csv`` and (without ``--sweep``) ``setups.csv``.
    Returns ``(rows, variants table)``."""
    from study.files import atomic_write_text
    from driver.results import setups_table, training_rows, variants_table

    layout = RunLayout(config.output_dir)
    rows = training_rows(config, layout.teacher_dir.resolve(), students)
    table_of_variants = variants_table(config, rows)
    atomic_write_text(layout.variants, table_of_variants.to_csv(index=False))
    if config.sweep:  # setups.csv is the no-sweep table; a sweep's variants are not setups
        layout.setups.unlink(missing_ok=True)
    else:
        atomic_write_text(layout.setups, setups_table(config, rows).to_csv(index=False))
    return rows, table_of_variants


def prepare_run(config: StudyConfig, overwrite: bool) -> tuple:
    """Before the first stage: open the MLflow tracker (``--mlflow``), join or start Ray, load the
    data, plan every stage (``driver.reruns.plan_run``), check the inputs, remove the earlier run
    (``--overwrite``), print the plan and write ``config.json`` (``start_reruns``), check shared
    storage on a cluster, print the data line. Returns ``(data, reruns, tracker)``."""
    from driver import tracking  # --mlflow (driver/tracking.py): checked before any training; a no-op without it
    from driver.reruns import plan_run

    out, layout = Path(config.output_dir), RunLayout(config.output_dir)
    replace = check_output_dir(config, overwrite, PIPELINE)
    tracker = tracking.open_tracker(config)
    # Joining a cluster takes a second: its requests are checked first. A local Ray takes longer
    # to start, so it starts once the data and inputs have passed their checks.
    nodes = start_ray(config) if config.address else None
    data, digests = load_data(config)
    decisions = None if replace else plan_run(PIPELINE, config, digests)
    check_inputs(config, teacher_stage=replace or decisions[0].action != "skip")
    nodes = nodes or start_ray(config)
    if replace:
        print(f"--overwrite: removing the earlier run in {out}", flush=True)
        layout.remove_outputs()
        decisions = plan_run(PIPELINE, config, digests)
    out.mkdir(parents=True, exist_ok=True)
    reruns = start_reruns(config, decisions, digests)
    if config.address:  # Tune's storage_path and every stage's output: one folder for all nodes
        from driver.cluster import check_shared_storage

        check_shared_storage(out, nodes)
    val = f" / {len(data.val_labels)} validation" if data.val_labels is not None else ""
    print(f"data: {len(data.train_labels)} training{val} / {len(data.test_labels)} test images; "
          f"{decision_rule(config)}; output: {out.resolve()}", flush=True)
    return data, reruns, tracker
