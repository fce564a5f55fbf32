"""The GPU path's switches are off cleanly on a CPU, threads follow the config, and the
throughput benchmark runs end to end (tiny sizes, CPU, a few seconds)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from models import build_teacher
from trainables import student, train
from trainables.data import CIFAR10Tensors
from trainables.train import autocast, pick_device, setup_torch

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _keep_threads():
    """setup_torch changes process-wide torch state: put the thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ device choice


def test_pick_device_is_cpu_without_a_gpu(monkeypatch):
    import ray

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    was_initialized = ray.is_initialized()
    assert pick_device() == CPU
    assert ray.is_initialized() == was_initialized  # no Ray instance started just to ask


def test_pick_device_outside_ray_with_a_gpu_is_cuda(monkeypatch):
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is open in this process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------ autocast


def test_autocast_is_a_no_op_on_cpu():
    ctx = autocast(CPU)
    assert isinstance(ctx, contextlib.nullcontext)
    conv = torch.nn.Conv2d(3, 4, 3)
    linear = torch.nn.Linear(4, 2)
    with autocast(CPU):
        assert not torch.is_autocast_enabled() and not torch.is_autocast_cpu_enabled()
        out = linear(conv(torch.randn(2, 3, 8, 8)).mean(dim=(2, 3)))
    assert out.dtype == torch.float32


