"""The parts of ``tune_overhead.py``: the trainable called directly, as Tune trials, and the
``env`` probe; each ``measure_*`` returns (per-trial epoch rows, the three-trial wall-time row or
None). Imported by ``tune_overhead.py`` after it has set ``sys.path`` and Ray's environment."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from unittest import mock

import pandas as pd
import torch


# ------------------------------------------------------------------------------------ parts


def run_direct(space: dict, data, teacher: dict | None) -> dict:
    """``train_student`` (``train_teacher`` when ``teacher`` is None) as a plain call; returns
    per-epoch wall times and the metrics."""
    from trainables import student, train

    stamps, metrics = [], []

    def report(values, checkpoint=None):
        stamps.append(time.perf_counter())
        metrics.append(dict(values))

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    with mock.patch.object(train.tune, "report", report), \
            mock.patch.object(train.tune, "get_checkpoint", lambda: None):
        if teacher is None:
            train.train_teacher(dict(space), data=data)
        else:
            student.train_student(dict(space), data=data, teacher=teacher)
    total = time.perf_counter() - t0
    torch.set_num_threads(threads)
    epochs = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    return {"epoch_wall": epochs, "epoch_seconds": [m["epoch_seconds"] for m in metrics],
            "images_per_s": [m["train_images_per_sec"] for m in metrics], "total": total}


def probe(data) -> dict:
    """What differs between the ways the trainable runs: thread, torch threads, the env
    variables Ray sets, and the memory mapping (``/proc/self/maps``) holding the train images."""
    import threading

    address, where = data.train_images.data_ptr(), "?"
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, *rest = line.split()
            low, high = (int(v, 16) for v in span.split("-"))
            if low <= address < high:
                where = rest[4] if len(rest) > 4 else "anonymous"
                break
    return {"thread": threading.current_thread().name, "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "-"),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "-"), "images_in": where}


def probe_trainable(config: dict, data) -> None:
    """A Tune function trainable that reports ``probe`` once."""
    from ray import tune

    tune.report({**probe(data), "test_acc": 0.0})  # the stopper reads test_acc


def fit(config, storage: str, name: str, trainable, space: dict, resources: dict,
        max_concurrent: int):
    """``driver.tuning.run_tuner``'s Tuner (stopper, checkpoints) with ``max_concurrent``
    trials at once; no retries, quiet. Returns (ResultGrid, wall seconds of ``fit()``)."""
    from ray import tune

    from trainables.stopper import AccuracyPlateauStopper

    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(
            name=name, storage_path=storage,
            stop=AccuracyPlateauStopper(metric="test_acc", tolerance=config.tolerance,
                                        patience=config.patience, max_epochs=config.max_epochs),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="test_acc", checkpoint_score_order="max"),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    errors = [str(r.error).splitlines()[0] for r in grid if r.error]
    if errors:
        raise SystemExit(f"error: {name}: {errors[0]}")
    return grid, wall


def trial_rows(grid, label: str | None = None) -> list[dict]:
    """Per-trial rows of a ResultGrid: setup (or ``label``), threads, epochs, per-epoch
    wall/loop seconds and images/s, total seconds, start/end (unix s)."""
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        rows.append({"setup": label or result.config["setup"], "threads": result.config["threads"],
                     "epochs": len(frame), "epoch_wall": list(frame["time_this_iter_s"]),
                     "epoch_seconds": list(frame["epoch_seconds"]),
                     "images_per_s": list(frame["train_images_per_sec"]),
                     "total": float(frame["time_total_s"].iloc[-1]),
                     "start": float(frame["trial_started_at"].iloc[0]),
                     "end": float(frame["timestamp"].iloc[-1])})
    return rows


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _epoch_row(mode: str, setup: str, threads: int, r: dict) -> dict:
    return {"mode": mode, "setup": setup, "threads": threads, "epochs": len(r["epoch_wall"]),
            "epoch1_s": r["epoch_wall"][0], "later_epochs_s": _mean(r["epoch_wall"][1:]),
            "loop_epoch_s": _mean(r["epoch_seconds"][1:] or r["epoch_seconds"]),
            "train_img_per_s": _mean(r["images_per_s"][1:] or r["images_per_s"]),
            "trial_total_s": r["total"]}


# ------------------------------------------------------------------------------------ measurements


@dataclass
class Context:
    """What every measurement shares: the study config and data, the Tune storage, the machine
    (``cores`` of the Ray instance, ``gpus`` 0 or 1), and for the direct/tune parts the trainable
    (``one_trainable``; ``one_teacher`` None for the teacher), its resources (``one``), config
    (``one_space``) and row label; for the three-trial parts the students' trainable, their
    resource share and grid (``share``, ``grid_space``)."""

    config: object
    data: object
    storage: str
    cores: int
    threads: int
    gpus: float
    student: object
    one: dict
    one_space: dict
    one_trainable: object
    one_teacher: dict | None
    label: str
    share: dict
    grid_space: dict


def prepare(args, config, data, teacher: dict, storage: str, cores: int, gpus: float) -> Context:
    """The trainables, resources and configs of the parts (``driver.tuning``'s, as the study
    builds them)."""
    from ray import tune

    from driver import tuning
    from trainables.student import train_student
    from trainables.train import train_teacher

    threads = args.threads or cores
    student = tune.with_parameters(train_student, data=data, teacher=teacher)
    one = {"cpu": threads, "gpu": gpus}
    one_space = {**tuning.trial_config(config, args.role, one), "setup": args.setup}
    one_trainable, one_teacher = student, teacher
    if args.role == "teacher":
        one_trainable, one_teacher = tune.with_parameters(train_teacher, data=data), None
    share = tuning.trial_resources(config, "student")
    grid_space = {**tuning.trial_config(config, "student", share), "setup": tune.grid_search(list(config.setups))}
    return Context(config=config, data=data, storage=storage, cores=cores, threads=threads, gpus=gpus,
                   student=student, one=one, one_space=one_space, one_trainable=one_trainable,
                   one_teacher=one_teacher, label="teacher" if args.role == "teacher" else args.setup,
                   share=share, grid_space=grid_space)


def measure_direct(b: Context, part: str) -> tuple[list[dict], dict | None]:
    """``direct``: the trainable in a plain Ray task with the trial's resources; its row also
    holds the task's wall time, start to end."""
    import ray

    task = ray.remote(num_cpus=b.threads, num_gpus=b.gpus)(run_direct)
    t0 = time.perf_counter()
    r = ray.get(task.remote(b.one_space, b.data, b.one_teacher))
    row = _epoch_row("direct", b.label, b.one_space["threads"], r)
    row["fit_wall_s"] = time.perf_counter() - t0  # Ray task, start to end
    return [row], None


