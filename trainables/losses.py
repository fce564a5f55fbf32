"""Distillation losses for the student setups.

Setups and their summands: ``study.SETUP_INFO`` (``ARCHITECTURE.md``); today

- ``"ce"``      : CE(student, y)
- ``"kd"``      : mean(CE, softCE(student, teacher))
- ``"kd_feat"`` : mean(CE, softCE, MSE(layer1), MSE(layer2), MSE(layer4))

Every setup's loss is the *simple average* of its summands, so the setups are on
comparable scales. The soft cross-entropy is Hinton, Vinyals & Dean (2015), "Distilling the
Knowledge in a Neural Network", arXiv:1503.02531, §2: cross-entropy between the teacher's and
the student's temperature-softened distributions, multiplied by T² so that its gradient
magnitude does not shrink as 1/T² when the temperature changes. Feature matching is a plain
element-wise MSE between same-shaped student and teacher feature maps (FitNets-style hint loss,
Romero et al. 2015, without a regressor: the student keeps the teacher's layer1/layer2/layer4
widths, see ``models.build_student``).

Teacher tensors (logits and features) are always detached here: the teacher is frozen and no
gradient may flow into it, whether or not the caller ran it under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from study import FEATURE_LAYERS, LOSS_TERMS, SETUP_INFO, SETUPS

__all__ = [
    "SETUPS",
    "FEATURE_LAYERS",
    "TERM_NAMES",
    "LOSS_TERM_FUNCTIONS",
    "LossInputs",
    "soft_cross_entropy",
    "distillation_loss",
]

# FEATURE_LAYERS (from study): the feature maps matched by the ``mse_<layer>`` terms, as returned
# by ``models.forward_features``.

#: Names of the loss summands that can appear in ``terms`` (``study.LOSS_TERMS``).
TERM_NAMES: Tuple[str, ...] = tuple(LOSS_TERMS)


def _check_temperature(temperature: float) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature={temperature!r} is not a number; allowed: a finite float > 0") from None
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature={temperature!r} is invalid; allowed: a finite float > 0")
    return t


def _check_logits(name: str, logits: object) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a (B, C) float tensor; got {type(logits).__name__}")
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"{name} must be a (B, C) float tensor; got shape {tuple(logits.shape)} dtype {logits.dtype}"
        )
    return logits


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Temperature-softened cross-entropy of the student against the teacher, times T².

    ``T² · mean_b ( −Σ_c softmax(teacher_b / T)_c · log_softmax(student_b / T)_c )``

    Source: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531, §2. The gradient of the un-scaled term w.r.t. a student logit is
    ``(q_c − p_c) / T`` (per sample), i.e. it scales as 1/T after the chain rule through
    ``z / T``; multiplying by T² keeps the soft term's gradient magnitude comparable to the hard
    CE term across temperatures. Note this is a cross-entropy, not a KL divergence: it exceeds
    ``T² · KL(p_teacher ‖ p_student)`` by ``T² · H(p_teacher)``, a constant w.r.t. the student,
    so gradients are identical.

    Args:
        student_logits: (B, C) float tensor (float32, or float16/bfloat16 under autocast),
            raw pre-softmax scores of the student. Gradients flow into it.
        teacher_logits: (B, C) float tensor, same shape, raw scores of the frozen teacher.
            Treated as a constant (detached here).
        temperature: softening temperature T, a finite float > 0 (unitless).

    Returns:
        0-d float32 tensor (computed in float32 for numerical stability).

    Raises:
        ValueError: temperature not a finite number > 0; logits not (B, C) float tensors;
            student and teacher shapes differ.
    """
    t = _check_temperature(temperature)
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
            f"{tuple(student_logits.shape)}; allowed: identical (B, C) shapes"
        )
    teacher_prob = F.softmax(teacher_logits.detach().float() / t, dim=1)
    student_logprob = F.log_softmax(student_logits.float() / t, dim=1)
    per_sample = -(teacher_prob * student_logprob).sum(dim=1)
    return per_sample.mean() * (t * t)


def _feature_mse(
    setup: str,
    layer: str,
    student_feats: Optional[Mapping[str, torch.Tensor]],
    teacher_feats: Optional[Mapping[str, torch.Tensor]],
) -> torch.Tensor:
    for which, feats in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
        if feats is None or not isinstance(feats, Mapping):
            raise ValueError(
                f"setup {setup!r} needs {which} as a dict with keys {FEATURE_LAYERS}; "
                f"got {type(feats).__name__}"
            )
        if layer not in feats:
            raise ValueError(
                f"setup {setup!r} needs {which}[{layer!r}]; present keys: {sorted(feats)}, "
                f"required: {FEATURE_LAYERS}"
            )
    s = student_feats[layer]
    t = teacher_feats[layer]
    if not (isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor)):
        raise ValueError(
            f"feature {layer!r} must be tensors; got student {type(s).__name__}, teacher {type(t).__name__}"
        )
    if s.shape != t.shape:
        raise ValueError(
            f"feature {layer!r}: student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}; "
            "allowed: identical (B, C, H, W) shapes"
        )
    # Cast the (detached) teacher map to the student's dtype: under autocast the two may differ.
    return F.mse_loss(s, t.detach().to(dtype=s.dtype))