def test_autocast_cuda_is_bf16_only_where_supported(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert isinstance(autocast(cuda), contextlib.nullcontext)  # fp32 (+TF32) on older GPUs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    with warnings.catch_warnings():  # "CUDA is not available" on a CPU-only machine
        warnings.simplefilter("ignore")
        ctx = autocast(cuda)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


# ------------------------------------------------------------------------------ threads


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_setup_torch_sets_the_thread_count(threads):
    benchmark = torch.backends.cudnn.benchmark
    setup_torch({"seed": 0, "threads": threads}, CPU)
    assert torch.get_num_threads() == threads
    assert torch.backends.cudnn.benchmark == benchmark  # the cuDNN switch is for cuda only


def test_setup_torch_threads_default_and_floor():
    setup_torch({"seed": 0}, CPU)
    assert torch.get_num_threads() == 1
    setup_torch({"seed": 0, "threads": 0}, CPU)
    assert torch.get_num_threads() == 1


# ------------------------------------------------------------------------------ the real loop


def _tiny_data(n_train=16, n_test=8) -> CIFAR10Tensors:
    g = torch.Generator().manual_seed(0)
    return CIFAR10Tensors(
        torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.arange(n_train) % 10,
        torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.arange(n_test) % 10)


def test_student_epoch_on_cpu_is_fp32_and_contiguous(monkeypatch):
    """One kd_feat epoch of train_student, called directly (no Tune session): the batches and
    the models keep the default memory format, the logits stay float32, one report."""
    teacher = build_teacher("resnet18", num_classes=10, stem="cifar", weights=None)
    payload = {"arch": "resnet18", "stem": "cifar", "num_classes": 10,
               "state_dict": teacher.state_dict()}
    seen, reports = [], []
    real_feature_extractor = student.feature_extractor

    def spy(model):
        extractor = real_feature_extractor(model)

        def forward(x):
            logits, feats = extractor(x)
            seen.append({"x_dtype": x.dtype, "x_cl": x.is_contiguous(memory_format=torch.channels_last),
                         "w_cl": model.conv1.weight.is_contiguous(memory_format=torch.channels_last),
                         "logits": logits.dtype, "autocast": torch.is_autocast_cpu_enabled()})
            return logits, feats

        return forward

    def report(metrics, checkpoint=None):
        reports.append(metrics)

    monkeypatch.setattr(student, "feature_extractor", spy)
    monkeypatch.setattr(train.tune, "report", report)
    monkeypatch.setattr(train.tune, "get_checkpoint", lambda: None)
    config = {"arch": "resnet18", "stem": "cifar", "num_classes": 10, "batch_size": 8,
              "lr": 1e-3, "seed": 0, "threads": 1, "setup": "kd_feat", "temperature": 4.0,
              "max_epochs": 1}
    student.train_student(config, data=_tiny_data(), teacher=payload)

    assert torch.get_num_threads() == 1
    assert len(seen) == 4  # 2 batches x (teacher, student)
    for call in seen:
        assert call == {"x_dtype": torch.float32, "x_cl": False, "w_cl": False,
                        "logits": torch.float32, "autocast": False}
    assert len(reports) == 1
    metrics = reports[0]
    assert metrics["epoch"] == 1 and 0.0 <= metrics["test_acc"] <= 1.0
    assert {"loss_ce", "loss_soft_ce", "loss_mse_layer1", "loss_mse_layer2",
            "loss_mse_layer4"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())


def test_epoch_checkpoints_leave_nothing_in_the_temp_folder(monkeypatch, tmp_path):
    """Each epoch's checkpoint exists while ``tune.report`` runs and is gone after it, also when
    the report ends the trial (Ray raises SystemExit from ``report`` when Tune stops a trial).
    Before, every epoch left a ``ckpt-*`` folder (115 MB or more for a ResNet-101 student) in /tmp."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    held = []

    def report(metrics, checkpoint=None):
        files = sorted(p.name for p in Path(checkpoint.path).iterdir())
        held.append((metrics["epoch"], checkpoint.path, files))
        if metrics["epoch"] == 2:
            raise SystemExit(0)  # what ray.train's session does when the stopper ends the trial

    monkeypatch.setattr(train.tune, "report", report)
    monkeypatch.setattr(train.tune, "get_checkpoint", lambda: None)
    config = {"arch": "resnet18", "stem": "cifar", "num_classes": 10, "batch_size": 8,
              "lr": 1e-3, "seed": 0, "threads": 1, "max_epochs": 3, "teacher_weights": None}
    with pytest.raises(SystemExit):
        train.train_teacher(config, data=_tiny_data())

    scratch = tmp_path / train.CHECKPOINT_SCRATCH
    assert [epoch for epoch, _, _ in held] == [1, 2]
    for _, path, files in held:
        assert path.startswith(str(scratch / f"{os.getpid()}-"))
        assert files == sorted([train.MODEL_FILE, train.STATE_FILE])
    assert list(scratch.iterdir()) == []


def test_a_checkpoint_folder_left_by_a_dead_process_goes_at_the_next_epoch(monkeypatch, tmp_path):
    """Ray may end a trial's process inside ``tune.report`` (or a SIGKILL does), leaving that
    epoch's folder; the next checkpoint on the machine removes it, and keeps a live process's."""
    import subprocess
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scratch = tmp_path / train.CHECKPOINT_SCRATCH
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = scratch / f"{dead.pid}-abc"
    live = scratch / f"{os.getppid()}-def"
    for folder in (left, live):
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"x" * 10)
    monkeypatch.setattr(train.tune, "report", lambda metrics, checkpoint=None: None)
    monkeypatch.setattr(train.tune, "get_checkpoint", lambda: None)
    config = {"arch": "resnet18", "stem": "cifar", "num_classes": 10, "batch_size": 8,
              "lr": 1e-3, "seed": 0, "threads": 1, "max_epochs": 1, "teacher_weights": None}
    train.train_teacher(config, data=_tiny_data())
    assert sorted(p.name for p in scratch.iterdir()) == [live.name]


def test_evaluate_counts_on_cpu():
    class Fixed(torch.nn.Module):  # predicts class 3 for every image
        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[:, 3] = 1.0
            return out

    images = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([3, 3, 3, 0, 1, 2, 4, 5, 6, 7])
    assert train.evaluate(Fixed(), images, labels, 4, CPU) == pytest.approx(0.3)


# ------------------------------------------------------------------------------ the benchmark


def test_train_throughput_runs_end_to_end(capsys):
    from bench.perf.train_throughput import main

    assert main(["--arch", "resnet18", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                 "--data-steps", "2", "--threads", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "batch 4, device cpu" in out and "threads 1" in out and "contiguous" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    stages = [[cell.strip() for cell in row.strip("|").split("|")][:2] for row in rows]
    for expected in (["data pipeline", ""], ["DataLoader baseline", "workers=0"],
                     ["teacher forward", ""], ["student step", "ce"], ["student step", "kd"],
                     ["student step", "kd_feat"]):
        assert expected in stages, out
    for ratio in ("data pipeline / student step ce", "data pipeline / student step kd_feat",
                  "data pipeline / DataLoader baseline"):
        assert ratio in out


def test_train_throughput_reads_real_images(cifar_root):
    from bench.perf.train_throughput import load_images, parse_args

    args = parse_args(["--batch-size", "8", "--warmup", "1", "--data-steps", "2",
                       "--data-root", str(cifar_root)])
    images, labels, source = load_images(args)
    assert images.dtype == torch.uint8 and images.shape == (24, 3, 32, 32)
    assert labels.shape == (24,) and "CIFAR-10" in source


def test_train_throughput_rejects_bad_input(capsys):
    from bench.perf.train_throughput import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--setups", "ce,nope"])
    assert info.value.code == 2 and "nope" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse_args(["--device", "cuda"])


def test_the_perf_scripts_import_nothing_from_the_tests():
    """bench/perf is product code (layer ``bench``): no module of tests/ imported, no
    ``sys.path`` entry into tests/ (what it needs from there lives in the product)."""
    import ast

    repo = Path(__file__).resolve().parent.parent
    test_modules = {path.stem for path in (repo / "tests").glob("*.py")} | {"tests"}
    for script in sorted((repo / "bench" / "perf").glob("*.py")):
        source = script.read_text()
        tree = ast.parse(source)
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert not imported & test_modules, f"{script.name} imports {sorted(imported & test_modules)}"
        path_edits = [ast.get_source_segment(source, node) for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and ast.get_source_segment(source, node.func.value) == "sys.path"]
        assert not [edit for edit in path_edits if "tests" in edit], f"{script.name}: {path_edits}"
