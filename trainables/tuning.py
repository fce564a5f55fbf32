"""Stages 1 and 2 under Ray Tune: each trial's resources and config, and one Tune experiment.

``run_tuner`` follows Ray Tune's conventions: resources by ``tune.with_resources``, stopping by
``RunConfig(stop=...)`` (``AccuracyPlateauStopper``), checkpoints by ``CheckpointConfig``, retries
by ``FailureConfig``, and an unfinished experiment continued with ``Tuner.restore``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from study import StudyConfig, StudyError
from study.resources import Node, plan_resources


def student_trials(config: StudyConfig) -> int:
    """How many student trials the grid holds: one per setup."""
    return len(config.setups)


def trial_resources(config: StudyConfig, role: str, nodes: list[Node] | None = None) -> dict:
    """Ray resources of one ``role`` ("teacher" or "student") trial, ``{"cpu": float, "gpu":
    float}``, sized from the cluster's nodes (``nodes``; default: the connected cluster's) by
    ``study.resources.plan_resources``: the teacher takes the whole of one node (plus one GPU when
    it has one); a student takes ``cpus_per_trial``/``gpus_per_trial``, or by default the largest
    share with which all student trials fit on the nodes at once. StudyError when no node holds it."""
    if nodes is None:
        from trainables.cluster import cluster_nodes

        nodes = cluster_nodes()
    plan = plan_resources(config, nodes, student_trials(config))
    return (plan.teacher if role == "teacher" else plan.student).tune()


def trial_config(config: StudyConfig, role: str, resources: dict) -> dict:
    """The ``param_space`` handed to a trainable (plain values only; keys in ``trainables.train``).
    ``threads`` = floor of the trial's CPU share, at least 1 (Ray's OMP_NUM_THREADS rule); it is
    derived from the cluster, so ``run_tuner`` resolves it when each trial starts (``RESOURCE_KEYS``)."""
    return {
        "arch": config.arch, "stem": config.stem, "num_classes": 10, "seed": config.seed,
        "batch_size": config.batch_size, "temperature": config.temperature,
        "lr": config.teacher_lr if role == "teacher" else config.lr,
        "max_epochs": config.teacher_max_epochs if role == "teacher" else config.max_epochs,
        "teacher_weights": config.teacher_weights, "threads": max(1, math.floor(resources["cpu"])),
    }


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
              max_epochs: int):
    """One Tune experiment under ``<output-dir>/<name>``; returns its ResultGrid.

    Stopping by AccuracyPlateauStopper, a checkpoint every epoch (the best two by test_acc and
    the latest are kept), failed trials retried from their last checkpoint (twice at most). As
    many trials run at once as ``resources`` fit on the nodes (``study.resources``); the rest wait.

    Raises StudyError when any trial ended in an error (the first error's first line).
    """
    from ray import tune

    from trainables.stopper import AccuracyPlateauStopper

    storage = str(Path(config.output_dir).resolve())
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
        tuner = tune.Tuner(
            wrapped,
            param_space=param_space,
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
