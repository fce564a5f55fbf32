"""The GPU-speed paths, checked on the CPU: batches made without host round trips, loss terms
read once per epoch, feature taps built once (and traceable by torch.compile), the --compile
wiring with checkpoints the uncompiled model loads, and the training stages without SparseML,
DeepSparse or ONNX. The CUDA-only parts (bf16, channels_last, cuDNN, real inductor kernels on a
GPU, sync-debug mode) are exercised by ``bench/perf/study_time.py`` on a GPU; the one test here
that needs CUDA skips without it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models import build_student, build_teacher, feature_extractor, forward_features, load_checkpoint
from trainables import student, train
from trainables.batches import _epoch_seed, augment, normalize, train_batches
from trainables.data import CIFAR10Tensors

from helpers import BLOCKED, blocked_env

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _keep_threads():
    """The trainables call setup_torch, which changes process-wide torch state."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _data(n_train: int, n_test: int = 8) -> CIFAR10Tensors:
    g = torch.Generator().manual_seed(1)
    return CIFAR10Tensors(
        torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.arange(n_train) % 10,
        torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.arange(n_test) % 10)


def _teacher_payload() -> dict:
    torch.manual_seed(0)
    teacher = build_teacher("resnet18", num_classes=10, stem="cifar", weights=None)
    return {"arch": "resnet18", "stem": "cifar", "num_classes": 10, "state_dict": teacher.state_dict()}


def _config(setup: str, **extra) -> dict:
    return {"arch": "resnet18", "stem": "cifar", "num_classes": 10, "batch_size": 8, "lr": 1e-3,
            "seed": 0, "threads": 1, "setup": setup, "temperature": 4.0, "max_epochs": 1, **extra}


def _run_student(monkeypatch, config: dict, data: CIFAR10Tensors, keep: Path | None = None) -> list[dict]:
    """train_student called directly; returns the reported metrics. With ``keep``, each epoch's
    checkpoint is copied to ``keep / epoch_N`` (as Tune persists it: the trainable deletes its
    own copy once ``report`` returns)."""
    reports = []

    def report(metrics, checkpoint=None):
        reports.append(dict(metrics))
        if keep is not None:
            checkpoint.to_directory(str(keep / f"epoch_{metrics['epoch']}"))

    monkeypatch.setattr(train.tune, "report", report)
    monkeypatch.setattr(train.tune, "get_checkpoint", lambda: None)
    student.train_student(config, data=data, teacher=_teacher_payload())
    return reports


# ------------------------------------------------------------------------------ batches


def _batch_by_batch(images, labels, batch_size, seed, epoch, drop_last):
    """The earlier train_batches: permutation, then each batch's augment() drawn as it is made."""
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    n = len(labels)
    order = torch.randperm(n, generator=g)
    count = n // batch_size if drop_last else -(-n // batch_size)
    for b in range(count):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield normalize(augment(images[idx], g)), labels[idx]


@pytest.mark.parametrize("drop_last", [False, True])
def test_train_batches_equal_the_batch_by_batch_draws(drop_last):
    data = _data(37)
    got = list(train_batches(data.train_images, data.train_labels, 8, seed=3, epoch=2,
                             drop_last=drop_last))
    want = list(_batch_by_batch(data.train_images, data.train_labels, 8, 3, 2, drop_last))
    assert [len(y) for _, y in got] == ([8] * 4 if drop_last else [8, 8, 8, 8, 5])
    assert len(got) == len(want)
    for (x, y), (x_ref, y_ref) in zip(got, want):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