def distillation_loss(
    setup: str,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    student_feats: Optional[Mapping[str, torch.Tensor]] = None,
    teacher_feats: Optional[Mapping[str, torch.Tensor]] = None,
    temperature: float = 4.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss of one student batch for a given setup: the simple average of its summands.

    - ``"ce"``:      ``CE``
    - ``"kd"``:      ``(CE + softCE) / 2``
    - ``"kd_feat"``: ``(CE + softCE + MSE_layer1 + MSE_layer2 + MSE_layer4) / 5``

    CE is ``F.cross_entropy`` (mean over the batch); softCE is :func:`soft_cross_entropy` at
    ``temperature`` (Hinton et al. 2015, with the T² factor); each MSE is ``F.mse_loss`` (mean
    over all elements) between the student's and the detached teacher's feature map.

    Args:
        setup: one of :data:`SETUPS`.
        student_logits: (B, C) float tensor, student scores (e.g. ``models.forward_features``).
        labels: (B,) int64 tensor of class ids in ``[0, C)``.
        teacher_logits: (B, C) float tensor from the frozen teacher; required by ``"kd"`` and
            ``"kd_feat"``, ignored by ``"ce"``. Detached here.
        student_feats: dict name -> (B, C_l, H_l, W_l) float tensor with at least the keys in
            :data:`FEATURE_LAYERS` (the second return value of ``models.forward_features``);
            required by ``"kd_feat"`` only. Extra keys are ignored.
        teacher_feats: same keys and shapes, from the teacher; required by ``"kd_feat"`` only.
            Detached here.
        temperature: softening temperature T > 0 for softCE (unused by ``"ce"``).

    Returns:
        ``(loss, terms)``: ``loss`` is a 0-d float tensor with gradient w.r.t. the student;
        ``terms`` maps each summand of the setup (subset of :data:`TERM_NAMES`, in that order)
        to its detached value, a 0-d float tensor on the logits' device (float32, also under
        autocast), for logging. Nothing here reads a value back to the host, so a training step
        does not wait for the GPU; the caller sums the terms on the device and reads them once
        per epoch (``trainables.train._fit``).

    Raises:
        ValueError: unknown ``setup``; ``teacher_logits`` missing for ``"kd"``/``"kd_feat"``;
            a feature dict or one of its :data:`FEATURE_LAYERS` keys missing for ``"kd_feat"``;
            student/teacher shapes that differ; temperature not > 0 (when used).
    """
    if setup not in SETUP_INFO:
        raise ValueError(f"setup={setup!r} is unknown; allowed: {SETUPS}")
    _check_logits("student_logits", student_logits)
    batch = LossInputs(setup, student_logits, labels, teacher_logits, student_feats, teacher_feats, temperature)
    names = SETUP_INFO[setup].terms
    summands: Dict[str, torch.Tensor] = {}
    for name in names:  # in the table's order, so the first missing input is the one reported
        if LOSS_TERMS[name].needs != "labels" and teacher_logits is None:
            raise ValueError(f"setup {setup!r} needs teacher_logits, a (B, C) float tensor; got None")
        summands[name] = LOSS_TERM_FUNCTIONS[name](batch)
    loss = sum(summands[name] for name in names) / len(names)
    terms = {name: summands[name].detach() for name in names}
    return loss, terms


class LossInputs(NamedTuple):
    """One student batch as every loss term reads it."""

    #: the setup being trained (``study.SETUPS``), named in error messages
    setup: str
    #: (B, C) float, the student's raw scores; gradients flow into it
    student_logits: torch.Tensor
    #: (B,) int64 class ids in ``[0, C)``
    labels: torch.Tensor
    #: (B, C) float from the frozen teacher, or None (``ce``); detached by the terms
    teacher_logits: Optional[torch.Tensor] = None
    #: layer name -> (B, C_l, H_l, W_l) float, at least :data:`FEATURE_LAYERS` (feature terms only)
    student_feature_maps: Optional[Mapping[str, torch.Tensor]] = None
    #: the teacher's feature maps, same keys and shapes; detached by the terms
    teacher_feature_maps: Optional[Mapping[str, torch.Tensor]] = None
    #: softening temperature T > 0 of the soft targets (unitless)
    temperature: float = 4.0


def cross_entropy_term(batch: LossInputs) -> torch.Tensor:
    """``ce``: ``F.cross_entropy`` of the student's logits to the labels, mean over the batch."""
    return F.cross_entropy(batch.student_logits, batch.labels)


def soft_target_term(batch: LossInputs) -> torch.Tensor:
    """``soft_ce``: :func:`soft_cross_entropy` to the teacher's soft targets at the batch's temperature."""
    return soft_cross_entropy(batch.student_logits, batch.teacher_logits, batch.temperature)


def feature_map_term(layer: str) -> Callable[[LossInputs], torch.Tensor]:
    """``mse_<layer>``: the term that takes ``F.mse_loss`` between the student's and the detached
    teacher's ``layer`` feature maps (ValueError when a map is missing or the shapes differ)."""

    def term(batch: LossInputs) -> torch.Tensor:
        return _feature_mse(batch.setup, layer, batch.student_feature_maps, batch.teacher_feature_maps)

    term.__name__ = term.__qualname__ = f"mse_{layer}"
    return term


#: The function of each summand of ``study.LOSS_TERMS`` (same keys, same order), each taking one
#: :class:`LossInputs`. A new term is one function and one entry here, beside its row in
#: ``study.LOSS_TERMS`` (which stays free of torch: the CLI and the report read it).
LOSS_TERM_FUNCTIONS: Dict[str, Callable[[LossInputs], torch.Tensor]] = {
    "ce": cross_entropy_term,
    "soft_ce": soft_target_term,
    **{f"mse_{layer}": feature_map_term(layer) for layer in FEATURE_LAYERS},
}
