"""bench/perf/study_time.py: its FLOP counts, its projection arithmetic, and one short run on the
CPU (teacher and recipe stages, a few real images)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import study
from bench.perf import study_time


def _row(stage, rate, test_s_per_image, overhead=0.0):
    return {"stage": stage, "images_per_s": rate, "test_s_per_image": test_s_per_image,
            "first_epoch_overhead_s": overhead}


def test_projection_is_epochs_times_projected_epochs_plus_warmup():
    config = study.make_config("smoke")  # 300 / 200 images; bounds 2 teacher, 4 students, recipe 2
    table = pd.DataFrame([
        _row("teacher", 100.0, 0.01, overhead=5.0),             # epoch: 300/100 + 200*0.01 = 5 s
        _row("students x3 (ce)", 50.0, 0.02, overhead=1.0),     # 6 + 4 = 10 s
        _row("students x3 (kd)", 30.0, 0.02, overhead=2.0),     # 10 + 4 = 14 s (the slowest)
        _row("students x3, all", 80.0, math.nan),
        _row("recipe pre-QAT", 60.0, 0.01, overhead=3.0),       # 5 + 2 = 7 s
        _row("recipe QAT", 30.0, 0.01),                         # 10 + 2 = 12 s
    ])
    got = study_time.project(config, table).set_index("stage")["seconds"]
    assert got["teacher"] == pytest.approx(2 * 5 + 5)
    assert got["students (concurrent)"] == pytest.approx(4 * 14 + 2)
    # recipe_epochs 2: epoch 0 before QAT, epoch 1 QAT (recipes/prune_quantize.yaml); + 3 evaluations
    assert got["sparsify (1 + 1 QAT epochs)"] == pytest.approx(7 + 12 + 3 + 3 * 200 * 0.01)
    # 3 engines x 5 models (dense, dense_int8, pruned, pruned_quantized, pruned_quantized_qdq) x 2 batch
    # sizes x 2 rounds, each (0.5 + 0.2) s: the smoke preset's bench seconds and warm-up
    assert got["bench (60 runs, fixed)"] == pytest.approx(60 * 0.7)
    assert got["total"] == pytest.approx(15 + 58 + 28 + 60 * 0.7)
    assert study_time.total_line(got.reset_index()) == f"total: {(15 + 58 + 28 + 60 * 0.7) / 60:.1f} min"


def test_flops_of_a_distillation_step_add_the_teacher_forward():
    """FlopCounterMode: kd = ce (student forward + backward) + the teacher's forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_teacher

    config = study.make_config("smoke")
    ce = study_time.flops_per_image("student", config, "ce")
    kd = study_time.flops_per_image("student", config, "kd")
    teacher_step = study_time.flops_per_image("teacher", config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        build_teacher("resnet18", weights=None).eval()(torch.randn(2, 3, 32, 32))
    teacher_forward = counter.get_total_flops() / 2
    assert kd == pytest.approx(ce + teacher_forward)
    assert study_time.flops_per_image("student", config, "kd_feat") == pytest.approx(kd)
    # a training step costs about 3 forwards (backward: grads w.r.t. inputs and weights); the
    # first conv needs no input gradient, so a little less
    assert 2.8 * teacher_forward < teacher_step < 3 * teacher_forward
    assert teacher_forward == pytest.approx(1.11e9, rel=0.01)  # resnet18, CIFAR stem, 32x32


def test_study_time_runs_on_the_cpu(cifar_root, capsys):
    assert study_time.main(["--preset", "smoke", "--data-root", str(cifar_root), "--train-subset", "20",
                            "--test-subset", "10", "--stages", "teacher,recipe"]) == 0
    out = capsys.readouterr().out
    measured, projected = out.split("Projected study")

    def rows(text):
        return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                  for line in text.splitlines() if line.startswith("| "))}

    stages = rows(measured)
    assert {"teacher", "recipe pre-QAT", "recipe QAT"} <= set(stages)
    assert float(stages["teacher"][0]) > 0 and float(stages["recipe QAT"][0]) > 0  # images/s
    assert "device: CPU" in out and "compile False" in out and "measured on 20 train / 10 test" in out
    assert {"teacher", "students (concurrent)", "total"} <= set(rows(projected))
    assert out.strip().splitlines()[-1] == \
        "total: not projected (students (concurrent) not measured; see --stages)"
