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


def trial_resources(config: StudyConfig, role: str) -> dict:
    """Ray resources of one trial, ``{"cpu": float, "gpu": float}``: the teacher takes the whole
    machine (or ``cpus_per_trial`` x #setups) and one GPU when there is one; a student takes
    ``cpus_per_trial`` (default: an equal share of the CPUs) and ``gpus_per_trial`` (default:
    1/#setups of a GPU when there is one)."""
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
    """The ``param_space`` handed to a trainable (plain values only; keys in ``trainables.train``).
    ``threads`` = floor of the trial's CPU share, at least 1 (Ray's OMP_NUM_THREADS rule)."""
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

    Stopping by AccuracyPlateauStopper, a checkpoint every epoch (the best by test_acc and the
    latest are kept: selection and resume need no more), failed trials retried from their last
    checkpoint (twice at most). One line per epoch per trial (``EpochLines``); Tune's own tables
    only with ``--verbose``. Once every trial has finished, the optimizer state is dropped from
    the checkpoints (``drop_optimizer_state``).

    Raises StudyError when any trial ended in an error (the first error's first line).
    """
    from ray import tune

    from study.noise import verbose
    from trainables.progress import EpochLines
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
                checkpoint_config=tune.CheckpointConfig(  # Tune always keeps the latest as well
                    num_to_keep=1, checkpoint_score_attribute="test_acc",
                    checkpoint_score_order="max"),
                failure_config=tune.FailureConfig(max_failures=2),
                callbacks=[EpochLines(name)],
                verbose=1 if verbose() else 0,
            ),
        )
    grid = tuner.fit()
    errors = [str(r.error).splitlines()[0] for r in grid if r.error]
    if errors:
        raise StudyError(f"{len(errors)} {name} trial(s) failed; first error: {errors[0]}")
    drop_optimizer_state(Path(path))
    return grid


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