# ------------------------------------------------------------------------------ feature taps


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_feature_extractor_equals_hooks_and_shares_the_weights(role):
    torch.manual_seed(0)
    model = build_student("resnet18") if role == "student" else \
        build_teacher("resnet18", weights=None).eval()
    training = model.training
    extractor = feature_extractor(model)
    assert model.training == training and extractor.training == training
    x = torch.randn(4, 3, 32, 32)
    logits, feats = extractor(x)
    ref_logits, ref_feats = forward_features(model, x)
    assert torch.equal(logits, ref_logits) and logits.shape == (4, 10)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "layer1": (4, 64, 32, 32), "layer2": (4, 128, 16, 16), "layer4": (4, 512, 4, 4)}
    assert all(torch.equal(feats[k], ref_feats[k]) for k in ref_feats)
    assert [p.data_ptr() for p in extractor.parameters()] == [p.data_ptr() for p in model.parameters()]
    assert not model._forward_hooks and not model.layer1._forward_hooks  # no hooks left behind
    model.train(not training)  # the extractor runs the model's own modules, so its mode follows
    assert extractor.graph.get_submodule("layer1.0.bn1").training == (not training)


def test_feature_extractor_rejects_a_model_without_the_layers():
    with pytest.raises(ValueError, match="has no submodule 'layer1'"):
        feature_extractor(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


def test_feature_taps_trace_into_one_graph():
    """What torch.compile needs from kd_feat: dynamo captures the whole extractor, no breaks."""
    import torch._dynamo

    torch._dynamo.reset()
    extractor = feature_extractor(build_student("resnet18"))
    explanation = torch._dynamo.explain(extractor)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ------------------------------------------------------------------------------ epoch timing


def _clock(*ticks):
    readings = iter(ticks)
    return train._EpochClock(torch.device("cpu"), now=lambda: next(readings))


def test_warmup_is_the_first_steps_excess_over_the_other_steps_in_the_first_epoch_only():
    clock = _clock(0.0, 5.0, 8.0, 9.0,  20.0, 23.0, 24.0)
    clock.start()
    clock.first_step_done()
    assert clock.steps_done(4) == 8.0 and clock.elapsed() == 9.0
    assert clock.warmup_seconds == 5.0 - (8.0 - 5.0) / 3  # first step 5 s, the other three 1 s each
    clock.start()
    clock.first_step_done()  # a later epoch: no sync, no reading
    assert clock.steps_done(4) == 3.0 and clock.elapsed() == 4.0 and clock.warmup_seconds == 0.0


def test_warmup_is_zero_for_a_one_step_epoch_and_never_negative():
    clock = _clock(0.0, 2.0, 2.0,  10.0, 11.0)
    clock.start()
    clock.first_step_done()
    assert clock.steps_done(1) == 2.0 and clock.warmup_seconds == 0.0
    clock.start()  # the first step was timed: not a warm-up epoch again
    clock.first_step_done()
    assert clock.steps_done(3) == 1.0 and clock.warmup_seconds == 0.0
    fast_first = _clock(0.0, 1.0, 10.0)
    fast_first.start()
    fast_first.first_step_done()
    assert fast_first.steps_done(4) == 10.0 and fast_first.warmup_seconds == 0.0  # 1 - 3 < 0


# ------------------------------------------------------------------------------ no read-backs


def test_loss_terms_are_read_once_per_epoch_not_per_step(monkeypatch):
    """Reads of tensor values (item, float, tolist) made by the project's own code during a
    kd_feat epoch: as many for 2 steps as for 6 (the epoch's totals and the test accuracy)."""
    reads = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.split(".")[0] in ("trainables", "models"):
                reads.append(f"{caller}.{name}")
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    counts = []
    for n_train in (16, 48):  # 2 and 6 steps of 8
        reads.clear()
        (metrics,) = _run_student(monkeypatch, _config("kd_feat"), _data(n_train))
        counts.append(sorted(reads))
        assert {"loss_ce", "loss_soft_ce", "loss_mse_layer1", "loss_mse_layer2", "loss_mse_layer4",
                "train_loss"} <= set(metrics)
        assert metrics["warmup_seconds"] >= 0.0
    assert counts[0] == counts[1] == ["trainables.train.item", "trainables.train.tolist"]


def test_train_loss_is_the_image_weighted_mean_of_the_steps(monkeypatch):
    """The on-device float64 sums give what python floats gave: sum(loss_b * n_b) / N."""
    real = student.distillation_loss
    steps = []

    def spy(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        steps.append((float(loss), len(args[2])))
        return loss, terms

    monkeypatch.setattr(student, "distillation_loss", spy)
    (metrics,) = _run_student(monkeypatch, _config("ce"), _data(20))
    assert [n for _, n in steps] == [8, 8, 4]
    assert metrics["train_loss"] == sum(v * n for v, n in steps) / 20  # exact, as before
    assert metrics["loss_ce"] == metrics["train_loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_in_steady_steps_on_cuda(monkeypatch):  # pragma: no cover - GPU only
    """On a GPU, steps after the first raise if anything in them synchronises with the device."""
    real = student.distillation_loss
    calls = []

    def strict(*args, **kwargs):
        calls.append(1)
        torch.cuda.set_sync_debug_mode("error" if len(calls) > 1 else "default")
        return real(*args, **kwargs)

    monkeypatch.setattr(student, "distillation_loss", strict)
    real_evaluate = train.evaluate

    def evaluate(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate)
    try:
        _run_student(monkeypatch, _config("kd_feat", compile=False), _data(64))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 8


# ------------------------------------------------------------------------------ --compile


def test_compile_defaults_to_the_gpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not train.use_compile({}, cpu) and train.use_compile({"compile": None}, cuda)
    assert train.use_compile({"compile": True}, cpu) and not train.use_compile({"compile": False}, cuda)
    assert train.compile_backend({"compile": True}, cpu) == "inductor"
    assert train.compile_backend({"compile": True, "compile_backend": "eager"}, cpu) == "eager"
    assert train.compile_backend({}, cpu) is None


def test_compiled_kd_feat_trains_and_saves_a_plain_checkpoint(monkeypatch, tmp_path):
    """--compile wiring on the CPU with the cheap ``eager`` backend (dynamo captures the graphs,
    the ops run as usual): both models go through torch.compile, the short last batch is
    dropped, and the checkpoint has the uncompiled model's keys."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = []
    real_compile = torch.compile

    def spy(module, **kwargs):
        compiled.append((type(module).__name__, kwargs.get("backend")))
        return real_compile(module, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    (metrics,) = _run_student(monkeypatch, _config("kd_feat", compile=True, compile_backend="eager"),
                              _data(20), keep=tmp_path)
    assert compiled == [("_FeatureTaps", "eager"), ("_FeatureTaps", "eager")]
    assert metrics["train_images_per_sec"] > 0 and metrics["epoch"] == 1
    model, meta = load_checkpoint(tmp_path / "epoch_1" / train.MODEL_FILE)
    assert meta["role"] == "student" and not any("_orig_mod" in k for k in model.state_dict())


def test_compiled_steps_see_one_batch_shape(monkeypatch):
    shapes = []
    real = student.distillation_loss

    def spy(*args, **kwargs):
        shapes.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(student, "distillation_loss", spy)
    monkeypatch.setattr(student, "maybe_compile", lambda module, backend: module)  # wiring only
    _run_student(monkeypatch, _config("ce", compile=True), _data(20))
    assert shapes == [8, 8]  # 20 images: the short batch of 4 is dropped when compiling
    shapes.clear()
    _run_student(monkeypatch, _config("ce", compile=False), _data(20))
    assert shapes == [8, 8, 4]


# ------------------------------------------------------------------------------ without SparseML


def test_training_modules_import_without_the_sparsify_stack(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import orchestrate, study, models, report
        import trainables.batches, trainables.data, trainables.losses, driver.results
        import trainables.stopper, trainables.train, driver.tuning
        import importlib.util
        orchestrate.check_packages(orchestrate.required_packages("students"))
        assert importlib.util.find_spec("sparseml") is None, "the blocker did not block"
        try:
            orchestrate.check_packages(orchestrate.required_packages("bench"))
        except orchestrate.StudyError as err:
            hidden = [n for n in orchestrate.required_packages("bench") if n in {BLOCKED!r}]
            assert ", ".join(hidden) + " not installed" in str(err), err
            assert hidden[:2] == (["sparseml", "deepsparse"] if sys.version_info < (3, 12) else ["sparseml", "sparsezoo"])
        else:
            raise SystemExit("check_packages did not notice the missing packages")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        print("loaded:", loaded)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **blocked_env(tmp_path / "blocker")), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "loaded: []"
