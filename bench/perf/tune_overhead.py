#!/usr/bin/env python
"""What Ray Tune costs the student trials, and what running them at once buys.

Parts (``--parts``, run in this order, all in one process and one Ray instance):

* ``direct``: ``trainables.student.train_student`` called as a plain function with the study's
  config (``study.make_config`` + ``driver.tuning.trial_config``), ``tune.report`` replaced by
  a recorder (outside a Tune session Ray 2.49's ``tune.report`` is a no-op and
  ``tune.get_checkpoint`` returns None, so the loop runs unchanged; the per-epoch checkpoint is
  still written to a temporary folder, then deleted). It runs in a plain Ray task with the same
  CPUs as the Tune trial (a worker process like the trial's, Ray's OMP_NUM_THREADS included);
  ``direct_driver`` (not in the default list) runs it in this process instead;
* ``tune``: the same trainable, config and threads as one Tune trial (``tune.with_parameters``,
  the study's stopper and checkpoint settings);
* ``concurrent``: the three setups as one Tune grid, ``max_concurrent_trials=3``, each trial with
  the resources and threads ``driver.tuning.trial_resources``/``trial_config`` give it (a third of
  the CPUs; threads = max(1, round(share)));
* ``sequential``: the same three trials, ``max_concurrent_trials=1``, same per-trial config;
* ``sequential_full``: one after another, each trial given every core (threads = cores);
* ``concurrent_oversubscribed`` (not in the default list): three at once, each with threads =
  cores (what ignoring the CPU share would cost);
* ``env`` (not in the default list): what the trainable sees in this process, in a plain Ray
  task and in a Tune trial: its thread, torch's intra-/inter-op threads, ``OMP_NUM_THREADS``,
  ``CUDA_VISIBLE_DEVICES``, and where the training images live (the memory mapping holding
  them: heap, anonymous, or Ray's shared-memory object store).

``--role teacher`` measures ``train_teacher`` instead (parts direct, direct_driver, tune, env):
the case where a 1.45x slowdown under Tune was reported on a GPU. With a GPU visible the
direct and tune parts get the whole GPU (the concurrent ones a share, as in the study).

Per-epoch time is wall time between two reports (epoch 1 also holds the model set-up), both
directly and under Tune (Tune's ``time_this_iter_s``); ``epoch_seconds`` is the loop's own
train + evaluate time. Tune overhead = later epochs under Tune / later epochs direct - 1.

The images are real CIFAR-10: a stratified subset of ``--data-root`` (e.g. an extracted copy;
its decoded-tensor cache is used), or by default the first images per class streamed out of
``../shared/data/cifar10-jpg.tar.gz`` into a temporary folder. The teacher is randomly
initialised (speed does not depend on its weights).

Example: ``python bench/perf/tune_overhead.py --parts direct,tune --epochs 3 --train-subset 256``
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))  # this checkout's packages, here and in Ray's workers
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(PROJECT_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no progress tables

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.perf.tune_trials import MEASURE, measure_three_trials, prepare  # noqa: E402

TARBALL = PROJECT_DIR.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
PARTS = ("direct", "tune", "concurrent", "sequential", "sequential_full",
         "concurrent_oversubscribed", "direct_driver", "env")
DEFAULT_PARTS = PARTS[:5]


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated, from {','.join(PARTS)} (default: {','.join(DEFAULT_PARTS)})")
    parser.add_argument("--preset", default="cpu", help="study preset the config starts from (default: cpu)")
    parser.add_argument("--arch", default=None, help="override the preset's arch")
    parser.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    parser.add_argument("--train-subset", type=int, default=256, help="training images, 0 = all (default: 256)")
    parser.add_argument("--test-subset", type=int, default=200, help="test images, 0 = all (default: 200)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default: 2)")
    parser.add_argument("--setup", default="kd", help="setup of the direct/tune parts (default: kd)")
    parser.add_argument("--role", default="student", choices=("student", "teacher"),
                        help="trainable of the direct/tune parts (default: student)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads (= Tune CPUs) of the direct/tune parts (default: all cores)")
    parser.add_argument("--cpus", type=int, default=None,
                        help="CPUs of the Ray instance (default: the cores this process may use)")
    parser.add_argument("--data-root", default=None,
                        help=f"CIFAR-10 root (default: images streamed out of {TARBALL})")
    parser.add_argument("--output-dir", default=None,
                        help="Tune storage (default: a temporary folder, deleted at the end)")
    return parser


# ------------------------------------------------------------------------------------ data


def load_data(args, workdir: Path):
    """(CIFAR10Tensors, source description): stratified subsets of ``--data-root``, or of images
    extracted from the shared tarball into ``workdir`` when no root is given."""
    from trainables.batches import stratified_subset
    from trainables.data import CIFAR10Tensors, extract_image_subset, load_cifar10

    if args.data_root:
        data, source = load_cifar10(args.data_root), args.data_root
    else:
        if not TARBALL.is_file():
            raise SystemExit(f"error: {TARBALL} not found; pass --data-root")
        if not (args.train_subset and args.test_subset):
            raise SystemExit("error: --train-subset/--test-subset 0 (all images) needs --data-root")
        per_class = {"train": math.ceil(args.train_subset / 10), "test": math.ceil(args.test_subset / 10)}
        root = extract_image_subset(TARBALL, workdir / "cifar10", per_class)
        data, source = load_cifar10(root, cache=False), f"{TARBALL.name} (first images per class)"
    train, test = (data.train_images, data.train_labels), (data.test_images, data.test_labels)
    if args.train_subset:  # 0 = all
        train = stratified_subset(*train, args.train_subset, seed=0)
    if args.test_subset:
        test = stratified_subset(*test, args.test_subset, seed=0)
    return CIFAR10Tensors(*train, *test), source


def teacher_payload(config) -> dict:
    """What the students stage (``stages.students``) hands the trials: ``torch.load`` of a teacher
    checkpoint (here of a randomly initialised teacher)."""
    from models import build_teacher, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(build_teacher(config.arch, stem=config.stem, weights=None),
                               os.path.join(tmp, "teacher.pt"), arch=config.arch,
                               stem=config.stem, num_classes=10, role="teacher")
        return torch.load(path, map_location="cpu")


# ------------------------------------------------------------------------------------ tables


def tune_ratios(epochs) -> list[dict]:
    """Tune's overhead over each direct part that ran (needs ``tune`` too), in %."""
    ratios = []
    modes = set(epochs["mode"])
    for base in ("direct", "direct_driver"):
        if not {base, "tune"} <= modes:
            continue
        d = epochs[epochs["mode"] == base].iloc[0]
        t = epochs[epochs["mode"] == "tune"].iloc[0]
        if d["epochs"] > 1:
            ratios.append({"ratio": f"Tune overhead per epoch vs {base} (later epochs, wall) %",
                           "value": 100 * (t["later_epochs_s"] / d["later_epochs_s"] - 1)})
        ratios.append({"ratio": f"Tune overhead per epoch vs {base} (loop's epoch_seconds) %",
                       "value": 100 * (t["loop_epoch_s"] / d["loop_epoch_s"] - 1)})
        ratios.append({"ratio": f"Tune overhead, whole trial vs {base} (time in the trainable) %",
                       "value": 100 * (t["trial_total_s"] / d["trial_total_s"] - 1)})
        if base == "direct":
            ratios.append({"ratio": "Tune overhead, tuner.fit() vs the direct Ray task, start to end %",
                           "value": 100 * (t["fit_wall_s"] / d["fit_wall_s"] - 1)})
    return ratios


