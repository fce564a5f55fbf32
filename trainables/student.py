"""The students' Ray Tune trainable (``train_student``) and the loss of one student step
(``student_loss``, also the sparsify stage's recipe loss), on the epoch loop of
``trainables.train``; the loss itself is ``trainables.losses``.

``config`` keys read here besides ``trainables.train``'s (set by ``driver.tuning.trial_config``):
``setup`` (``study.SETUPS``) and ``temperature``.
"""

from __future__ import annotations

from functools import partial

import torch

from models import build_student, build_teacher, feature_extractor, forward_features
from study import SETUP_INFO, needs_teacher, setup_needs
from trainables.data import CIFAR10Tensors
from trainables.losses import distillation_loss
from trainables.train import _fit, _on_device, compile_backend, maybe_compile, pick_device, setup_torch


def frozen_teacher(teacher: dict, device: torch.device) -> torch.nn.Module:
    """The teacher rebuilt from its checkpoint payload (``torch.load`` of ``teacher.pt``:
    ``{"arch", "stem", "num_classes", "state_dict", ...}``) on ``device``, float32, in eval mode,
    gradients off (channels_last on a GPU).

    Raises:
        KeyError: the payload lacks one of those keys; RuntimeError: its state dict does not fit
        the architecture it names (``load_state_dict``).
    """
    model = build_teacher(teacher["arch"], num_classes=teacher["num_classes"], stem=teacher["stem"],
                          weights=None)
    model.load_state_dict(teacher["state_dict"])
    return _on_device(model, device).eval().requires_grad_(False)


def student_loss(setup: str, student: torch.nn.Module, teacher: torch.nn.Module | None,
                 temperature: float, compile_with: str | None = None, *,
                 trace_student: bool = True, teacher_channels: dict | None = None):
    """The loss of one student step for ``setup``, as a function ``loss_fn(x, y) -> (loss, terms)``
    of a batch x (B,3,32,32) float32 and labels y (B,) int64 (see ``distillation_loss``).

    The frozen ``teacher`` (None for a setup without teacher terms, ``ce``; in eval mode, gradients
    off) runs under ``torch.no_grad()``: its outputs are ordinary tensors that need no copy. What a
    setup reads follows from its terms (``study.SETUP_INFO``, ``study.setup_needs``): ``kd`` needs
    only the teacher's logits; ``kd_feat`` also the layer1/2/4 feature maps of both models, by default from
    ``models.feature_extractor`` graphs built here once (no hooks per call). With
    ``compile_with`` (a ``torch.compile`` backend, e.g. ``"inductor"``) the student's and the
    teacher's forward are compiled; the parameters stay those of ``student``/``teacher``.

    ``trace_student=False`` takes the student's feature maps from forward hooks at each call
    (``models.forward_features``) instead of a graph traced once: a traced graph keeps the
    submodules it was built with, so after SparseML swaps in fused fake-quant modules for QAT it
    would silently compute the un-quantized network. The sparsify stage uses this; the hooks see
    whatever ``layer1``/``layer2``/``layer4`` of ``student`` compute at that moment.

    ``teacher_channels`` (feature layer -> int64 (C_l,) channel indices) matches a student thinned
    by structured pruning: the teacher's feature map of that layer is cut to the channels the
    student kept, in order, before the MSE (``trainables.compress.structured``).

    Raises:
        ValueError: ``setup`` is not one of ``study.SETUPS``, or ``teacher`` is None for a setup
            that needs it (``study.needs_teacher``: ``kd``/``kd_feat``).
    """
    if setup not in SETUP_INFO:
        raise ValueError(f"setup {setup!r} is unknown; allowed: {', '.join(SETUP_INFO)}")
    # What the setup's terms read (study.SETUP_INFO, study.LOSS_TERMS): the teacher's logits,
    # and for feature terms also both models' feature maps.
    needs = setup_needs(setup)
    use_teacher, use_features = needs_teacher(setup), "features" in needs
    if use_teacher and teacher is None:
        raise ValueError(f"setup {setup!r} needs the teacher; got None")
    s_forward, t_forward = _forwards(student, teacher, use_teacher, use_features, trace_student, compile_with)

    def loss_fn(x, y):
        if not use_teacher:
            return distillation_loss(setup, s_forward(x), y)
        with torch.no_grad():
            t_out = t_forward(x)
        if not use_features:  # logits only
            return distillation_loss(setup, s_forward(x), y, teacher_logits=t_out,
                                     temperature=temperature)
        (t_logits, t_feats), (s_logits, s_feats) = t_out, s_forward(x)
        if teacher_channels:
            t_feats = _kept_channels(t_feats, teacher_channels)
        return distillation_loss(setup, s_logits, y, teacher_logits=t_logits,
                                 student_feats=s_feats, teacher_feats=t_feats,
                                 temperature=temperature)

    return loss_fn


def _forwards(student: torch.nn.Module, teacher: torch.nn.Module | None, use_teacher: bool,
              use_features: bool, trace_student: bool, compile_with: str | None):
    """The student's and the teacher's forward for ``student_loss``: the modules themselves, or
    with ``use_features`` functions returning ``(logits, {layer: feature map})`` (the teacher's and,
    with ``trace_student``, the student's a traced ``feature_extractor`` graph, else hooks at each
    call); each compiled with ``compile_with`` (the teacher's only when it is used)."""
    s_forward, t_forward = student, teacher
    if use_features:
        t_forward = feature_extractor(teacher)
        s_forward = feature_extractor(student) if trace_student else partial(forward_features, student)
    s_forward = maybe_compile(s_forward, compile_with)
    if t_forward is not None and use_teacher:
        t_forward = maybe_compile(t_forward, compile_with)
    return s_forward, t_forward


def _kept_channels(t_feats: dict, teacher_channels: dict) -> dict:
    """The teacher's feature maps cut to the channels a structurally pruned student kept
    (``teacher_channels``: layer -> int64 channel indices; a layer not in it stays whole)."""
    return {name: feats.index_select(1, teacher_channels[name].to(feats.device))
            if name in teacher_channels else feats for name, feats in t_feats.items()}


def train_student(config: dict, data: CIFAR10Tensors, teacher: dict) -> None:
    """Tune trainable: train ``build_student(arch, stem)`` with ``config["setup"]``'s loss.

    ``teacher`` is the payload of the frozen teacher checkpoint (``torch.load`` of
    ``teacher.pt``: ``{"arch", "stem", "num_classes", "role", "state_dict", ...}``), handed over
    by ``tune.with_parameters`` so it is stored once in the object store. It is rebuilt once per
    trial, in eval mode, with gradients off; its forward runs under ``torch.no_grad()``.
    Setups: ``ce`` (cross-entropy), ``kd`` (+ soft cross-entropy at ``temperature``),
    ``kd_feat`` (+ MSE on layer1/layer2/layer4 feature maps); see ``trainables.losses``.
    Both models go through ``torch.compile`` when ``use_compile``. Reports ``test_acc`` (and
    ``val_acc`` with ``--val-size``), ``train_loss``, one ``loss_<term>`` per summand and
    ``warmup_seconds`` each epoch.
    """
    device = pick_device()
    setup_torch(config, device)
    setup = config["setup"]
    student = _on_device(build_student(config["arch"], num_classes=config["num_classes"],
                                       stem=config["stem"]), device)
    teacher_model = frozen_teacher(teacher, device) if needs_teacher(setup) else None
    loss_fn = student_loss(setup, student, teacher_model, float(config["temperature"]),
                           compile_backend(config, device))
    _fit(config, data, student, "student", loss_fn, device)
