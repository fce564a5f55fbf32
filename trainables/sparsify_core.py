"""Recipe-driven sparsification core: load a SparseML recipe, run it, measure sparsity.

Pure torch + SparseML 1.7 (no Ray); the Ray task in ``trainables`` wraps these.

The training loop follows SparseML's documented PyTorch integration
(``sparseml/pytorch/optim/manager.py``)::

    manager = ScheduledModifierManager.from_yaml(recipe)
    optimizer = manager.modify(model, optimizer, steps_per_epoch)   # wraps .step()
    ... ordinary training loop over manager.max_epochs epochs ...
    manager.finalize(model)

Where things happen (read from the 1.7 source, not guessed):

* Every ``wrapped_optimizer.step()`` first calls ``manager.update(module, optimizer,
  epoch, steps_per_epoch)`` with the wrapper's *current* fractional epoch
  (``steps_taken / steps_per_epoch``), then the real ``optimizer.step()``, then
  ``optimizer_post_step`` (which re-applies the pruning masks).  So a modifier whose
  start/end epoch is ``E`` acts at the first step whose epoch is ``>= E``.
* ``GlobalMagnitudePruningModifier`` sets the final sparsity in that update call
  at ``epoch >= end_epoch`` (``check_mask_update`` -> ``pruning_end``); with
  ``leave_enabled: True`` the masks keep being applied afterwards.
* ``QuantizationModifier`` fuses conv-bn(-relu) and swaps in fake-quant QAT modules
  (``_enable_module_qat``) in the update call at the first step with
  ``epoch >= start_epoch`` (or already in ``initialize`` when ``start_epoch <= 0``).
  The swap keeps the same ``Parameter`` objects, so the optimizer and the pruning
  masks stay valid.
* Hence the last point at which the model is pruned but not yet quantized is
  *just before the first optimizer step whose epoch is >= qat_start_epoch*; that is
  where :func:`run_recipe` calls ``on_pruning_end`` (for an integer
  ``qat_start_epoch``, the start of that epoch).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS before SparseML is imported)
from sparseml.optim.helpers import (
    load_global_recipe_variables_from_yaml,
    load_recipe_yaml_str_no_classes,
)
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.pytorch.utils import LoggerManager, PythonLogger

__all__ = [
    "RECIPE_EXTENSIONS",
    "load_recipe",
    "recipe_phases",
    "run_recipe",
    "weight_sparsity",
    "global_sparsity",
    "is_quantized",
]

#: file name endings SparseML 1.7's recipe loader accepts (``_load_yaml_str_from_file``)
RECIPE_EXTENSIONS = (".yaml", ".md")


def _one_line(text: Any) -> str:
    """Collapse an exception message to one line (no newlines, runs of spaces squeezed)."""
    return re.sub(r"\s+", " ", str(text)).strip()


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
        The manager (not yet initialized; :func:`run_recipe` calls ``modify``).

    Raises:
        ValueError (one line, naming ``path``): the file is missing or not a regular
            file; its name does not end in ``.yaml``/``.md``; it is not valid YAML
            or not a mapping; an override names a variable the recipe does not
            define; a modifier tag is unknown to SparseML; a modifier's arguments
            are invalid; or the recipe defines no modifiers.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ValueError(f"recipe file not found: {p!r} (expected an existing .yaml file)")
    if not p.lower().endswith(RECIPE_EXTENSIONS):
        raise ValueError(
            f"recipe file {p!r} has an unsupported extension; allowed: {', '.join(RECIPE_EXTENSIONS)}"
        )
    if p.lower().endswith(".yaml"):
        # Parse once without modifier classes to tell "not YAML" apart from
        # "YAML with an unknown modifier" (SparseML's loader would raise a generic
        # yaml error for both).
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

    if overrides:
        try:
            known = load_global_recipe_variables_from_yaml(p)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"recipe {p!r} could not be read: {_one_line(exc)}") from exc
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(
                f"recipe {p!r} has no variable(s) {unknown}; overridable: {sorted(known)}"
            )

    try:
        manager = ScheduledModifierManager.from_yaml(p, recipe_variables=dict(overrides) or None)
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

    if not list(manager.iter_modifiers()):
        raise ValueError(f"recipe {p!r} defines no modifiers (expected *_modifiers lists)")
    return manager


def recipe_phases(manager: ScheduledModifierManager) -> Dict[str, Any]:
    """Read the schedule of a loaded recipe from its modifiers.

    Args:
        manager: a manager from :func:`load_recipe`.

    Returns:
        dict with
          ``max_epochs`` (int): ``manager.max_epochs`` (ceil of the latest start/end
            epoch of any modifier) - the number of epochs :func:`run_recipe` runs;
          ``pruning_start_epoch`` / ``pruning_end_epoch`` (float or None): earliest
            start / latest end of the pruning modifiers;
          ``final_sparsity`` (float or None): the (first) pruning modifier's target,
            fraction 0..1 of its prunable weights;
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
        "qat_start_epoch": min(float(m.start_epoch) for m in quants) if quants else None,
        "freeze_bn_stats_epoch": getattr(q0, "freeze_bn_stats_epoch", None),
        "disable_observer_epoch": getattr(q0, "disable_quantization_observer_epoch", None),
    }


