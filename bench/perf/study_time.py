#!/usr/bin/env python
"""How long the whole study takes on this device: one measured epoch per stage, projected.

Measures, on the device the trainables pick (``trainables.train.pick_device``: the GPU when there
is one), each in a fresh Ray worker process as in the study, two epochs (the first holds the
warm-up: compilation, cuDNN autotuning) of

* ``teacher``: ``train_teacher`` with the whole device;
* ``student <setup>``: ``train_student`` for each setup alone, with the whole device;
* ``students x3``: the setups at once, each with 1/#setups of the GPU (or of the CPUs), as
  ``driver.tuning`` gives the Tune trials;
* ``recipe pre-QAT`` / ``recipe QAT``: ``trainables.compress.core.RecipeRun`` with the study's
  recipe at ``num_epochs=3`` (epochs 0-1 prune and fine-tune, epoch 2 is QAT); epoch 1 and epoch 2
  are the measured epochs. Skipped when SparseML is not installed.

The tune trainables are called directly (``tune.report`` replaced by a recorder, checkpoints
written and deleted as in the study). It prints per stage: training images/s, the steady epoch
(train + test) in seconds at the measured sizes, the first-epoch overhead (epoch 1 - epoch 2,
s) and the loop's own ``warmup_seconds``, GFLOP per training image (``torch.utils.flop_counter``:
convolutions and matmuls, forward + backward, plus the frozen teacher's forward for kd/kd_feat),
achieved TFLOP/s and MFU against a peak measured here (a large matmul: bf16 on a GPU, float32 on
a CPU; ``--peak-tflops`` overrides). Then the projected wall time of the preset's study at its
epoch bounds (``teacher_max_epochs``, ``max_epochs``, ``recipe_epochs``) on its data sizes,
plus the benchmark stage's fixed time (``bench_seconds`` and ``bench_warmup_seconds`` per
model, engine and batch size). Not included: loading the data, starting Ray, ONNX export, the
report. Stopping early by the plateau rule makes the real study shorter.

Example (CPU, minutes): ``python bench/perf/study_time.py --preset smoke --data-root DIR``; on a
GPU: ``python bench/perf/study_time.py --preset full --data-root DIR``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from unittest import mock

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))  # this checkout's packages, here and in Ray's workers
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(PROJECT_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import study  # noqa: E402
from study.layout import model_names, sparsity_targets  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smoke", help="study preset to project (default: smoke)")
    parser.add_argument("--data-root", required=True, help="CIFAR-10 root, as for orchestrate.py")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="training images measured per epoch (default: the preset's; 0 = all)")
    parser.add_argument("--test-subset", type=int, default=None,
                        help="test images measured per epoch (default: the preset's; 0 = all)")
    parser.add_argument("--batch-size", type=int, default=None, help="(default: the preset's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile (default: as the study: on a GPU only)")
    parser.add_argument("--stages", default="teacher,students,concurrent,recipe",
                        help="comma-separated subset of teacher,students,concurrent,recipe")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (default: measured with a matmul)")
    return parser


# ------------------------------------------------------------------------------ in the workers


def run_trainable(role: str, space: dict, data, teacher: dict | None) -> list[dict]:
    """``train_teacher``/``train_student`` called directly; returns the reported metrics."""
    from trainables import student, train

    reports = []

    def report(metrics, checkpoint=None):
        reports.append(dict(metrics))

    with mock.patch.object(train.tune, "report", report), \
            mock.patch.object(train.tune, "get_checkpoint", lambda: None):
        if role == "teacher":
            train.train_teacher(dict(space), data=data)
        else:
            student.train_student(dict(space), data=data, teacher=teacher)
    return reports


def run_recipe_epochs(config, space: dict, data) -> list[dict]:
    """Three epochs of the study's recipe (``num_epochs=3``) on a fresh student; per epoch:
    training seconds, test seconds, images, QAT on or not."""
    from models import build_student
    from trainables.batches import num_batches, train_batches
    from trainables.compress.core import RecipeRun, is_quantized, load_recipe
    from trainables.train import evaluate, pick_device, setup_torch

    device = pick_device()
    setup_torch(space, device)
    model = build_student(config.arch, num_classes=10, stem=config.stem).to(device)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    marks, rows = {}, []

    def batches(epoch):
        marks["start"] = time.perf_counter()
        return train_batches(images, labels, config.batch_size, seed=0, epoch=epoch, device=device)

    def accuracy(m):
        t0 = time.perf_counter()
        acc = evaluate(m, data.test_images, data.test_labels, config.batch_size, device)
        rows.append({"train_s": t0 - marks["start"], "test_s": time.perf_counter() - t0,
                     "images": len(labels), "qat": is_quantized(m)})
        return acc

    RecipeRun(model, load_recipe(config.recipe, num_epochs=3), torch.optim.Adam(model.parameters()),
              batches, accuracy, steps_per_epoch=num_batches(len(labels), config.batch_size),
              log=None).run()
    return rows


# ------------------------------------------------------------------------------ FLOPs, peak


def flops_per_image(role: str, config, setup: str = "ce", batch: int = 2) -> float:
    """FLOPs of one training step per image (conv + matmul, forward + backward; for kd/kd_feat
    also the teacher's forward), counted by ``torch.utils.flop_counter.FlopCounterMode`` on CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_student, build_teacher
    from trainables.losses import distillation_loss
    from trainables.student import student_loss

    x, y = torch.randn(batch, 3, 32, 32), torch.arange(batch) % 10
    teacher = build_teacher(config.arch, stem=config.stem, weights=None)
    if role == "teacher":
        def loss_fn(a, b):
            return distillation_loss("ce", teacher(a), b)
    else:
        loss_fn = student_loss(setup, build_student(config.arch, stem=config.stem),
                               teacher.eval().requires_grad_(False), config.temperature)
    with FlopCounterMode(display=False) as counter:
        loss_fn(x, y)[0].backward()
    return counter.get_total_flops() / batch


def measured_peak_tflops(device: torch.device, threads: int) -> float:
    """TFLOP/s of a large matmul: bf16 8192^3 on a GPU, float32 1024^3 on a CPU with
    ``threads`` torch threads; the best of 6 rounds of 3."""
    torch.set_num_threads(threads)
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2 * n ** 3 / best / 1e12


# ------------------------------------------------------------------------------ main


def _row(stage: str, reports: list[dict], seen: int, n_test: int, flops: float, peak: float) -> dict:
    """One table row from a trainable's two epochs of reports; ``seen`` = training images per
    epoch, ``n_test`` = test images evaluated per epoch."""
    first, last = reports[0], reports[-1]
    rate = last["train_images_per_sec"]
    test_s = max(0.0, last["epoch_seconds"] - seen / rate)
    return {"stage": stage, "images_per_s": rate, "epoch_s": last["epoch_seconds"],
            "first_epoch_overhead_s": first["epoch_seconds"] - last["epoch_seconds"],
            "warmup_s": first["warmup_seconds"], "gflop_per_image": flops / 1e9,
            "tflop_per_s": rate * flops / 1e12, "mfu_pct": 100 * rate * flops / 1e12 / peak,
            "test_s_per_image": test_s / max(1, n_test)}


def _recipe_rows(rows: list[dict], n_test: int, flops: float, peak: float) -> list[dict]:
    out = []
    for name, epoch in (("recipe pre-QAT", rows[1]), ("recipe QAT", rows[2])):
        rate = epoch["images"] / epoch["train_s"]
        out.append({"stage": name, "images_per_s": rate, "epoch_s": epoch["train_s"] + epoch["test_s"],
                    "first_epoch_overhead_s": rows[0]["train_s"] + rows[0]["test_s"]
                    - rows[1]["train_s"] - rows[1]["test_s"] if name == "recipe pre-QAT" else math.nan,
                    "warmup_s": math.nan, "gflop_per_image": flops / 1e9, "tflop_per_s": rate * flops / 1e12,
                    "mfu_pct": 100 * rate * flops / 1e12 / peak,
                    "test_s_per_image": epoch["test_s"] / max(1, n_test)})
    return out


def project(config, table: pd.DataFrame) -> pd.DataFrame:
    """Projected seconds per stage of the preset's study at its epoch bounds, from ``table``."""
    from bench.engines import ENGINES

    rows = {r["stage"]: r for r in table.to_dict("records")}
    n_train, n_test = config.train_subset or 50_000, config.test_subset or 10_000

    def epoch(stage):
        r = rows.get(stage)
        return math.nan if r is None else n_train / r["images_per_s"] + n_test * r["test_s_per_image"]

    def overhead(stage):
        value = rows.get(stage, {}).get("first_epoch_overhead_s", 0.0)
        return 0.0 if value is None or math.isnan(value) else max(0.0, value)

    concurrent = [s for s in rows if s.startswith("students x") and "(" in s]
    out = [{"stage": "teacher", "epochs": config.teacher_max_epochs,
            "seconds": config.teacher_max_epochs * epoch("teacher") + overhead("teacher")},
           {"stage": "students (concurrent)", "epochs": config.max_epochs,
            "seconds": config.max_epochs * max((epoch(s) for s in concurrent), default=math.nan)
            + max((overhead(s) for s in concurrent), default=0.0)}]
    try:
        from trainables.compress.core import load_recipe, recipe_phases

        phases = recipe_phases(load_recipe(config.recipe, num_epochs=config.recipe_epochs))
        pre = math.ceil(phases["qat_start_epoch"] or phases["max_epochs"])
        qat = phases["max_epochs"] - pre
        evals = 3 * n_test * rows.get("recipe pre-QAT", {}).get("test_s_per_image", math.nan)
        out.append({"stage": f"sparsify ({pre} + {qat} QAT epochs)", "epochs": phases["max_epochs"],
                    "seconds": pre * epoch("recipe pre-QAT") + qat * epoch("recipe QAT")
                    + overhead("recipe pre-QAT") + evals})
    except ImportError:
        out.append({"stage": "sparsify (SparseML not installed)", "epochs": 0, "seconds": math.nan})
    # every model on every engine at every batch size, in each round (bench.benchmark.run_benchmarks)
    jobs = len(ENGINES) * len(model_names(sparsity_targets(config.sparsities, config.recipe, config.channel_ratios))) \
        * len(config.bench_batch_sizes) * config.bench_rounds
    out.append({"stage": f"bench ({jobs} runs, fixed)", "epochs": 0,
                "seconds": jobs * (config.bench_seconds + config.bench_warmup_seconds)})
    frame = pd.DataFrame(out)
    total = frame["seconds"].sum(min_count=len(frame))
    return pd.concat([frame, pd.DataFrame([{"stage": "total", "epochs": 0, "seconds": total}])],
                     ignore_index=True)


def _teacher_payload(measure) -> dict:
    """What the student trials get: ``torch.load`` of a randomly initialised teacher's checkpoint."""
    import tempfile

    from models import build_teacher, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        return torch.load(save_checkpoint(build_teacher(measure.arch, stem=measure.stem, weights=None),
                                          Path(tmp) / "teacher.pt", arch=measure.arch, stem=measure.stem,
                                          num_classes=10, role="teacher"), map_location="cpu")


def _task(fn, resources: dict):
    """``fn`` as a Ray task asking for ``resources`` (``{"cpu": ..., "gpu": ...}``)."""
    import ray

    return ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(fn)


def _space(measure, role: str, resources: dict, **extra) -> dict:
    """``driver.tuning.trial_config`` of ``role`` with ``resources``, two epochs, plus ``extra``."""
    from driver.tuning import trial_config

    return {**trial_config(measure, role, resources), "max_epochs": 2, **extra}


def _concurrent_rows(measure, share: dict, data_ref, teacher_ref, seen: int, n_test: int,
                     flops: dict, peak: float) -> list[dict]:
    """``students x<n>``: every setup at once, each with ``share``; one row per trial, then the
    ``all`` row (summed images/s and TFLOP/s, ``wall_s``: seconds until the last one ends)."""
    import ray

    n = len(measure.setups)
    t0 = time.perf_counter()
    refs = {s: _task(run_trainable, share).remote("student", _space(measure, "student", share, setup=s),
                                                  data_ref, teacher_ref) for s in measure.setups}
    results = {s: ray.get(ref) for s, ref in refs.items()}
    wall = time.perf_counter() - t0
    trials = [_row(f"students x{n} ({s})", results[s], seen, n_test, flops[s], peak)
              for s in measure.setups]
    rate = sum(r["images_per_s"] for r in trials)
    tflops = sum(r["tflop_per_s"] for r in trials)
    return trials + [{"stage": f"students x{n}, all", "images_per_s": rate,
                      "epoch_s": max(r["epoch_s"] for r in trials),
                      "first_epoch_overhead_s": max(r["first_epoch_overhead_s"] for r in trials),
                      "warmup_s": max(r["warmup_s"] for r in trials), "gflop_per_image": math.nan,
                      "tflop_per_s": tflops, "mfu_pct": 100 * tflops / peak,
                      "test_s_per_image": math.nan, "wall_s": wall}]


def _measure_rows(args, stages: list[str], measure, data, teacher: dict, device: torch.device,
                  cores: int) -> tuple[list[dict], float]:
    """Runs the chosen stages in a local Ray instance (shut down at the end); returns (one row
    per measured stage, the peak TFLOP/s: ``--peak-tflops`` or measured)."""
    import ray

    from trainables.train import use_compile

    gpu = device.type == "cuda"
    ray.init(address="local", num_cpus=cores, num_gpus=1 if gpu else 0, include_dashboard=False,
             log_to_driver=False)
    whole = {"cpu": float(cores), "gpu": 1.0 if gpu else 0.0}
    n = len(measure.setups)
    share = {"cpu": cores / n, "gpu": 1.0 / n if gpu else 0.0}
    try:
        peak = args.peak_tflops or ray.get(_task(measured_peak_tflops, whole).remote(device, cores))
        data_ref, teacher_ref = ray.put(data), ray.put(teacher)
        n_train, n_test = len(data.train_labels), len(data.test_labels)
        bs = measure.batch_size
        seen = (n_train // bs * bs if use_compile({"compile": measure.compile}, device) and n_train > bs
                else n_train)
        rows = []
        if "teacher" in stages:
            reports = ray.get(_task(run_trainable, whole).remote(
                "teacher", _space(measure, "teacher", whole), data_ref, None))
            rows.append(_row("teacher", reports, seen, n_test, flops_per_image("teacher", measure), peak))
        flops = {s: flops_per_image("student", measure, s) for s in measure.setups}
        if "students" in stages:
            for setup in measure.setups:
                reports = ray.get(_task(run_trainable, whole).remote(
                    "student", _space(measure, "student", whole, setup=setup), data_ref, teacher_ref))
                rows.append(_row(f"student {setup}", reports, seen, n_test, flops[setup], peak))
        if "concurrent" in stages:
            rows += _concurrent_rows(measure, share, data_ref, teacher_ref, seen, n_test, flops, peak)
        if "recipe" in stages:
            try:
                recipe = ray.get(_task(run_recipe_epochs, whole).remote(
                    measure, _space(measure, "student", whole), data_ref))
                rows += _recipe_rows(recipe, n_test, flops_per_image("student", measure, "ce"), peak)
            except ray.exceptions.RayTaskError as err:
                if not isinstance(err.cause, ImportError):
                    raise
                print(f"recipe: skipped ({str(err.cause).splitlines()[0]})")
    finally:
        ray.shutdown()
    return rows, peak


def _print_results(args, config, measure, table: pd.DataFrame, peak: float, device: torch.device,
                   cores: int, n_train: int, n_test: int) -> None:
    """The device line, the per-stage table and the projection of the preset's study."""
    from trainables.train import use_compile

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {cores} cores"
    print(f"device: {name}; peak {peak:.2f} TFLOP/s ({'given' if args.peak_tflops else 'measured matmul'}); "
          f"preset {args.preset}, arch {measure.arch}, batch {measure.batch_size}, compile "
          f"{use_compile({'compile': measure.compile}, device)}; measured on {n_train} train / "
          f"{n_test} test images, 2 epochs per stage; torch {torch.__version__}")
    print(table.drop(columns=["test_s_per_image"]).to_markdown(index=False, floatfmt=".3g"))
    projection = project(config, table)
    n_train_p, n_test_p = config.train_subset or 50_000, config.test_subset or 10_000
    print(f"\nProjected study, preset {args.preset} ({n_train_p} train / {n_test_p} test images, "
          "every stage at its epoch bound):")
    print(projection.to_markdown(index=False, floatfmt=".1f"))
    print(total_line(projection))


def main(argv: list[str] | None = None) -> int:
    """Measure the chosen stages, print the per-stage table and the projection."""
    from trainables.batches import study_data

    parser = build_parser()
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if not stages or set(stages) - {"teacher", "students", "concurrent", "recipe"}:
        parser.error(f"--stages {args.stages!r}: allowed teacher,students,concurrent,recipe")
    config = study.make_config(args.preset, data_root=args.data_root, compile=args.compile)
    sizes = {k: v for k, v in (("train_subset", args.train_subset), ("test_subset", args.test_subset),
                               ("batch_size", args.batch_size)) if v is not None}
    measure = study.make_config(args.preset, data_root=args.data_root, compile=args.compile,
                                teacher_weights=None, **sizes)
    data = study_data(measure)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = len(os.sched_getaffinity(0))
    teacher = _teacher_payload(measure)
    rows, peak = _measure_rows(args, stages, measure, data, teacher, device, cores)
    _print_results(args, config, measure, pd.DataFrame(rows), peak, device, cores,
                   len(data.train_labels), len(data.test_labels))
    return 0


def total_line(projection: pd.DataFrame) -> str:
    """The projection's last line: the total in minutes, or which stages it lacks because they were
    not measured (``--stages``)."""
    stages = projection.iloc[:-1]
    missing = list(stages.loc[stages["seconds"].isna(), "stage"])
    if missing:
        return f"total: not projected ({', '.join(missing)} not measured; see --stages)"
    return f"total: {projection['seconds'].iloc[-1] / 60:.1f} min"


if __name__ == "__main__":
    sys.exit(main())