def wall_ratios(walls) -> list[dict]:
    """Sequential over concurrent wall time of the three-trial parts that ran."""
    ratios = []
    by_mode = dict(zip(walls["mode"], walls["fit_wall_s"]))
    for seq in ("sequential", "sequential_full"):
        for con in ("concurrent", "concurrent_oversubscribed"):
            if seq in by_mode and con in by_mode:
                ratios.append({"ratio": f"{seq} / {con} wall time",
                               "value": by_mode[seq] / by_mode[con]})
    if "concurrent_oversubscribed" in by_mode and "concurrent" in by_mode:
        ratios.append({"ratio": "concurrent_oversubscribed / concurrent wall time",
                       "value": by_mode["concurrent_oversubscribed"] / by_mode["concurrent"]})
    return ratios


def print_tables(epoch_rows: list[dict], wall_rows: list[dict]) -> None:
    """The per-trial epoch table, the three-trial wall-time table (when those parts ran) and the
    ratios."""
    epochs = pd.DataFrame(epoch_rows)
    print("\nPer-trial epoch times (s; later_epochs_s = mean wall time between reports after the "
          "first; loop_epoch_s = the loop's own train+evaluate time):")
    print(epochs.to_markdown(index=False, floatfmt=".2f"))
    ratios = tune_ratios(epochs)
    if wall_rows:
        walls = pd.DataFrame(wall_rows)
        print("\nThree student trials (wall time of tuner.fit(), s):")
        print(walls.to_markdown(index=False, floatfmt=".2f"))
        ratios += wall_ratios(walls)
    if ratios:
        print()
        print(pd.DataFrame(ratios).to_markdown(index=False, floatfmt=".2f"))


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts, print the table and the ratios; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        parser.error(f"--parts {','.join(bad) or '(none)'}: allowed {','.join(PARTS)}")
    if args.role == "teacher" and set(parts) - {"direct", "direct_driver", "tune", "env"}:
        parser.error("--role teacher: only the parts direct, direct_driver, tune, env")

    import ray

    import study

    cores = args.cpus or len(os.sched_getaffinity(0))
    gpus = 1.0 if torch.cuda.is_available() else 0.0
    overrides = dict(batch_size=args.batch_size, train_subset=args.train_subset, test_subset=args.test_subset,
                     max_epochs=args.epochs, teacher_max_epochs=args.epochs, teacher_weights=None)
    if args.arch:
        overrides["arch"] = args.arch
    config = study.make_config(args.preset, **overrides)
    workdir = Path(tempfile.mkdtemp(prefix="tune-overhead-"))
    storage = str(Path(args.output_dir).resolve()) if args.output_dir else str(workdir / "runs")
    epoch_rows, wall_rows = [], []
    try:
        data, source = load_data(args, workdir)
        teacher = teacher_payload(config)
        ray.init(address="local", num_cpus=cores, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        where = ray.get(ray.remote(lambda: __import__("trainables.train").train.__file__).remote())
        print(f"config: preset {args.preset}, arch {config.arch}, batch {config.batch_size}, "
              f"{len(data.train_labels)} train / {len(data.test_labels)} test images ({source}), "
              f"{args.epochs} epochs; Ray CPUs {cores}; workers import {where}", flush=True)
        context = prepare(args, config, data, teacher, storage, cores, gpus)
        for part in parts:
            print(f"[{part}] running ...", flush=True)
            rows, walls = MEASURE.get(part, measure_three_trials)(context, part)
            epoch_rows += rows
            wall_rows += [walls] if walls else []
            print(f"[{part}] done", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    print_tables(epoch_rows, wall_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