def _prunable_modules(model: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    # Same set as sparseml.pytorch.utils.get_prunable_layers / __ALL_PRUNABLE__:
    # torch's QAT Conv/ConvBn/Linear classes subclass _ConvNd / Linear.
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor):
                yield name, mod


def weight_sparsity(model: nn.Module) -> Dict[str, float]:
    """Fraction of exactly-zero entries in every Conv*d / Linear weight.

    Args:
        model: any torch module (also after QAT conversion: fused/QAT conv and
            linear modules subclass ``_ConvNd`` / ``Linear``).

    Returns:
        ``{"<module name>.weight": fraction 0..1}``, in ``named_modules`` order.
        Biases, BatchNorm and other parameters are not counted (they are not pruned).
    """
    out: Dict[str, float] = {}
    with torch.no_grad():
        for name, mod in _prunable_modules(model):
            w = mod.weight
            out[f"{name}.weight" if name else "weight"] = float((w == 0).sum().item()) / max(1, w.numel())
    return out


def global_sparsity(model: nn.Module) -> float:
    """Fraction 0..1 of zeros over all Conv*d / Linear weights together
    (zeros summed over layers / elements summed over layers - the quantity that
    global magnitude pruning targets). 0.0 for a model without such layers."""
    zeros = 0
    total = 0
    with torch.no_grad():
        for _, mod in _prunable_modules(model):
            zeros += int((mod.weight == 0).sum().item())
            total += mod.weight.numel()
    return zeros / total if total else 0.0


def is_quantized(model: nn.Module) -> bool:
    """True when QAT has been applied (some submodule carries a ``qconfig`` or a
    ``FakeQuantize`` - the test SparseML's exporter uses for ``convert_qat``)."""
    for m in model.modules():
        if getattr(m, "qconfig", None) is not None or type(m).__name__ == "FakeQuantize":
            return True
    return False


def _count_steps(train_batches_fn: Callable[[int], Iterable], epoch: int) -> int:
    return sum(1 for _ in train_batches_fn(epoch))


