#!/usr/bin/env python
"""Distill, sparsify, benchmark: the whole model-compression study, orchestrated by Ray.

Stages (each one hop away from here; ``ARCHITECTURE.md`` draws the whole picture):
  1. teacher   ``trainables.train.train_teacher``  - fine-tune a ResNet teacher (one Tune trial)
  2. students  ``trainables.student.train_student`` - three setups (ce, kd, kd_feat) at once under Tune
  3. sparsify  ``trainables.compress.sparsify``             - best student -> SparseML recipe -> ONNX
  4. bench     ``bench.benchmark``                 - DeepSparse / onnxruntime on a CPU-only actor
  5. report    ``report``                          - executed report.ipynb -> HTML/PDF (``--report``)

This file holds only the command line, the start-up checks and the glue between the stages;
the settings live in ``study.config``, the run directory's layout in ``study.layout``.

Usage: ``python orchestrate.py --preset smoke --data-root DIR`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
from pathlib import Path

from study import PRESETS, RunLayout, StudyConfig, StudyError, decision_rule, make_config, selection_metric
from study.config import PROJECT_DIR, config_json
from study.noise import VERBOSE_ENV, set_verbose, verbose
from study.reruns import check_output_dir
from study.requirements import (NEWEST_SPARSIFY_PYTHON, PY312_SPARSEML_INSTALL, check_packages, check_python,
                                required_packages, runs_deepsparse, sparsify_stages, torch_note)


# ---------------------------------------------------------------------------------------------
# Command line


def _shown(value) -> str:
    """A default as the user would type it: ``ce,kd`` for a tuple, ``none`` for None."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    """argparse parser: one option per StudyConfig field, declared by the field itself (its help
    text and parser in ``metadata``); the help shows each preset's default. Options the user does
    not give are absent from the parsed namespace (``argparse.SUPPRESS``), so the preset fills them
    and everything given, ``none``/``0``/``false`` included, wins."""
    presets = "\n".join(textwrap.fill(
        f"{name}: {', '.join(f'{k}={_shown(v)}' for k, v in values.items()) or 'the defaults above'}",
        width=100, initial_indent="  ", subsequent_indent="    ") for name, values in PRESETS.items())
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets (each sets these fields; every other field keeps the default above):\n" + presets,
        argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(StudyConfig):
        defaults = {p: _shown(PRESETS[p].get(f.name, f.default)) for p in PRESETS}
        shown = _shown(f.default) if len(set(defaults.values())) == 1 else \
            ", ".join(f"{p}: {v}" for p, v in defaults.items())
        text = f"{f.metadata['help']} (default: {shown})"
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["parse"] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif f.metadata.get("append"):
            parser.add_argument(flag, type=f.metadata["parse"], action="append", help=text)
        elif f.metadata.get("const") is not None:
            parser.add_argument(flag, type=f.metadata["parse"], nargs="?", const=f.metadata["const"], help=text)
        else:
            parser.add_argument(flag, type=f.metadata["parse"], help=text)
    parser.add_argument("--overwrite", action="store_true", default=False,
                        help="start from nothing: remove the earlier run in --output-dir (default: keep it; "
                             "rerun only the stages whose inputs changed, and those after them)")
    parser.add_argument("--dry-run", action="store_true", default=False,
                        help="print for every stage whether it would be skipped, run or rerun, and why; "
                             "then exit without starting Ray")
    parser.add_argument("--report-only", action="store_true", default=False,
                        help="only (re)build the report of the run in --output-dir")
    return parser


def config_from_args(argv: list[str] | None = None) -> tuple[StudyConfig, argparse.Namespace]:
    """Parse ``argv`` into a validated StudyConfig (StudyError on bad values): the preset's
    values, then every option given on the command line. Without ``--data-root`` the data root is
    ``data`` and ``--download`` is on (unless ``--no-download``): the bare ``python orchestrate.py``
    fetches CIFAR-10 there when it holds no copy; a given ``--data-root`` is only read."""
    args = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(StudyConfig)} - {"preset"}
    overrides = {name: tuple(value) if isinstance(value, list) else value
                 for name, value in vars(args).items() if name in fields}
    if "data_root" not in overrides:
        overrides.setdefault("download", True)
    return make_config(getattr(args, "preset", "full"), **overrides), args


# ---------------------------------------------------------------------------------------------
# Start-up checks (Python and packages per stage: ``study.requirements``)


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


def stage_teacher(config: StudyConfig, data, reruns) -> Path:
    """Stage 1: fine-tune the teacher; its best checkpoint (by ``study.selection_metric``) becomes
    ``teacher.pt``. ``reruns``: ``driver.reruns.Reruns``, what the run does with each stage."""
    from ray import tune

    from models import load_checkpoint
    from study.files import atomic_copy
    from driver.results import best_checkpoint
    from trainables.train import MODEL_FILE, train_teacher
    from driver.tuning import run_tuner, trial_config, trial_resources

    target = RunLayout(config.output_dir).teacher
    if reruns.action("teacher") == "skip":
        try:
            load_checkpoint(target)
        except ValueError as err:
            raise StudyError(f"{err}; delete it to train the teacher again") from None
        reruns.begin("teacher")
        reruns.done("teacher")
        print(f"[teacher] {target} exists: skipping the teacher stage", flush=True)
        return target
    out = reruns.begin("teacher")
    resources = trial_resources(config, "teacher")
    grid = run_tuner(config, "teacher", tune.with_parameters(train_teacher, data=data),
                     trial_config(config, "teacher", resources), resources,
                     config.teacher_max_epochs, storage=str(out.root))
    best, _ = best_checkpoint(grid[0], selection_metric(config))
    with best.as_directory() as directory:
        atomic_copy(Path(directory) / MODEL_FILE, out.teacher)
    reruns.done("teacher")
    return target


def stage_students(config: StudyConfig, data, teacher_path: Path, reruns):
    """Stage 2: one Tune experiment, a grid over setup x seed, all trials running at once (a
    rerun: a fresh one in ``rerun/students``, moved over the old one once finished)."""
    import torch
    from ray import tune

    from trainables.student import train_student
    from driver.tuning import run_tuner, student_space, trial_resources

    from ray.tune.result_grid import ResultGrid

    out = reruns.begin("students")  # may turn a skip into a rerun (what it reads now differs)
    if reruns.action("students") == "skip":  # finished with these inputs: read, not restored
        print(f"[students] {RunLayout(config.output_dir).students_dir} is finished with these inputs: "
              "skipping the students stage", flush=True)
        return ResultGrid(tune.ExperimentAnalysis(str(RunLayout(config.output_dir).students_dir.resolve())))
    teacher = torch.load(teacher_path, map_location="cpu")
    resources = trial_resources(config, "student")
    space = student_space(config, resources)
    trainable = tune.with_parameters(train_student, data=data, teacher=teacher)
    grid = run_tuner(config, "students", trainable, space, resources, config.max_epochs, storage=str(out.root))
    staged = reruns.staged("students")
    reruns.done("students")
    if staged:  # the experiment has moved: read it back from its place in the run directory
        grid = ResultGrid(tune.ExperimentAnalysis(str(RunLayout(config.output_dir).students_dir.resolve())))
    return grid


def stage_sparsify(config: StudyConfig, data, best, teacher_path: Path, reruns) -> dict:
    """Stage 3: the trial ``best`` (``driver.results.sparsify_trial``: the winning setup's
    best seed), from its best checkpoint, through the recipe, once per sparsity target
    (``--sparsities``, ``study.layout.sparsity_targets``): each target its own Ray task on the
    training device, all submitted at once (each asks for what the sparsify task always asked for:
    Ray runs as many at once as the nodes hold; on a GPU node a fraction each), trained with that
    setup's loss and the frozen teacher (``--sparsify-loss setup``) or cross-entropy (``ce``). One
    task (``dense_owner``) also exports ``dense`` and its INT8 PTQ peer ``dense_int8``. A target
    whose outputs are complete is not run again when it was made with these inputs (a resumed
    stage, or one whose recorded inputs differ from today's in ``--sparsities`` alone): kept in
    place, or, by a rerun, copied into ``rerun/`` with the new targets. Returns ``RunLayout.read_sparsify``'s summary."""
    import ray

    from driver.results import best_checkpoint
    from study.layout import dense_owner, model_names, sparsity_targets
    from trainables.compress.sparsify import sparsify_student
    from trainables.compress.structured import thin_student
    from driver.tuning import trial_resources

    layout = RunLayout(config.output_dir)
    targets = sparsity_targets(config.sparsities, config.recipe, config.channel_ratios)
    setup = best.config["setup"]
    loss = setup if config.sparsify_loss == "setup" else "ce"
    metric = selection_metric(config)
    checkpoint, metrics = best_checkpoint(best, metric)
    kept = reruns.action("sparsify") == "skip"
    if kept:
        try:
            summary = layout.read_sparsify(targets)
            layout.check_onnx(summary, model_names(targets))  # the exported models are still the files it recorded
        except (OSError, ValueError) as err:
            raise StudyError(str(err)) from None
    # finished targets are kept only when nothing but the target list changed since they were made
    only_targets = (reruns.changed("sparsify", checkpoint=str(Path(checkpoint.path) / "model.pt")) or set()) \
        <= {"sparsities", "channel_ratios"}
    out = reruns.begin("sparsify", checkpoint=str(Path(checkpoint.path) / "model.pt"))  # may turn into a rerun
    if kept and reruns.action("sparsify") == "skip":
        reruns.done("sparsify")
        print(f"[sparsify] {layout.sparsify_summary.parent} is complete: skipping the sparsify stage", flush=True)
        return summary
    from driver.results import trial_variant
    from study.config import variant_label

    print(f"[sparsify] best trial: {best.path.rsplit('/', 1)[-1]} (variant "
          f"{variant_label(*trial_variant(config, best.config))}, seed "
          f"{best.config['seed']}, {metric} {metrics[metric]:.4f} at epoch {metrics['training_iteration']}); "
          f"recipe {config.recipe}, loss {loss}", flush=True)
    owner = dense_owner(targets)
    action = reruns.action("sparsify")
    todo = []
    for target in targets:
        wanted = [*target.models, *(("dense", "dense_int8") if target == owner else ())]
        if (action == "resume" or only_targets) and target_complete(out.root, target, wanted, config.recipe):
            print(f"[sparsify] target {_target_text(target)}: made with these inputs, kept", flush=True)
        elif action == "rerun" and only_targets and target_complete(layout.root, target, wanted, config.recipe):
            keep_target(layout.root, out.root, target, wanted)  # into rerun/, moved back with the new ones
            print(f"[sparsify] target {_target_text(target)}: made with these inputs, kept", flush=True)
        else:
            todo.append(target)
    resources = trial_resources(config, "teacher")  # this cluster's, also on a resumed run
    cpu, gpu = resources["cpu"], resources["gpu"]
    if gpu and len(todo) > 1:  # on a GPU: a fraction of it (and of its node's CPUs) each, all at once
        cpu, gpu = (math.floor(value / len(todo) * 1e4) / 1e4 for value in (cpu, gpu))
    tasks = {False: ray.remote(num_cpus=cpu, num_gpus=gpu)(sparsify_student),
             True: ray.remote(num_cpus=cpu, num_gpus=gpu)(thin_student)}
    refs = []
    for target in todo:
        settings, teacher = sparsify_settings(dataclasses.replace(config, output_dir=str(out.root)), best,
                                              teacher_path, threads=max(1, math.floor(cpu)), target=target,
                                              export_dense=target == owner)
        print(f"[sparsify] target {_target_text(target)}: {'thinning' if target.structured else 'recipe'} task "
              "submitted", flush=True)
        refs.append(tasks[target.structured].remote(checkpoint, data, settings, teacher=teacher))  # writes its summary into out
    try:
        ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, ValueError):  # bad recipe and the like: the one line it carries
            raise StudyError(str(err.cause)) from None
        raise
    reruns.done("sparsify")
    return layout.read_sparsify(targets)


