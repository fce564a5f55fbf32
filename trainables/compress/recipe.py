"""SparseML recipes: load a recipe file into a ``ScheduledModifierManager`` (with one-line errors
for every way a file can be wrong) and read its schedule (epochs of pruning, QAT, ...).

Pure SparseML 1.7 + PyYAML; ``trainables.compress.core`` runs what is loaded here.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Dict

import yaml

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS before SparseML is imported)
import trainables.compress.compat  # noqa: F401  (SparseML 1.7 on newer torch; before SparseML is imported)
from sparseml.optim.helpers import (
    load_global_recipe_variables_from_yaml,
    load_recipe_yaml_str_no_classes,
)
from sparseml.pytorch.optim import ScheduledModifierManager

from study.errors import error_line

__all__ = ["RECIPE_EXTENSIONS", "check_pruning_window", "load_recipe", "recipe_phases"]

#: file name endings SparseML 1.7's recipe loader accepts (``_load_yaml_str_from_file``)
RECIPE_EXTENSIONS = (".yaml", ".md")


def _one_line(exc: BaseException) -> str:
    """Collapse an exception message to one line (no newlines, runs of spaces squeezed)."""
    return error_line(exc, whole=True)


def _yaml_problem(exc: Exception) -> str:
    """Short one-line description of a PyYAML error: problem + line/column."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return _one_line(exc)


def load_recipe(path: "str | os.PathLike", **overrides: Any) -> ScheduledModifierManager:
    """Load a SparseML recipe file into a ``ScheduledModifierManager``.

    Args:
        path: recipe file, ``.yaml`` (or a SparseML ``.md`` recipe card with YAML
            front matter).
        **overrides: values for the recipe's top-level variables, e.g.
            ``num_epochs=3``; passed to ``ScheduledModifierManager.from_yaml(...,
            recipe_variables=overrides)``, which substitutes them before the
            ``eval(...)`` expressions are evaluated, so derived variables follow.

    Returns:
        The manager (not yet initialized; ``core.RecipeRun.start`` calls ``modify``).

    Raises:
        ValueError (one line, naming ``path``): the file is missing or not a regular
            file; its name does not end in ``.yaml``/``.md``; it is not valid YAML
            or not a mapping; an override names a variable the recipe does not
            define; a modifier tag is unknown to SparseML; a modifier's arguments
            are invalid; or the recipe defines no modifiers.
    """
    p = os.fspath(path)
    _check_file(p)
    if p.lower().endswith(".yaml"):
        _check_yaml_mapping(p)
    if overrides:
        _check_overrides(p, overrides)
    manager = _manager_from_yaml(p, overrides)
    if not list(manager.iter_modifiers()):
        raise ValueError(f"recipe {p!r} defines no modifiers (expected *_modifiers lists)")
    return manager


def _check_file(p: str) -> None:
    """Raise ValueError unless ``p`` is an existing file whose name ends in ``RECIPE_EXTENSIONS``."""
    if not os.path.isfile(p):
        raise ValueError(f"recipe file not found: {p!r} (expected an existing .yaml file)")
    if not p.lower().endswith(RECIPE_EXTENSIONS):
        raise ValueError(
            f"recipe file {p!r} has an unsupported extension; allowed: {', '.join(RECIPE_EXTENSIONS)}"
        )


