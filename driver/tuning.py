"""Stages 1 and 2 under Ray Tune: each trial's resources and config, and one Tune experiment.

``run_tuner`` follows Ray Tune's conventions: resources by ``tune.with_resources``, stopping by
``RunConfig(stop=...)`` (``AccuracyPlateauStopper``), checkpoints by ``CheckpointConfig``, retries
by ``FailureConfig``, and an unfinished experiment continued with ``Tuner.restore``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from study import StudyConfig, StudyError, selection_metric
from study.config import variants
from study.errors import error_line
from study.resources import Node, plan_resources


def student_trials(config: StudyConfig) -> int:
    """How many student trials the grid holds: one per (variant, seed), i.e. setups x the values
    of every swept field (``--sweep``) x seeds."""
    return len(variants(config)) * config.seeds


def trial_resources(config: StudyConfig, role: str, nodes: list[Node] | None = None) -> dict:
    """Ray resources of one ``role`` ("teacher" or "student") trial, ``{"cpu": float, "gpu":
    float}``, sized from the cluster's nodes (``nodes``; default: the connected cluster's) by
    ``study.resources.plan_resources``: the teacher takes the whole of one node (plus one GPU when
    it has one); a student takes ``cpus_per_trial``/``gpus_per_trial``, or by default the largest
    share with which all student trials (``student_trials``) fit on the nodes at once. StudyError
    when no node holds it."""
    if nodes is None:
        from driver.cluster import cluster_nodes

        nodes = cluster_nodes()
    plan = plan_resources(config, nodes, student_trials(config))
    return (plan.teacher if role == "teacher" else plan.student).tune()


def trial_config(config: StudyConfig, role: str, resources: dict) -> dict:
    """The ``param_space`` handed to a trainable (plain values only; keys in ``trainables.train``).
    ``threads`` = floor of the trial's CPU share, at least 1 (Ray's OMP_NUM_THREADS rule); it is
    derived from the cluster, so ``run_tuner`` resolves it when each trial starts (``RESOURCE_KEYS``);
    ``compile`` = ``--compile`` (None: the trainable decides by its device)."""
    return {
        "arch": config.arch, "stem": config.stem, "num_classes": 10, "seed": config.seed,
        "batch_size": config.batch_size, "temperature": config.temperature,
        "lr": config.teacher_lr if role == "teacher" else config.lr,
        "max_epochs": config.teacher_max_epochs if role == "teacher" else config.max_epochs,
        "teacher_weights": config.teacher_weights, "threads": max(1, math.floor(resources["cpu"])),
        "compile": config.compile,
    }


def trial_seeds(config: StudyConfig) -> list[int]:
    """The seeds each student setup trains with: ``config.seed + i`` for i in 0..seeds-1, so
    ``--seeds 1`` is the single-seed run (seed ``config.seed``)."""
    return [config.seed + i for i in range(config.seeds)]


def student_space(config: StudyConfig, resources: dict) -> dict:
    """The students' ``param_space``: ``trial_config`` with a grid over setup x every swept field
    (``--sweep``: that key's scalar replaced by ``tune.grid_search`` over its values) x seed, one
    trial per (variant, seed)."""
    from ray import tune

    space = trial_config(config, "student", resources)
    space["setup"] = tune.grid_search(list(config.setups))
    for name, values in config.sweep:
        space[name] = tune.grid_search(list(values))
    space["seed"] = tune.grid_search(trial_seeds(config))
    return space


#: ``param_space`` keys derived from the cluster the run is on, not from the study's settings.
RESOURCE_KEYS = ("threads",)


def _resolved_at_trial_start(param_space: dict) -> dict:
    """``param_space`` with each ``RESOURCE_KEYS`` value as ``tune.sample_from``: Tune stores a
    placeholder in the trial and resolves it when the trial is added, and on ``Tuner.restore``
    resolves it from the ``param_space`` given there, i.e. computed for the cluster the run
    resumes on, not restored from the old experiment (``ray.tune.impl.placeholder``)."""
    from ray import tune

    def constant(value):
        return tune.sample_from(lambda _spec: value)

    return {key: constant(value) if key in RESOURCE_KEYS else value for key, value in param_space.items()}


def run_tuner(config: StudyConfig, name: str, trainable, param_space: dict, resources: dict,
              max_epochs: int, storage: str | None = None):
    """One Tune experiment under ``<output-dir>/<name>`` (or ``<storage>/<name>``: a rerun's
    staging folder, ``RunLayout.staging``); returns its ResultGrid.

    Stopping by AccuracyPlateauStopper on the selection metric (``study.selection_metric``:
    ``val_acc`` with ``--val-size``, else ``test_acc``), a checkpoint every epoch (the best by that
    metric and the latest are kept: selection and resume need no more), failed trials retried
    from their last checkpoint (twice at most). As many trials run at once as ``resources`` fit
    on the nodes (``study.resources``); the rest wait. One line per epoch per trial
    (``EpochLines``); Tune's own tables only with ``--verbose``. Once every trial has finished,
    the optimizer state is dropped from the checkpoints (``drop_optimizer_state``).

    Raises StudyError when any trial ended in an error (the first error's first line), or when
    the machine ran out of memory (each of #setups x #seeds trials holds its own model copies).
    """
    from ray import tune

    storage = str(Path(storage or config.output_dir).resolve())
    path = os.path.join(storage, name)
    # Resources and threads are this cluster's, also on restore: the restored trials take their
    # resources from the trainable given here and their threads from this param_space.
    wrapped = tune.with_resources(trainable, resources)
    param_space = _resolved_at_trial_start(param_space)
    if tune.Tuner.can_restore(path):
        print(f"[{name}] restoring the experiment in {path}: finished trials are kept, "
              "unfinished ones resume from their last checkpoint", flush=True)
        tuner = tune.Tuner.restore(path, trainable=wrapped, param_space=param_space,
                                   resume_unfinished=True, restart_errored=True)
    else:
        tuner = _new_tuner(config, name, wrapped, param_space, max_epochs, storage)
    try:
        grid = tuner.fit()
    except RuntimeError as err:  # Tune gives up when Ray's memory monitor kills a trial starting up
        if "running low on memory" not in str(err):
            raise
        raise StudyError(f"the machine ran out of memory during the {name} stage (Ray killed a trial); run the "
                         "same command again to resume it, with a larger --cpus-per-trial to run fewer trials "
                         "at once") from None
    errors = [error_line(r.error) for r in grid if r.error]
    if errors:
        raise StudyError(f"{len(errors)} {name} trial(s) failed; first error: {errors[0]}")
    drop_optimizer_state(Path(path))
    return grid


def _new_tuner(config: StudyConfig, name: str, wrapped, param_space: dict, max_epochs: int, storage: str):
    """A fresh ``tune.Tuner`` of ``run_tuner``'s experiment ``<storage>/<name>``: its stopper,
    checkpoints, retries, epoch lines and verbosity."""
    from ray import tune

    from study.noise import verbose
    from driver.progress import EpochLines
    from trainables.stopper import AccuracyPlateauStopper

    metric = selection_metric(config)
    return tune.Tuner(
        wrapped,
        param_space=param_space,
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            stop=AccuracyPlateauStopper(metric=metric, tolerance=config.tolerance,
                                        patience=config.patience, max_epochs=max_epochs),
            checkpoint_config=tune.CheckpointConfig(  # Tune always keeps the latest as well
                num_to_keep=1, checkpoint_score_attribute=metric,
                checkpoint_score_order="max"),
            failure_config=tune.FailureConfig(max_failures=2),
            callbacks=[EpochLines(name, several_seeds=config.seeds > 1,
                                  swept=[n for n, _ in config.sweep] if name == "students" else ())],
            verbose=1 if verbose() else 0,
        ),
    )


def drop_optimizer_state(experiment: Path) -> int:
    """Delete the resume-only file (``trainables.train.STATE_FILE``: Adam state, epoch, history;
    twice the size of the weights) from every checkpoint of a finished Tune experiment; the
    weights (``model.pt``), which selection and the later stages read, stay. Returns the bytes
    freed. Only for an experiment whose trials have all finished: no trial resumes any more."""
    from trainables.train import STATE_FILE

    freed = 0
    for state in Path(experiment).glob(f"*/checkpoint_*/{STATE_FILE}"):
        freed += state.stat().st_size
        state.unlink()
    return freed