def measure_direct_driver(b: Context, part: str) -> tuple[list[dict], dict | None]:
    """``direct_driver``: the trainable called in this process."""
    r = run_direct(b.one_space, b.data, b.one_teacher)
    return [_epoch_row("direct_driver", b.label, b.one_space["threads"], r)], None


def measure_env(b: Context, part: str) -> tuple[list[dict], dict | None]:
    """``env``: prints ``probe`` in this process, in a Ray task and in a Tune trial."""
    import ray
    from ray import tune

    task = ray.remote(num_cpus=b.threads, num_gpus=b.gpus)(probe)
    grid, _ = fit(b.config, b.storage, "tune-env", tune.with_parameters(probe_trainable, data=b.data),
                  b.one_space, b.one, 1)
    keys = list(probe(b.data))
    envs = pd.DataFrame([{"where": "this process (driver)", **probe(b.data)},
                         {"where": "Ray task", **ray.get(task.remote(b.data))},
                         {"where": "Tune trial", **{k: grid[0].metrics[k] for k in keys}}])
    print(envs.to_markdown(index=False))
    return [], None


def measure_tune(b: Context, part: str) -> tuple[list[dict], dict | None]:
    """``tune``: the trainable as one Tune trial; its row also holds ``tuner.fit()``'s wall time."""
    grid, wall = fit(b.config, b.storage, "tune-one", b.one_trainable, b.one_space, b.one, 1)
    (r,) = trial_rows(grid, b.label)
    row = _epoch_row("tune", b.label, r["threads"], r)
    row["fit_wall_s"] = wall
    return [row], None


def measure_three_trials(b: Context, part: str) -> tuple[list[dict], dict | None]:
    """``concurrent``, ``sequential``, ``sequential_full``, ``concurrent_oversubscribed``: the three
    setups as one Tune grid; one row per trial, and the grid's wall-time row."""
    concurrent = part.startswith("concurrent")
    resources, space = b.share, dict(b.grid_space)
    if part == "sequential_full":
        from driver import tuning

        resources = {"cpu": float(b.cores), "gpu": 0.0}
        space = {**tuning.trial_config(b.config, "student", resources), "setup": b.grid_space["setup"]}
    if part == "concurrent_oversubscribed":
        space["threads"] = b.cores
    grid, wall = fit(b.config, b.storage, part, b.student, space, resources,
                     len(b.config.setups) if concurrent else 1)
    rows = trial_rows(grid)
    starts, ends = [r["start"] for r in rows], [r["end"] for r in rows]
    walls = {"mode": part, "max_concurrent": len(rows) if concurrent else 1,
             "cpus_per_trial": resources["cpu"], "threads_per_trial": space["threads"],
             "fit_wall_s": wall, "trials_span_s": max(ends) - min(starts),
             "sum_trial_s": sum(r["total"] for r in rows),
             "images_per_s_total": sum(b.config.train_subset * r["epochs"] for r in rows) / wall}
    return [_epoch_row(part, r["setup"], r["threads"], r) for r in rows], walls


MEASURE = {"direct": measure_direct, "direct_driver": measure_direct_driver, "env": measure_env,
           "tune": measure_tune}  # every other part: measure_three_trials
