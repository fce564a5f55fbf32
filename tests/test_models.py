"""Tests for models.resnet: shapes, student truncation, stems, offline weights, checkpoints.

Kept small for a 2-core CPU box: batch 1-2, resnet18 where the shape logic is the
same, structural checks on the meta device (no memory, no init cost), and never
any network or torch.hub cache access.
"""

from __future__ import annotations

import copy
import os
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import models
from models import (
    ARCHS,
    FEATURE_LAYERS,
    ROLES,
    STEMS,
    WeightsUnavailableError,
    build_student,
    build_teacher,
    count_parameters,
    forward_features,
    load_checkpoint,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def _shapes(feats):
    return {k: tuple(v.shape) for k, v in feats.items()}


def test_constants():
    assert ARCHS == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    assert STEMS == ("cifar", "upsample")
    assert FEATURE_LAYERS == ("layer1", "layer2", "layer4")
    assert ROLES == ("teacher", "student")
    assert models.CHECKPOINT_FORMAT == "distill-sparsify/1"


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("builder", ["teacher", "student"])
def test_resnet101_cifar_shapes(builder):
    model = (
        build_teacher("resnet101", weights=None) if builder == "teacher" else build_student("resnet101")
    )
    model.eval()
    with torch.no_grad():
        logits, feats = forward_features(model, torch.randn(1, 3, 32, 32))
    assert tuple(logits.shape) == (1, 10)
    assert logits.dtype == torch.float32
    assert _shapes(feats) == {
        "layer1": (1, 256, 32, 32),
        "layer2": (1, 512, 16, 16),
        "layer4": (1, 2048, 4, 4),
    }


@pytest.mark.parametrize("builder", ["teacher", "student"])
def test_resnet18_cifar_shapes(builder):
    model = build_teacher("resnet18", weights=None) if builder == "teacher" else build_student("resnet18")
    model.eval()
    with torch.no_grad():
        logits, feats = forward_features(model, torch.randn(2, 3, 32, 32))
    assert tuple(logits.shape) == (2, 10)
    assert _shapes(feats) == {
        "layer1": (2, 64, 32, 32),
        "layer2": (2, 128, 16, 16),
        "layer4": (2, 512, 4, 4),
    }
    assert list(feats) == list(FEATURE_LAYERS)


def test_cifar_stem_modules():
    model = build_teacher("resnet18", num_classes=7, weights=None)
    assert isinstance(model, torchvision.models.ResNet)
    conv = model.conv1
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels) == (3, 64)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert conv.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    assert (model.fc.in_features, model.fc.out_features) == (512, 7)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- student structure

_BLOCKS = {  # torchvision / He et al. 2016 Table 1
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
}
_LAYER3_OUT = {"resnet18": 256, "resnet34": 256, "resnet50": 1024, "resnet101": 1024, "resnet152": 1024}


@pytest.mark.parametrize("arch", ARCHS)
def test_student_structure(arch):
    with torch.device("meta"):  # structure only: no allocation, no init cost
        teacher = build_teacher(arch, weights=None)
        student = build_student(arch)
    n1, n2, n3, n4 = _BLOCKS[arch]
    counts = lambda m: tuple(len(getattr(m, f"layer{i}")) for i in range(1, 5))  # noqa: E731
    assert counts(teacher) == (n1, n2, n3, n4)
    assert counts(student) == (n1, n2, 1, n4)
    first = student.layer3[0]
    assert first.downsample is not None
    assert first.downsample[0].out_channels == _LAYER3_OUT[arch]
    assert first.downsample[0].stride == (2, 2)
    assert count_parameters(student) < count_parameters(teacher)


def test_parameter_counts_exact():
    with torch.device("meta"):
        assert count_parameters(build_teacher("resnet101", weights=None)) == 42_512_970
        assert count_parameters(build_student("resnet101")) == 17_934_922
        assert count_parameters(build_teacher("resnet18", weights=None)) == 11_173_962
        assert count_parameters(build_student("resnet18")) == 9_993_290
    assert count_parameters(nn.Linear(3, 2)) == 8