def _check_yaml_mapping(p: str) -> None:
    """Raise ValueError unless the ``.yaml`` file ``p`` is UTF-8 text holding a YAML mapping.

    Parses once without modifier classes to tell "not YAML" apart from "YAML with an unknown
    modifier" (SparseML's loader would raise a generic yaml error for both).
    """
    try:
        with open(p, "r", encoding="utf-8") as fh:
            text = fh.read()
        container = load_recipe_yaml_str_no_classes(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {p!r} is not valid YAML: {_yaml_problem(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"recipe {p!r} is not a UTF-8 text file: {_one_line(exc)}") from exc
    if not isinstance(container, dict):
        raise ValueError(
            f"recipe {p!r} is not a YAML mapping of variables and *_modifiers lists "
            f"(got {type(container).__name__})"
        )


def _check_overrides(p: str, overrides: Dict[str, Any]) -> None:
    """Raise ValueError if the recipe ``p`` cannot be read or defines no variable of some override."""
    try:
        known = load_global_recipe_variables_from_yaml(p)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"recipe {p!r} could not be read: {_one_line(exc)}") from exc
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(
            f"recipe {p!r} has no variable(s) {unknown}; overridable: {sorted(known)}"
        )


def _manager_from_yaml(p: str, overrides: Dict[str, Any]) -> ScheduledModifierManager:
    """``ScheduledModifierManager.from_yaml`` with ``overrides`` as recipe variables; every error
    (unknown modifier tag, bad YAML, invalid arguments) re-raised as a one-line ValueError."""
    try:
        return ScheduledModifierManager.from_yaml(p, recipe_variables=dict(overrides) or None)
    except yaml.constructor.ConstructorError as exc:
        m = re.search(r"tag '!(?:pytorch\.)?([^']+)'", str(exc))
        name = m.group(1) if m else _one_line(exc)
        raise ValueError(
            f"recipe {p!r} uses unknown modifier {name!r} (not a SparseML 1.7 PyTorch modifier)"
        ) from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {p!r} is not valid YAML: {_one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - SparseML raises ValueError/TypeError/RuntimeError
        raise ValueError(f"recipe {p!r} is invalid: {type(exc).__name__}: {_one_line(exc)}") from exc


def _mask_updates(pruner: Any) -> "int | None":
    """Mask updates a pruning modifier asks for over its window: (end - start) / update_frequency."""
    freq = getattr(pruner, "update_frequency", None)
    if not isinstance(freq, (int, float)) or freq <= 0:
        return None
    return int(round((float(pruner.end_epoch) - float(pruner.start_epoch)) / float(freq)))


def recipe_phases(manager: ScheduledModifierManager) -> Dict[str, Any]:
    """Read the schedule of a loaded recipe from its modifiers.

    Args:
        manager: a manager from :func:`load_recipe`.

    Returns:
        dict with
          ``max_epochs`` (int): ``manager.max_epochs`` (ceil of the latest start/end
            epoch of any modifier) - the number of epochs ``core.RecipeRun`` runs;
          ``pruning_start_epoch`` / ``pruning_end_epoch`` (float or None): earliest
            start / latest end of the pruning modifiers;
          ``final_sparsity`` (float or None): the (first) pruning modifier's target,
            fraction 0..1 of its prunable weights;
          ``mask_updates`` (int or None): the mask updates it asks for over its window;
          ``qat_start_epoch`` (float or None): earliest start of the quantization
            modifiers;
          ``freeze_bn_stats_epoch``, ``disable_observer_epoch`` (float or None):
            from the (first) ``QuantizationModifier``.
        Epochs are in (possibly fractional) epochs from 0; None where the recipe
        has no such modifier.
    """
    pruners = list(manager.pruning_modifiers)
    quants = list(manager.quantization_modifiers)
    final = None
    if pruners and isinstance(getattr(pruners[0], "final_sparsity", None), (int, float)):
        final = float(pruners[0].final_sparsity)
    q0 = quants[0] if quants else None
    return {
        "max_epochs": int(manager.max_epochs),
        "pruning_start_epoch": min(float(m.start_epoch) for m in pruners) if pruners else None,
        "pruning_end_epoch": max(float(m.end_epoch) for m in pruners) if pruners else None,
        "final_sparsity": final,
        "mask_updates": _mask_updates(pruners[0]) if pruners else None,
        "qat_start_epoch": min(float(m.start_epoch) for m in quants) if quants else None,
        "freeze_bn_stats_epoch": getattr(q0, "freeze_bn_stats_epoch", None),
        "disable_observer_epoch": getattr(q0, "disable_quantization_observer_epoch", None),
    }


def check_pruning_window(phases: Dict[str, Any], steps_per_epoch: int) -> str:
    """Check that the recipe reaches its final sparsity before the pruned model is taken.

    ``core.RecipeRun`` takes optimizer step k at recipe epoch ``k / steps_per_epoch``; SparseML's
    pruning modifiers apply ``final_sparsity`` at the first step at or after ``pruning_end_epoch``,
    and the pruned (FP32) snapshot is taken at ``qat_start_epoch``. So some step must fall in
    ``[pruning_end_epoch, qat_start_epoch)``; with too few steps per epoch (small data, large
    batches) none does and the snapshot would hold the sparsity of an early mask update.

    Args:
        phases: :func:`recipe_phases` of the loaded recipe.
        steps_per_epoch: optimizer steps per recipe epoch (>= 1).

    Returns:
        "" when the window is fine; else a note that the pruning window holds fewer steps than the
        mask updates the recipe asks for (``pruning_update_frequency``; pruning then updates the
        mask at every step, so it takes fewer, larger steps).

    Raises:
        ValueError (one line): no step falls in ``[pruning_end_epoch, qat_start_epoch)``; it names
            the steps per epoch, the phases and what to change.
    """
    start, end, qat = phases["pruning_start_epoch"], phases["pruning_end_epoch"], phases["qat_start_epoch"]
    if start is None or end is None or qat is None:
        return ""
    first_after = math.ceil(end * steps_per_epoch - 1e-9)  # first step k with k / steps_per_epoch >= end
    if first_after >= qat * steps_per_epoch - 1e-9:
        raise ValueError(
            f"the recipe's pruning ends at epoch {end:g} and QAT starts at epoch {qat:g}, but with "
            f"{steps_per_epoch} optimizer step(s) per epoch no step falls between them, so pruning cannot "
            f"reach its final sparsity before the pruned model is taken; use more training images "
            f"(--train-subset), a smaller --batch-size or more --recipe-epochs")
    in_window = first_after - math.ceil(start * steps_per_epoch - 1e-9)
    asked = phases.get("mask_updates")
    if asked and in_window < asked:
        return (f"the pruning window [{start:g}, {end:g}) holds {in_window} optimizer step(s), fewer than the "
                f"{asked} mask updates the recipe asks for: the mask is updated at each of them")
    return ""