def run_recipe(
    model: nn.Module,
    manager: ScheduledModifierManager,
    train_batches_fn: Callable[[int], Iterable[Tuple[torch.Tensor, torch.Tensor]]],
    eval_fn: Callable[[nn.Module], float],
    *,
    optimizer: torch.optim.Optimizer,
    on_pruning_end: Optional[Callable[[nn.Module], Any]] = None,
    log: Optional[Callable[[str], Any]] = print,
    steps_per_epoch: Optional[int] = None,
    loggers: Any = None,
) -> List[Dict[str, Any]]:
    """Train ``model`` under the recipe for ``manager.max_epochs`` epochs (in place).

    Args:
        model: torch module, float32; modified in place (pruned, then QAT modules
            swapped in if the recipe quantizes). Device: wherever it lives; batches
            are moved to the device of its first parameter.
        manager: from :func:`load_recipe`; must not have been used for another run.
        train_batches_fn: ``train_batches_fn(epoch)`` -> iterable of
            ``(x float32 (B, C, H, W), y int64 (B,))`` for that epoch.
        eval_fn: ``eval_fn(model)`` -> test accuracy, float 0..1 (it should put the
            model in eval mode itself; :func:`run_recipe` sets ``train()`` again).
        optimizer: a torch optimizer over ``model.parameters()`` (e.g. Adam); the
            recipe's LR modifiers overwrite its learning rate.
        on_pruning_end: called once as ``on_pruning_end(model)`` at the last point
            where the model is pruned but not quantized: just before the first
            optimizer step whose epoch is >= the recipe's QAT start (the start of
            that epoch for an integer QAT start; before ``modify`` when QAT starts
            at epoch <= 0). Without a QAT modifier: at the first step whose epoch is
            >= the pruning end. If that point lies at/after ``max_epochs`` it is
            called after the last epoch, before ``finalize``. The model is in train
            mode; the hook may switch it to eval, train mode is restored after.
        log: one-line progress messages (``None`` for silence).
        steps_per_epoch: optimizer steps per epoch. Default: counted by iterating
            ``train_batches_fn(0)`` once. Epochs that yield more batches are cut at
            this count; epochs that yield fewer are padded with
            ``emulated_step()`` so SparseML's epoch clock stays exact.
        loggers: SparseML loggers for the modifiers (a
            ``sparseml.pytorch.utils.LoggerManager`` or list of ``BaseLogger``).
            Default: one disabled ``PythonLogger`` bound to this module's logger,
            i.e. no modifier-level logging. (Passing nothing, or an empty
            ``LoggerManager`` - it is falsy - makes SparseML build its default
            ``PythonLogger``, which creates ``./sparse_logs/<date>.log`` in the
            current directory.)

    Returns:
        One dict per epoch: ``epoch`` (int), ``train_loss`` (mean cross-entropy over
        the epoch's batches, nats), ``test_acc`` (0..1, from ``eval_fn`` after the
        epoch), ``sparsity`` (:func:`global_sparsity`, 0..1), ``lr`` (learning rate
        of param group 0 at the end of the epoch), ``quantized`` (bool, QAT modules
        present), ``steps`` (real optimizer steps taken).

    Raises:
        ValueError: ``steps_per_epoch`` < 1, or ``train_batches_fn(0)`` is empty.
    """
    say = log or (lambda _msg: None)
    phases = recipe_phases(manager)
    max_epochs = phases["max_epochs"]
    if phases["qat_start_epoch"] is not None:
        hook_epoch = phases["qat_start_epoch"]
    elif phases["pruning_end_epoch"] is not None:
        hook_epoch = phases["pruning_end_epoch"]
    else:
        hook_epoch = math.inf

    if steps_per_epoch is None:
        steps_per_epoch = _count_steps(train_batches_fn, 0)
    if int(steps_per_epoch) < 1:
        raise ValueError(
            f"steps_per_epoch must be >= 1, got {steps_per_epoch} (is train_batches_fn(0) empty?)"
        )
    steps_per_epoch = int(steps_per_epoch)
    device = next(model.parameters()).device

    fired = False

    def fire(where: str) -> None:
        nonlocal fired
        if fired or on_pruning_end is None:
            fired = True
            return
        fired = True
        for mod in manager.pruning_modifiers:
            if getattr(mod, "initialized", False) and not mod.ended:
                say(
                    f"warning: pruning modifier not finished at {where} "
                    f"(end_epoch={mod.end_epoch}); snapshot sparsity {global_sparsity(model):.4f}"
                )
        was_training = model.training
        on_pruning_end(model)
        model.train(was_training)
        say(f"on_pruning_end at {where}: global sparsity {global_sparsity(model):.4f}")

    model.train()
    if hook_epoch <= 0:
        fire("epoch 0 (before modify)")
    if loggers is None:
        loggers = LoggerManager(
            [PythonLogger(logger=logging.getLogger(__name__ + ".sparseml"), enabled=False)],
            log_python=False,
        )
    wrapped = manager.modify(
        model, optimizer, steps_per_epoch=steps_per_epoch, epoch=0.0, loggers=loggers
    )

    history: List[Dict[str, Any]] = []
    for epoch in range(max_epochs):
        model.train()
        loss_sum = 0.0
        steps = 0
        for x, y in train_batches_fn(epoch):
            if steps >= steps_per_epoch:
                break
            if not fired and wrapped.wrapped_epoch >= hook_epoch:
                fire(f"epoch {wrapped.wrapped_epoch:g}")
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            wrapped.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss = wrapped.loss_update(loss)
            loss.backward()
            wrapped.step()
            loss_sum += float(loss.detach())
            steps += 1
        for _ in range(steps, steps_per_epoch):
            if not fired and wrapped.wrapped_epoch >= hook_epoch:
                fire(f"epoch {wrapped.wrapped_epoch:g}")
            wrapped.emulated_step()

        test_acc = float(eval_fn(model))
        model.train()
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / steps if steps else float("nan"),
            "test_acc": test_acc,
            "sparsity": global_sparsity(model),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "quantized": is_quantized(model),
            "steps": steps,
        }
        history.append(row)
        say(
            f"epoch {epoch + 1}/{max_epochs} loss {row['train_loss']:.4f} acc {test_acc:.4f} "
            f"sparsity {row['sparsity']:.4f} lr {row['lr']:.2e} qat {row['quantized']}"
        )

    if not fired:
        fire(f"end of training (epoch {max_epochs})")
    manager.finalize(model)
    return history