# ---------------------------------------------------------------- one activation module per use


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])  # BasicBlock, Bottleneck
def test_blocks_compute_torchvisions_function_and_survive_qat_fusion(arch):
    """The blocks give torchvision's state-dict keys and outputs, and SparseML's conv-bn-relu
    fusion (the QAT start, in training mode) keeps the function: with torchvision's shared
    ``self.relu`` fusion turns it into Identity and drops the ReLU after every residual add."""
    from sparseml.pytorch.sparsification.quantization.helpers import fuse_module_conv_bn_relus

    torch.manual_seed(0)
    student = build_student(arch)
    reference = torchvision.models.get_model(arch, num_classes=10)
    reference.layer3 = reference.layer3[:1]
    reference.conv1, reference.maxpool = student.conv1, nn.Identity()
    assert list(reference.state_dict()) == list(student.state_dict())
    reference.load_state_dict(student.state_dict())
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    fused = fuse_module_conv_bn_relus(copy.deepcopy(student).train())
    assert any(type(m).__name__ == "ConvBnReLU2d" for m in fused.modules())
    for mode in ("train", "eval"):
        outputs = [getattr(m, mode)()(images) for m in (student, reference, fused)]
        torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
        torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- upsample stem


def test_upsample_stem_shapes_and_modules():
    model = build_student("resnet18", stem="upsample").eval()
    conv1 = model.conv1
    assert isinstance(conv1, nn.Sequential) and len(conv1) == 2
    assert isinstance(conv1[0], nn.Upsample)
    assert conv1[0].size == (224, 224) and conv1[0].mode == "bilinear"
    assert isinstance(conv1[1], nn.Conv2d)
    assert conv1[1].kernel_size == (7, 7) and conv1[1].stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        logits, feats = forward_features(model, torch.randn(2, 3, 32, 32))
    assert tuple(logits.shape) == (2, 10)
    assert _shapes(feats) == {
        "layer1": (2, 64, 56, 56),
        "layer2": (2, 128, 28, 28),
        "layer4": (2, 512, 7, 7),
    }


# ---------------------------------------------------------------- imagenet weights


def test_imagenet_offline_raises_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        build_teacher("resnet18", weights="imagenet")
    assert isinstance(info.value, RuntimeError)
    msg = str(info.value)
    assert "\n" not in msg
    assert "could not download" in msg
    assert "weights=None" in msg and "checkpoint" in msg


def test_imagenet_oserror_also_wrapped(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError):
        build_teacher("resnet18", weights="imagenet")


def test_imagenet_uses_available_file(monkeypatch):
    """A hub-cache hit (simulated) is loaded; fc is replaced, the rest kept."""
    source = torchvision.models.resnet18(num_classes=1000)
    calls = []

    def cached(url, *args, **kwargs):
        calls.append(url)
        return source.state_dict()

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", cached)
    model = build_teacher("resnet18", weights="imagenet", stem="upsample")
    assert calls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.equal(model.conv1[1].weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 10
    cifar = build_teacher("resnet18", weights="imagenet", stem="cifar")
    assert cifar.conv1.kernel_size == (3, 3)
    assert torch.equal(cifar.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_imagenet_prefers_v2(monkeypatch):
    urls = []

    def cached(url, *args, **kwargs):
        urls.append(url)
        raise URLError("offline")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", cached)
    with pytest.raises(WeightsUnavailableError):
        build_teacher("resnet101", weights="imagenet")
    assert urls == [torchvision.models.ResNet101_Weights.IMAGENET1K_V2.url]


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: build_teacher("resnet19", weights=None), "resnet18, resnet34"),
        (lambda: build_student("vgg16"), "resnet152"),
        (lambda: build_teacher("resnet18", stem="imagenet", weights=None), "cifar, upsample"),
        (lambda: build_student("resnet18", stem="big"), "cifar, upsample"),
        (lambda: build_student("resnet18", num_classes=0), "num_classes"),
        (lambda: build_teacher("resnet18", weights=3), "weights"),
    ],
)
def test_bad_arguments_one_line(call, needle):
    with pytest.raises(ValueError) as info:
        call()
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_forward_features_rejects_bad_images():
    model = build_student("resnet18")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        forward_features(model, torch.randn(3, 32, 32))


# ---------------------------------------------------------------- hooks


def test_hooks_removed():
    model = build_student("resnet18").eval()
    with torch.no_grad():
        forward_features(model, torch.randn(1, 3, 32, 32))
    for name in FEATURE_LAYERS:
        assert len(getattr(model, name)._forward_hooks) == 0


def test_hooks_removed_when_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = build_student("resnet18").eval()
    model.fc = Boom()
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        forward_features(model, torch.randn(1, 3, 32, 32))
    assert len(model.layer1._forward_hooks) == 0
    assert len(model.layer2._forward_hooks) == 0
    assert len(model.layer4._forward_hooks) == 0


