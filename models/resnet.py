"""ResNet teacher and student builders, their blocks, and checkpoint loading (feature maps: ``models.features``).

Teacher and student are plain torchvision ResNets (He et al., "Deep Residual
Learning for Image Recognition", CVPR 2016; ``torchvision.models.resnet``,
torchvision 0.16.2). The student is the same architecture with ``layer3`` cut
to its first block -- the block whose 1x1 stride-2 ``downsample`` projection
gives ``layer4`` the channel count it expects -- so every stage output keeps
the teacher's shape and feature maps can be matched one to one.

Two input stems for 32x32 CIFAR-10 images:

* ``"cifar"``: ``conv1`` becomes a 3x3 stride-1 padding-1 convolution (64
  channels, no bias) and ``maxpool`` becomes ``nn.Identity()``, so a 32x32 image
  is not shrunk to 8x8 before ``layer1``. This is the usual CIFAR ResNet
  practice (He et al. 2016, Sec. 4.2 use a 3x3 first convolution for CIFAR-10;
  e.g. kuangliu/pytorch-cifar applies it to the ImageNet-style ResNets). The
  new ``conv1`` is randomly initialised (Kaiming normal, fan_out, as
  torchvision does); every other pretrained weight is kept.
* ``"upsample"``: images are resized to 224x224 (bilinear) inside the model
  and the original 7x7 stride-2 ``conv1`` and max-pool are kept, so *every*
  pretrained weight is used. ``conv1`` becomes
  ``nn.Sequential(nn.Upsample(size=(224, 224)), original_conv1)``; state-dict
  keys of that conv are therefore ``conv1.1.weight``.

Teacher and student of one run must share a stem so feature maps line up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from models.checkpoint import _load_state_strict, _read_checkpoint
from models.checks import check_arch, check_num_classes, check_stem, first_line
from study import ARCHS, FEATURE_LAYERS, STEMS

__all__ = [
    "ARCHS",
    "STEMS",
    "FEATURE_LAYERS",
    "WeightsUnavailableError",
    "BasicBlock",
    "Bottleneck",
    "build_teacher",
    "build_student",
    "count_parameters",
    "load_checkpoint",
]


_UPSAMPLE_SIZE = (224, 224)


class WeightsUnavailableError(RuntimeError):
    """The torchvision ImageNet weights could not be downloaded or read.

    Raised by :func:`build_teacher` with ``weights="imagenet"`` when
    ``torch.hub`` cannot fetch the file (no network) and it is not already in
    the hub cache. The message is one line and says what to pass instead;
    ``detail`` is the same line without that advice (for callers that word it
    in their own terms, e.g. the command line's ``--teacher-weights``).
    """

    _ADVICE = "pass weights=<path to a local checkpoint of this project> or weights=None instead"

    def __init__(self, detail: str):
        super().__init__(f"{detail}; {self._ADVICE}")
        self.detail = detail


# --------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------


def _reorder_modules(block: nn.Module, order: tuple[str, ...]) -> None:
    """Re-register ``block``'s child modules in ``order`` (names absent from the block skipped).

    SparseML's ``fuse_module_conv_bn_relus`` fuses Conv2d -> BatchNorm2d (-> ReLU) runs that are
    consecutive in ``named_modules()`` order, which is registration order."""
    children = dict(block._modules)
    block._modules.clear()
    for name in order:
        if children.get(name) is not None:
            block._modules[name] = children[name]


class BasicBlock(torchvision.models.resnet.BasicBlock):
    """torchvision's BasicBlock with one activation module per use.

    torchvision's block calls one ``self.relu`` twice, the second time after the residual add;
    conv-bn-relu fusion for QAT replaces that shared module with ``Identity`` and so removes the
    post-add ReLU too (pytorch issue #52584). Here ``relu1`` follows ``bn1`` (fused with
    ``conv1``/``bn1``) and the post-add ReLU is ``add_relu``, a ``FloatFunctional`` that QAT gives
    its own fake-quant (as torchvision's ``QuantizableBasicBlock`` and SparseML's ResNets do).
    Same parameters, state-dict keys and float function as torchvision's block.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        del self.relu
        self.relu1 = nn.ReLU(inplace=True)
        self.add_relu = torch.ao.nn.quantized.FloatFunctional()
        _reorder_modules(self, ("conv1", "bn1", "relu1", "conv2", "bn2", "downsample", "add_relu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.add_relu.add_relu(out, identity)


class Bottleneck(torchvision.models.resnet.Bottleneck):
    """torchvision's Bottleneck with one activation module per use (see :class:`BasicBlock`):
    ``relu1``/``relu2`` follow ``bn1``/``bn2``; ``conv3``/``bn3`` fuse without a ReLU; the
    post-add ReLU is ``add_relu`` (torchvision's ``QuantizableBottleneck`` layout)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        del self.relu
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.add_relu = torch.ao.nn.quantized.FloatFunctional()
        _reorder_modules(
            self,
            ("conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3", "downsample", "add_relu"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.add_relu.add_relu(out, identity)


#: Blocks and per-stage block counts of each arch (torchvision.models.resnet, He et al. 2016 Table 1).
_ARCH_BLOCKS: dict[str, tuple[type, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def _bare_resnet(arch: str, num_classes: int) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet of ``arch`` built from this module's blocks
    (torchvision's init), with a ``num_classes``-way fc; state-dict keys as ``torchvision.models.<arch>``."""
    block, layers = _ARCH_BLOCKS[arch]
    return torchvision.models.resnet.ResNet(block, layers, num_classes=num_classes)


def _cifar_conv1() -> nn.Conv2d:
    conv = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same init torchvision.models.ResNet uses for its convolutions.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _apply_stem(model: torchvision.models.ResNet, stem: str) -> None:
    """Replace the stem in place (after any pretrained weights are loaded)."""
    if stem == "cifar":
        model.conv1 = _cifar_conv1()
        model.maxpool = nn.Identity()
    elif stem == "upsample":
        model.conv1 = nn.Sequential(
            nn.Upsample(size=_UPSAMPLE_SIZE, mode="bilinear", align_corners=False),
            model.conv1,
        )
    else:  # pragma: no cover - validated by callers
        check_stem(stem)


def _replace_fc(model: torchvision.models.ResNet, num_classes: int) -> None:
    model.fc = nn.Linear(model.fc.in_features, num_classes)


def _imagenet_weights(arch: str):
    """torchvision's ImageNet weight enum entry for ``arch`` (V2 if it exists)."""
    enum = torchvision.models.get_model_weights(arch)
    return getattr(enum, "IMAGENET1K_V2", None) or enum.DEFAULT


def _load_imagenet_state_dict(arch: str) -> Mapping[str, torch.Tensor]:
    weights = _imagenet_weights(arch)
    try:
        # Uses torch.hub's cache if the file is already there; downloads otherwise.
        return weights.get_state_dict(progress=False, check_hash=True)
    except (URLError, OSError) as exc:  # URLError/HTTPError/socket errors are OSErrors
        raise WeightsUnavailableError(
            f"could not download ImageNet weights {weights} for {arch} from {weights.url} "
            f"({first_line(exc)})"
        ) from None
    except RuntimeError as exc:  # e.g. hash mismatch or a truncated file in the hub cache
        raise WeightsUnavailableError(
            f"could not read ImageNet weights {weights} for {arch} ({first_line(exc)}); "
            f"delete the cached file under {torch.hub.get_dir()}/checkpoints"
        ) from None


def build_teacher(
    arch: str = "resnet101",
    num_classes: int = 10,
    stem: str = "cifar",
    weights: str | os.PathLike | None = "imagenet",
) -> torchvision.models.ResNet:
    """Build the teacher: a full torchvision ResNet with a new classifier.

    Architecture: ``torchvision.models.<arch>`` (He et al. 2016), ``fc``
    replaced by a fresh ``nn.Linear(in_features, num_classes)``, the stem set by
    ``stem`` (see module docstring), no parameter frozen. Model is float32, on
    CPU, in train mode.

    Args:
        arch: one of :data:`ARCHS`.
        num_classes: positive int, width of the new classifier.
        stem: one of :data:`STEMS`.
        weights: ``"imagenet"`` -- torchvision's ImageNet weights
            (``IMAGENET1K_V2`` where the arch has it, e.g.
            ``ResNet101_Weights.IMAGENET1K_V2``, else ``DEFAULT``) loaded into
            the backbone before the fc and stem are replaced; ``None`` --
            random init; or a path to a teacher checkpoint written by
            :func:`save_checkpoint` with the same arch, stem and num_classes
            (all weights, fc and stem included, are loaded strictly).

    Returns:
        ``torchvision.models.ResNet``. With stem ``"cifar"`` an input of
        float32 ``(B, 3, 32, 32)`` gives logits ``(B, num_classes)``.

    Raises:
        ValueError: unknown arch/stem, bad num_classes or weights value; a
            checkpoint that is missing, corrupt, not of this project, or of
            another arch/stem/num_classes/role (one line, naming the path).
        WeightsUnavailableError: ``weights="imagenet"`` and the file can be
            neither downloaded nor found in the ``torch.hub`` cache.
    """
    check_arch(arch)
    check_stem(stem)
    check_num_classes(num_classes)

    if weights == "imagenet":
        return _imagenet_teacher(arch, num_classes, stem)

    if weights is None:
        model = _bare_resnet(arch, num_classes)
        _apply_stem(model, stem)
        return model

    if isinstance(weights, (str, os.PathLike)):
        return _checkpoint_teacher(arch, num_classes, stem, weights)

    raise ValueError(
        f"weights must be 'imagenet', None or a checkpoint path, got {weights!r}"
    )


def _imagenet_teacher(arch: str, num_classes: int, stem: str) -> torchvision.models.ResNet:
    """``build_teacher(weights="imagenet")``: torchvision's ImageNet weights loaded into a
    1000-class ``arch``, then a fresh fc of ``num_classes`` and the stem applied."""
    state = _load_imagenet_state_dict(arch)
    model = _bare_resnet(arch, 1000)
    model.load_state_dict(state)
    _replace_fc(model, num_classes)
    _apply_stem(model, stem)
    return model


def _checkpoint_teacher(arch: str, num_classes: int, stem: str,
                        weights: str | os.PathLike) -> torchvision.models.ResNet:
    """``build_teacher(weights=<path>)``: every weight loaded strictly from the teacher checkpoint
    ``weights``. Raises ValueError (one line, naming the path) if it cannot be read or is of
    another arch/stem/num_classes/role."""
    ckpt = _read_checkpoint(weights, map_location="cpu")
    wanted = {"arch": arch, "stem": stem, "num_classes": num_classes, "role": "teacher"}
    mismatches = [
        f"{key}={ckpt[key]!r} (wanted {value!r})"
        for key, value in wanted.items()
        if ckpt[key] != value
    ]
    if mismatches:
        raise ValueError(
            f"checkpoint {os.fspath(weights)!r} does not match build_teacher(arch={arch!r}, "
            f"stem={stem!r}, num_classes={num_classes}): it has {', '.join(mismatches)}"
        )
    model = _bare_resnet(arch, num_classes)
    _apply_stem(model, stem)
    _load_state_strict(model, ckpt["state_dict"], weights)
    return model


def build_student(
    arch: str = "resnet101", num_classes: int = 10, stem: str = "cifar"
) -> torchvision.models.ResNet:
    """Build the untrained student: the teacher's ResNet with ``layer3`` cut to one block.

    ``model.layer3 = model.layer3[:1]`` keeps only the first block of stage 3,
    the one with the stride-2 ``downsample`` projection, so ``layer4`` still
    receives the channel count it expects (256 for resnet18/34, 1024 for
    resnet50/101/152) at half the ``layer2`` resolution. ``layer1``,
    ``layer2`` and ``layer4`` are untouched, so the student's feature maps and
    logits have exactly the teacher's shapes for the same stem. Random init
    (torchvision's), float32, CPU, train mode.

    Args:
        arch: one of :data:`ARCHS`.
        num_classes: positive int.
        stem: one of :data:`STEMS`; must equal the teacher's stem.

    Returns:
        ``torchvision.models.ResNet``; for resnet101/"cifar", input float32
        ``(B, 3, 32, 32)`` gives logits ``(B, num_classes)``.

    Raises:
        ValueError: unknown arch/stem or bad num_classes (one line).
    """
    check_arch(arch)
    check_stem(stem)
    check_num_classes(num_classes)
    model = _bare_resnet(arch, num_classes)
    model.layer3 = model.layer3[:1]
    _apply_stem(model, stem)
    return model


# --------------------------------------------------------------------------
# size
# --------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements in ``model`` (trainable or not).

    Returns:
        int, ``sum(p.numel() for p in model.parameters())`` (shared parameters
        counted once, as ``parameters()`` deduplicates them).
    """
    return int(sum(p.numel() for p in model.parameters()))


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[torchvision.models.ResNet, dict[str, Any]]:
    """Rebuild the model stored by :func:`save_checkpoint` and load its weights.

    The model is rebuilt with ``build_teacher(arch, num_classes, stem,
    weights=None)`` or ``build_student(arch, num_classes, stem)`` according to
    the stored role, then ``load_state_dict(strict=True)``. The file is read
    with ``torch.load(weights_only=True)`` (no arbitrary code runs).

    Args:
        path: a checkpoint file of this project.
        map_location: passed to ``torch.load`` (tensors are loaded there; the
            rebuilt model itself is on CPU, copied from them).

    Returns:
        ``(model, meta)``: the float32 model in train mode, and the checkpoint
        dict without ``"state_dict"`` (keys format, arch, stem, num_classes,
        role, extra).

    Raises:
        ValueError: missing file, corrupt file, not this project's format, or
            weights that do not fit the rebuilt model (one line, naming the path).
    """
    ckpt = _read_checkpoint(path, map_location)
    if ckpt["role"] == "teacher":
        model = build_teacher(ckpt["arch"], ckpt["num_classes"], ckpt["stem"], weights=None)
    else:
        model = build_student(ckpt["arch"], ckpt["num_classes"], ckpt["stem"])
    _load_state_strict(model, ckpt["state_dict"], path)
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    meta.setdefault("extra", {})
    return model, meta
