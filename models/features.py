"""The feature maps ``kd_feat`` matches (:data:`FEATURE_LAYERS`: layer1, layer2, layer4) of a
ResNet from ``models.resnet``, with its logits: by hooks per call (:func:`forward_features`) or
from one traced graph (:func:`feature_extractor`)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from study import FEATURE_LAYERS

__all__ = ["feature_extractor", "forward_features"]


def _submodule(model: nn.Module, name: str, caller: str, needed: tuple[str, ...]) -> nn.Module:
    """``model``'s submodule ``name``; ValueError naming what ``caller`` needs when it has none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"model {type(model).__name__} has no submodule {name!r}; "
                         f"{caller} needs {', '.join(needed)}") from None


def forward_features(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``model`` once and return its logits and the stage outputs.

    Forward hooks on ``layer1``, ``layer2`` and ``layer4`` (see
    :data:`FEATURE_LAYERS`) are registered for this call only and removed in a
    ``finally`` block; torchvision's forward is used unchanged (torchdistill
    style). For one-off calls; a loop (and ``torch.compile``) should build
    :func:`feature_extractor` once instead, which gives the same tensors. Gradients flow through logits and features as usual (wrap the
    call in ``torch.no_grad()`` for the frozen teacher).

    Args:
        model: a ResNet from :func:`build_teacher` / :func:`build_student` (any
            module with submodules named ``layer1``, ``layer2``, ``layer4``).
        images: float tensor ``(B, 3, H, W)``, normalised, on the model's device.

    Returns:
        ``(logits, feats)``: logits ``(B, num_classes)`` in the model's dtype
        (float32 for a float32 model and input); ``feats`` maps "layer1",
        "layer2", "layer4" to those stage outputs. For ResNet-101, stem
        "cifar", ``(B, 3, 32, 32)`` input: layer1 ``(B, 256, 32, 32)``, layer2
        ``(B, 512, 16, 16)``, layer4 ``(B, 2048, 4, 4)`` -- the same for
        teacher and student. For resnet18: ``(B, 64, 32, 32)``,
        ``(B, 128, 16, 16)``, ``(B, 512, 4, 4)``.

    Raises:
        ValueError: ``images`` is not a 4-D tensor with 3 channels, or the
            model lacks one of the feature layers.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (B, 3, H, W), got {shape}")

    feats: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in FEATURE_LAYERS:
            layer = _submodule(model, name, "forward_features", FEATURE_LAYERS)

            def hook(_module, _inputs, output, _name=name):
                feats[_name] = output

            handles.append(layer.register_forward_hook(hook))
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, feats


class _FeatureTaps(nn.Module):
    """``(logits, {"layer1": ..., "layer2": ..., "layer4": ...})`` of a traced ResNet graph."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.graph(images)
        return out["logits"], {name: out[name] for name in FEATURE_LAYERS}


def feature_extractor(model: nn.Module) -> nn.Module:
    """A module computing ``model``'s logits and its :data:`FEATURE_LAYERS` outputs in one
    forward pass, built once (no hooks), for the training loop and for ``torch.compile``.

    Built with torchvision's ``create_feature_extractor`` (torch.fx symbolic trace of the
    torchvision forward, torchvision 0.16 ``models.feature_extraction``): the returned graph
    runs the very same modules and tensor ops as ``model(images)``, so on the CPU its outputs
    equal :func:`forward_features`' bit for bit. The traced module holds ``model``'s own
    submodules (parameters and buffers are shared, not copied): training it trains ``model``,
    and ``model.train()``/``model.eval()`` switch it too. Save ``model``'s state dict, never
    this wrapper's. Rebuild it if ``model``'s submodules are replaced later (e.g. QAT).

    Args:
        model: a ResNet from :func:`build_teacher` / :func:`build_student` (any fx-traceable
            module with submodules ``layer1``, ``layer2``, ``layer4`` and ``fc``).

    Returns:
        ``nn.Module``; ``extractor(images)`` with images float ``(B, 3, H, W)`` returns
        ``(logits (B, num_classes), {"layer1": ..., "layer2": ..., "layer4": ...})``, shapes as
        in :func:`forward_features`.

    Raises:
        ValueError: the model lacks one of the feature layers or ``fc``.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    for name in FEATURE_LAYERS + ("fc",):
        _submodule(model, name, "feature_extractor", FEATURE_LAYERS + ("fc",))
    nodes = {name: name for name in FEATURE_LAYERS}
    nodes["fc"] = "logits"
    with warnings.catch_warnings():  # fx tracing touches deprecated torch.has_* attributes
        warnings.simplefilter("ignore", UserWarning)
        graph = create_feature_extractor(model, return_nodes=nodes)  # keeps model's train/eval mode
    return _FeatureTaps(graph).train(model.training)