def test_features_carry_gradients():
    model = build_student("resnet18")
    logits, feats = forward_features(model, torch.randn(2, 3, 32, 32))
    (logits.sum() + feats["layer1"].mean()).backward()
    assert model.conv1.weight.grad is not None


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "role, stem",
    [("student", "cifar"), ("teacher", "cifar"), ("student", "upsample")],
)
def test_checkpoint_roundtrip(tmp_path, role, stem):
    if role == "teacher":
        model = build_teacher("resnet18", num_classes=5, stem=stem, weights=None)
    else:
        model = build_student("resnet18", num_classes=5, stem=stem)
    model.eval()
    path = tmp_path / "sub" / "dir" / "model.pt"
    out = save_checkpoint(
        model, path, arch="resnet18", stem=stem, num_classes=5, role=role,
        extra={"epoch": 3, "acc": np.float64(0.5), "hist": np.array([1, 2])},
    )
    assert out == str(path)
    assert os.listdir(path.parent) == ["model.pt"]  # no temp file left behind
    loaded, meta = load_checkpoint(path)
    assert meta == {
        "format": "distill-sparsify/1",
        "arch": "resnet18",
        "stem": stem,
        "num_classes": 5,
        "role": role,
        "extra": {"epoch": 3, "acc": 0.5, "hist": [1, 2]},
    }
    assert type(meta["extra"]["acc"]) is float
    loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert len(loaded.layer3) == (1 if role == "student" else 2)


def test_teacher_from_checkpoint(tmp_path):
    model = build_teacher("resnet18", weights=None).eval()
    path = save_checkpoint(model, tmp_path / "t.pt", arch="resnet18", stem="cifar", num_classes=10, role="teacher")
    again = build_teacher("resnet18", weights=path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_checkpoint_of_other_arch_rejected(tmp_path):
    path = save_checkpoint(
        build_teacher("resnet18", weights=None), tmp_path / "t.pt",
        arch="resnet18", stem="cifar", num_classes=10, role="teacher",
    )
    with pytest.raises(ValueError) as info:
        build_teacher("resnet34", weights=path)
    msg = str(info.value)
    assert "resnet18" in msg and "resnet34" in msg and str(path) in msg
    assert "\n" not in msg


def test_checkpoint_mismatch_stem_classes_role(tmp_path):
    path = save_checkpoint(
        build_student("resnet18"), tmp_path / "s.pt",
        arch="resnet18", stem="cifar", num_classes=10, role="student",
    )
    with pytest.raises(ValueError, match=r"role='student' \(wanted 'teacher'\)"):
        build_teacher("resnet18", weights=path)
    with pytest.raises(ValueError, match=r"stem='cifar' \(wanted 'upsample'\)"):
        build_teacher("resnet18", stem="upsample", weights=path)
    with pytest.raises(ValueError, match=r"num_classes=10 \(wanted 100\)"):
        build_teacher("resnet18", num_classes=100, weights=path)


def test_corrupt_missing_and_foreign_files(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file at all")
    for call in (lambda p: load_checkpoint(p), lambda p: build_teacher("resnet18", weights=p)):
        with pytest.raises(ValueError, match="corrupt") as info:
            call(corrupt)
        assert str(corrupt) in str(info.value) and "\n" not in str(info.value)

    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(missing)
    with pytest.raises(ValueError, match="does not exist"):
        build_teacher("resnet18", weights=missing)

    foreign = tmp_path / "foreign.pt"
    torch.save(build_student("resnet18").state_dict(), foreign)
    with pytest.raises(ValueError, match="distill-sparsify/1"):
        load_checkpoint(foreign)

    truncated = tmp_path / "truncated.pt"
    save_checkpoint(build_student("resnet18"), truncated, arch="resnet18", stem="cifar", num_classes=10, role="student")
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(truncated)


def test_save_checkpoint_validates(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="role"):
        save_checkpoint(model, tmp_path / "x.pt", arch="resnet18", stem="cifar", num_classes=10, role="pupil")
    with pytest.raises(ValueError, match="extra"):
        save_checkpoint(model, tmp_path / "x.pt", arch="resnet18", stem="cifar", num_classes=10,
                        role="student", extra={"bad": object()})
    assert not list(tmp_path.iterdir())