def _target_text(target) -> str:
    if target.structured:
        return f"channel ratio {target.ratio:g}"
    return "(the recipe's own)" if target.sparsity is None else f"{target.sparsity:g}"


def target_complete(root: Path, target, models, recipe: str) -> bool:
    """Whether the run directory ``root`` holds ``target``'s finished outputs: its summary, made
    for this sparsity (the recipe's own when ``target.sparsity`` is None), recording ``models``
    whose files still have the recorded sha256."""
    from study.layout import recipe_sparsity

    path = RunLayout(root).target(target).sparsify_summary
    try:
        summary = json.loads(path.read_text())
        RunLayout(root).check_onnx(summary, models)
    except (OSError, ValueError):
        return False
    if target.structured:
        return summary.get("channel_ratio") == target.ratio
    want = target.sparsity if target.sparsity is not None else recipe_sparsity(recipe)
    return summary.get("sparsity") == want


def keep_target(source: Path, dest: Path, target, models) -> None:
    """Copy ``target``'s finished outputs (its ONNX ``models`` and sparsify records) from the run
    directory ``source`` into ``dest`` (the rerun's staging folder)."""
    import shutil

    old, new = RunLayout(source).target(target), RunLayout(dest).target(target)
    for name in models:
        new.onnx(name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(old.onnx(name), new.onnx(name))
    new.sparsify_dir.mkdir(parents=True, exist_ok=True)
    for a, b in ((old.sparsify_history, new.sparsify_history), (old.layer_sparsity, new.layer_sparsity),
                 (old.sparsify_summary, new.sparsify_summary)):  # the summary last: it marks the target done
        shutil.copy2(a, b)


def sparsify_settings(config: StudyConfig, best, teacher_path: Path, threads: int, target=None,
                      export_dense: bool = True) -> tuple:
    """``(SparsifySettings, teacher payload or None)`` with which the sparsify stage runs the
    recipe on the trial ``best`` (a ``ray.tune.Result``) with ``threads`` torch threads: the
    trial's seed, setup, temperature and batch size (its own config: a ``--sweep`` varies them,
    so the scalar flags are not read), its swept values (``variant``, recorded in the summary and
    the ONNX metadata), the loss ``--sparsify-loss`` names (the setup's own, or ``ce``, which
    needs no teacher) and this run's recipe settings; ``target``: the sparsity target
    (``study.layout.Target``; default the recipe's own) and whether this task exports ``dense`` and
    ``dense_int8`` (``export_dense``)."""
    import torch

    from study import needs_teacher
    from study.layout import Target
    from trainables.compress.sparsify import SparsifySettings

    from driver.results import trial_variant

    setup = best.config["setup"]
    loss = setup if config.sparsify_loss == "setup" else "ce"
    # the trial as it was trained: its own temperature and batch size (a --sweep varies them), not the scalars
    settings = SparsifySettings(
        recipe=config.recipe, recipe_epochs=config.recipe_epochs,
        batch_size=int(best.config.get("batch_size", config.batch_size)),
        seed=int(best.config["seed"]), threads=threads, output_dir=str(Path(config.output_dir).resolve()),
        trial_id=best.path.rsplit("/", 1)[-1], setup=setup, loss=loss,
        temperature=float(best.config.get("temperature", config.temperature)),
        variant=trial_variant(config, best.config)[1], target=target or Target(None, ""),
        export_dense=export_dense, ptq_images=config.ptq_calibration_images)
    return settings, torch.load(teacher_path, map_location="cpu") if needs_teacher(loss) else None


def stage_bench(config: StudyConfig, data, summary: dict, reruns) -> tuple:
    """Stage 4: ``bench.benchmark.run_benchmarks`` on every exported model, unless
    ``benchmark.csv`` and ``onnx_accuracy.json`` exist; the models' sha256 (``summary``, the
    sparsify stage's) are checked before and after. It runs on one node
    (``study.resources.bench_node``) with ``--bench-cores`` or that node's physical cores.
    Returns (benchmark table,
    {model: onnx_test_acc})."""
    import pandas as pd

    from bench.benchmark import cpu_isa, run_benchmarks
    from study.files import atomic_write_text
    from study.resources import bench_cores, bench_node
    from trainables.batches import normalize
    from driver.cluster import cluster_nodes, on_node, run_on_node

    from study.layout import model_names, sparsity_targets

    layout = RunLayout(config.output_dir)
    models = model_names(sparsity_targets(config.sparsities, config.recipe, config.channel_ratios))
    reruns.begin("bench")  # may turn a skip into a rerun
    if reruns.action("bench") == "skip":
        reruns.done("bench")
        print(f"[bench] {layout.benchmark} exists: skipping the benchmark stage", flush=True)
        return pd.read_csv(layout.benchmark), json.loads(layout.onnx_accuracy.read_text())
    node = bench_node(cluster_nodes(), config.bench_cores)
    cores = config.bench_cores or bench_cores(node, run_on_node(node, cpu_isa)["num_cores"])
    print(f"[bench] {cores} cores on node {node.name}", flush=True)
    try:
        layout.check_onnx(summary, models)
        table, accuracies = run_benchmarks(
            {name: layout.onnx(name) for name in models}, normalize(data.test_images).numpy(),
            data.test_labels.numpy(), num_cores=cores, batch_sizes=config.bench_batch_sizes,
            warmup_s=config.bench_warmup_seconds, duration_s=config.bench_seconds, rounds=config.bench_rounds,
            deepsparse_python=config.deepsparse_python, scheduling_strategy=on_node(node))
        layout.check_onnx(summary, models)  # measuring changed nothing
    except ValueError as err:
        raise StudyError(str(err)) from None
    atomic_write_text(layout.onnx_accuracy, json.dumps(accuracies, indent=2))
    atomic_write_text(layout.benchmark, table.to_csv(index=False))
    reruns.done("bench")
    return table, accuracies


def stage_report(config: StudyConfig) -> int:
    """Stage 5: execute ``report.ipynb`` on the run and render it to HTML and PDF (``report``)."""
    from report import ReportError, render_report

    if not RunLayout(config.output_dir).results.exists():
        raise StudyError(f"no finished run in --output-dir {config.output_dir} (results.csv missing)")
    try:
        paths = render_report(config.output_dir)
    except (ReportError, ValueError) as err:
        raise StudyError(str(err)) from None
    print("report: " + ", ".join(str(paths[k]) for k in ("notebook", "html", "pdf") if paths.get(k)))
    return 0


def check_inputs(config: StudyConfig, teacher_stage: bool) -> None:
    """Everything that can fail after hours of training, checked before any: the recipe (when the
    sparsify stage will run) and the teacher's initial weights (when the teacher stage will run:
    'imagenet' is downloaded now, a checkpoint path must hold a teacher of this arch and stem)."""
    if config.stop_after in ("sparsify", "bench"):
        from trainables.compress.core import load_recipe

        try:
            for sparsity in config.sparsities or (None,):  # each target's recipe; None: the recipe's own
                load_recipe(config.recipe, num_epochs=config.recipe_epochs,
                            **({} if sparsity is None else {"final_sparsity": sparsity}))
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


def check_deepsparse_python(python: str) -> str:
    """The DeepSparse version that ``--deepsparse-python`` imports, printed in one line; StudyError
    when that Python cannot import deepsparse (before any training)."""
    import subprocess

    from bench.engines.deepsparse import foreign_python_env

    proc = subprocess.run([python, "-c", "import deepsparse; print(deepsparse.__version__)"], capture_output=True,
                          text=True, env=foreign_python_env(), timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StudyError(f"--deepsparse-python {python}: cannot import deepsparse there ({last}); give a Python "
                         "3.10/3.11 with deepsparse==1.7.0 installed")
    version = proc.stdout.strip().splitlines()[-1]
    print(f"[bench] deepsparse {version} from {python} (its deepsparse.benchmark command)", flush=True)
    return version


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


def main(argv: list[str] | None = None) -> int:
    """Run the study; returns the process exit code (0 ok, 2 bad input or machine)."""
    try:
        config, args = config_from_args(argv)
        if args.dry_run:
            return dry_run(config, args.overwrite)
        set_verbose(config.verbose)  # before Ray starts: its workers inherit the choice
        sparsify = sparsify_stages(config.stop_after) and not args.report_only
        check_python(sparsify=sparsify)  # SparseML/DeepSparse only where those stages run
        check_packages(required_packages(config.stop_after if sparsify else "students"))
        note = torch_note()
        if note:
            print(note, flush=True)
        if args.report_only:
            return stage_report(config)
        if sparsify and runs_deepsparse(config.deepsparse_python):  # DeepSparse needs AVX2
            check_avx2()
        if config.deepsparse_python and config.stop_after == "bench":
            check_deepsparse_python(config.deepsparse_python)
        return run_study(config, args)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:  # leave the cluster now, not from an atexit hook while the interpreter shuts down
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()


def print_results(config: StudyConfig, table, setups, bench) -> None:
    """What a run prints at its end: ``driver.results.summary_text`` of the results and setups
    tables (DataFrames of ``results.csv``, ``setups.csv``) and, when the bench stage ran
    (``bench``: the ``benchmark.csv`` frame, else None), the throughput and latency table (its
    ``status``/``error`` columns only when a benchmark failed), the CPU's instruction set and
    VNNI, and per batch size which model is fastest (``report.fastest_model``)."""
    from driver.results import summary_text
    from report import fastest_model

    print(summary_text(config, table, setups))
    if bench is None:
        return
    from report import compression_verdict

    failed = bench["items_per_sec"].isna()  # rows of failed benchmarks (status "error")
    shown = bench.drop(columns=["isa", "vnni", "amx", "latency_p50_ms_rounds"], errors="ignore")
    if not (bench["status"] == "error").any():
        shown = shown.drop(columns=["status", "error"], errors="ignore")
    print("\nThroughput (items/s, median of the rounds), latency (ms), test accuracy in the engine, size (bytes):\n"
          + shown.to_markdown(index=False, floatfmt=".3f"))
    if not failed.all():
        cpu = bench[~failed].iloc[0]
        amx = cpu.get("amx")  # "" reads back from benchmark.csv as NaN
        print(f"CPU: {cpu['isa']}, VNNI {cpu['vnni']}, AMX {amx if isinstance(amx, str) and amx else 'none'}")
    for batch in sorted(set(bench[~failed]["batch_size"])):
        print(fastest_model(bench, batch))
        for sentence in compression_verdict(bench, batch):
            print(sentence)


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

    if check_output_dir(config, overwrite):
        print(f"--overwrite: would remove the earlier run in {config.output_dir} and run every stage")
        return 0
    if config.deepsparse_python and config.stop_after == "bench":
        check_deepsparse_python(config.deepsparse_python)
    if config.mlflow is not None:
        check_tracking(config, probe=False)
    _, digests = load_data(config)
    for decision in plan_run(config, digests):
        print(decision.line(dry_run=True))
    return 0


def start_reruns(config: StudyConfig, decisions: list, digests: dict):
    """Print the plan (one line per stage); when a stage reruns, first keep the result tables and
    config of the run so far in ``previous/<timestamp>/``; then write this run's ``config.json``.
    Returns the ``driver.reruns.Reruns`` the stages consult."""
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
    """All stages in order, skipping those whose outputs are already complete."""
    import pandas as pd

    from study.files import atomic_write_text
    from driver.results import (result_columns, set_onnx_accuracy, setups_table, sparsified_rows, sparsify_trial,
                                training_rows, trial_variant, variants_table)

    out, layout = Path(config.output_dir), RunLayout(config.output_dir)
    replace = check_output_dir(config, args.overwrite)
    from driver import tracking  # --mlflow (driver/tracking.py): checked before any training; a no-op without it

    tracker = tracking.open_tracker(config)
    # Joining a cluster takes a second: its requests are checked first. A local Ray takes longer
    # to start, so it starts once the data and inputs have passed their checks.
    nodes = start_ray(config) if config.address else None

    from driver.reruns import plan_run

    data, digests = load_data(config)
    decisions = None if replace else plan_run(config, digests)
    check_inputs(config, teacher_stage=replace or decisions[0].action != "skip")
    nodes = nodes or start_ray(config)
    if replace:
        print(f"--overwrite: removing the earlier run in {out}", flush=True)
        layout.remove_outputs()
        decisions = plan_run(config, digests)
    out.mkdir(parents=True, exist_ok=True)
    reruns = start_reruns(config, decisions, digests)
    if config.address:  # Tune's storage_path and every stage's output: one folder for all nodes
        from driver.cluster import check_shared_storage

        check_shared_storage(out, nodes)
    val = f" / {len(data.val_labels)} validation" if data.val_labels is not None else ""
    print(f"data: {len(data.train_labels)} training{val} / {len(data.test_labels)} test images; "
          f"{decision_rule(config)}; output: {out.resolve()}", flush=True)
    teacher_path = stage_teacher(config, data, reruns)
    tracker.sync("teacher")  # --mlflow
    if config.stop_after == "teacher":
        print(skipped_stages_line("teacher"), flush=True)
        return tracker.finish(0)
    students = stage_students(config, data, teacher_path, reruns)
    tracker.sync("students")  # --mlflow
    rows = training_rows(config, layout.teacher_dir.resolve(), students)
    table_of_variants = variants_table(config, rows)
    atomic_write_text(layout.variants, table_of_variants.to_csv(index=False))
    if config.sweep:  # setups.csv is the no-sweep table; a sweep's variants are not setups
        layout.setups.unlink(missing_ok=True)
    else:
        atomic_write_text(layout.setups, setups_table(config, rows).to_csv(index=False))
    bench = None
    if config.stop_after in ("sparsify", "bench"):
        best = sparsify_trial(config, students, rows)
        values = trial_variant(config, best.config)[1]
        summary = stage_sparsify(config, data, best, teacher_path, reruns)
        tracker.sync("sparsify")  # --mlflow
        rows += sparsified_rows(summary, rows, seed=best.config["seed"], values=values)
        if config.stop_after == "bench":
            bench, accuracies = stage_bench(config, data, summary, reruns)
            tracker.sync("bench")  # --mlflow
            set_onnx_accuracy(rows, accuracies, summary["setup"], best.config["seed"], values)
    table = pd.DataFrame(rows, columns=list(result_columns(config)))
    atomic_write_text(layout.results, table.to_csv(index=False))
    print_results(config, table, table_of_variants, bench)
    if skipped_stages_line(config.stop_after):
        print(skipped_stages_line(config.stop_after), flush=True)
    return tracker.finish(stage_report(config) if config.report else 0)  # --mlflow: tables, report.pdf


if __name__ == "__main__":
    sys.exit(main())
