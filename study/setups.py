"""The student setups: the one table that names them (``SETUP_INFO``), the loss summands they
average (``LOSS_TERMS``) and the feature layers the ``mse_<layer>`` terms match.

Pure data: the CLI, validation (``study.config``), the losses (``trainables.losses``) and the report
read it; ``study.config`` and ``study`` re-export every name. How to add a setup:
``ARCHITECTURE.md``, "How to add a fourth student setup".
"""

from __future__ import annotations

from typing import NamedTuple

#: The feature maps the ``mse_<layer>`` loss terms match, student against teacher (tapped by
#: ``models.feature_extractor`` / ``models.forward_features``).
FEATURE_LAYERS: tuple[str, ...] = ("layer1", "layer2", "layer4")


class LossTerm(NamedTuple):
    """One summand a setup's loss can average (``trainables.losses`` computes it)."""

    #: what it reads besides the student's logits: ``"labels"``, ``"teacher_logits"`` (the frozen
    #: teacher's logits) or ``"features"`` (the teacher's logits and both models' feature maps)
    needs: str
    #: its name in the report's loss plot (``report.ipynb``)
    label: str


#: Every loss summand, in the order ``terms`` and the report list them; each is logged as
#: ``loss_<name>`` (Tune results, ``sparsify/history.csv``).
LOSS_TERMS: dict[str, LossTerm] = {
    "ce": LossTerm("labels", "CE to labels"),
    "soft_ce": LossTerm("teacher_logits", "soft CE × T² to teacher"),
    **{f"mse_{layer}": LossTerm("features", f"MSE, {layer} features") for layer in FEATURE_LAYERS},
}


class Setup(NamedTuple):
    """One student setup: its loss is the simple average of ``terms`` (keys of ``LOSS_TERMS``)."""

    terms: tuple[str, ...]
    #: the report's accuracy table, column "trained with"
    formula: str
    #: the report's sentence on the recipe's loss ("fine-tuned with ...", ``--sparsify-loss``)
    words: str


#: The student setups, in the order the study reports them: the one table that names them
#: (``ARCHITECTURE.md``, "How to add a fourth student setup").
SETUP_INFO: dict[str, Setup] = {
    "ce": Setup(("ce",), "CE", "cross-entropy to the labels only"),
    "kd": Setup(("ce", "soft_ce"), "CE + soft CE",
                "the kd loss (labels and the frozen teacher's soft targets)"),
    "kd_feat": Setup(("ce", "soft_ce", *(f"mse_{layer}" for layer in FEATURE_LAYERS)), "CE + soft CE + MSE",
                     "the kd_feat loss (labels, the frozen teacher's soft targets and feature maps)"),
}
#: The setups' names, in order (the CLI's ``--setups``, the Tune grid, the results tables).
SETUPS: tuple[str, ...] = tuple(SETUP_INFO)


def setup_needs(setup: str) -> frozenset[str]:
    """What ``setup``'s loss reads besides the student's logits (``LossTerm.needs`` of its terms).
    KeyError for an unknown setup."""
    return frozenset(LOSS_TERMS[term].needs for term in SETUP_INFO[setup].terms)


def needs_teacher(setup: str) -> bool:
    """Whether ``setup``'s loss needs the frozen teacher (any term beyond the labels)."""
    return bool(setup_needs(setup) - {"labels"})
