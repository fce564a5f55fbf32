"""The recipe loop's checkpoint: what ``core.RecipeRun`` saves after every recipe epoch, and how a
rerun puts a fresh model, optimizer and SparseML manager back into that state.

The file is ``torch.save`` of a dict, written atomically and read back with
``torch.load(weights_only=True)`` (no code runs on load):

* ``format`` (``CHECKPOINT_FORMAT``), ``epoch`` (recipe epochs finished, int),
  ``steps_per_epoch``, ``max_epochs`` (ints; a resume must use the same);
* ``history`` (one dict per finished epoch, as ``RecipeRun.run`` returns them), ``fired``
  (whether ``on_pruning_end`` has been called), ``extra`` (the caller's dict of plain values);
* ``model``: ``model.state_dict()`` - the weights with the pruning zeros, BatchNorm statistics
  and, once QAT has started, the fake-quant scales, zero points and observer state (CPU tensors);
* ``optimizer``: ``optimizer.state_dict()`` (Adam moments, step counts, learning rates);
* ``manager``: ``ScheduledModifierManager.state_dict()`` - the pruning masks (float tensors of
  each pruned weight's shape, 1 = kept);
* ``rng``: the CPU torch RNG state (uint8 tensor).

Why ``restore`` replays steps (read from ``sparseml/pytorch/optim/manager.py`` and the
modifiers of SparseML 1.7): the modifiers' schedule state - pruning started/ended, the epoch of
the last mask update, QAT applied (conv-bn fused, fake-quant modules swapped in), BatchNorm
statistics frozen, observers disabled - is in no state_dict; it follows from the optimizer steps
taken so far. So a rerun wraps the optimizer as a fresh run does (``manager.modify(...,
epoch=0)``) and replays the finished steps with ``emulated_step()`` (every modifier update, no
real optimizer step): each modifier acts at the same steps as before, and the model is back in
its QAT-wrapped form with the same ``Parameter`` objects, so the optimizer's and the masks'
references stay valid. The replay's masks and learning rates come from the fresh weights; the
saved model, manager (masks), optimizer and RNG state are loaded over them last.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from study.files import atomic_output

__all__ = ["CHECKPOINT_FORMAT", "load_recipe_checkpoint", "restore", "same_recipe", "save_recipe_checkpoint"]

CHECKPOINT_FORMAT = "distill-sparsify/recipe-1"


def _cpu(value: Any) -> Any:
    """``value`` with every tensor (in dicts, lists, tuples) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return type(value)((k, _cpu(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def save_recipe_checkpoint(path: "str | os.PathLike", *, model: nn.Module,
                           optimizer: torch.optim.Optimizer, manager, epoch: int,
                           steps_per_epoch: int, max_epochs: int, history: List[Dict[str, Any]],
                           fired: bool, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write the recipe's state after ``epoch`` finished epochs to ``path`` (atomically: a
    reader sees the previous checkpoint or this one, never a partial file). Content: module
    docstring. ``extra`` must hold plain values only (str, int, float, bool, None, lists,
    dicts): ``load_recipe_checkpoint`` reads with ``weights_only=True``."""
    payload = {
        "format": CHECKPOINT_FORMAT, "epoch": int(epoch), "steps_per_epoch": int(steps_per_epoch),
        "max_epochs": int(max_epochs), "history": [dict(row) for row in history],
        "fired": bool(fired), "extra": dict(extra or {}),
        "model": _cpu(model.state_dict()), "optimizer": _cpu(optimizer.state_dict()),
        "manager": _cpu(manager.state_dict()), "rng": torch.get_rng_state(),
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_recipe_checkpoint(path: "str | os.PathLike") -> Optional[Dict[str, Any]]:
    """The checkpoint dict at ``path`` (see the module docstring), or None when there is no
    file. Raises ValueError (one line naming ``path``) for a file that is not a readable
    checkpoint of this format."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        with warnings.catch_warnings():
            # torch 2.1's weights_only unpickler touches TypedStorage and warns about it.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip/EOF errors all mean "not readable"
        raise ValueError(f"recipe checkpoint {path!r} is unreadable "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "delete it to start the recipe from epoch 0") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"recipe checkpoint {path!r} is not a {CHECKPOINT_FORMAT!r} file; "
                         "delete it to start the recipe from epoch 0")
    return state


def same_recipe(state: Optional[Dict[str, Any]], recipe_sha256: str, path: "str | os.PathLike",
                log=print) -> Optional[Dict[str, Any]]:
    """``state`` (from ``load_recipe_checkpoint``) when it was saved under the recipe whose sha256 is
    ``recipe_sha256`` (``state["extra"]["recipe_sha256"]``), else None - the recipe starts again from
    epoch 0 - with one ``log`` line naming ``path`` and both digests (a checkpoint that records no
    recipe digest counts as another recipe)."""
    if state is None:
        return None
    before = (state.get("extra") or {}).get("recipe_sha256")
    if before == recipe_sha256:
        return state
    shown = before[:4] + "\u2026" if before else "unrecorded"
    log(f"[sparsify] {path} was saved under another recipe (sha256 {shown} -> {recipe_sha256[:4]}\u2026): "
        "starting the recipe from epoch 0")
    return None


def restore(state: Dict[str, Any], *, wrapped, model: nn.Module, optimizer: torch.optim.Optimizer,
            manager, steps_per_epoch: int, max_epochs: int) -> None:
    """Put ``model``, ``optimizer`` and ``manager`` into the state ``state`` was saved in.

    Args:
        state: from ``load_recipe_checkpoint``.
        wrapped: the fresh ``manager.modify(model, optimizer, steps_per_epoch, epoch=0.0)``
            wrapper, no step taken yet; ``state["epoch"] * steps_per_epoch`` emulated steps are
            replayed on it (module docstring).
        model, optimizer, manager: the objects ``wrapped`` wraps, built exactly as in the run
            that saved ``state`` (same recipe, same model and optimizer construction).
        steps_per_epoch, max_epochs: this run's; must equal the saved ones.

    Raises:
        ValueError (one line): the checkpoint was saved with another ``steps_per_epoch`` or
            ``max_epochs`` (another batch size, data subset or recipe length), or its weights,
            masks or optimizer state do not fit the model.
    """
    for key, value in (("steps_per_epoch", steps_per_epoch), ("max_epochs", max_epochs)):
        if state[key] != value:
            raise ValueError(f"recipe checkpoint was saved with {key}={state[key]}, this run has "
                             f"{value}; delete it to start the recipe from epoch 0")
    if wrapped.wrapped_steps != 0:
        raise ValueError(f"restore needs a fresh wrapper, this one has taken {wrapped.wrapped_steps} steps")
    for _ in range(int(state["epoch"]) * steps_per_epoch):
        wrapped.emulated_step()
    device = next(model.parameters()).device
    try:
        model.load_state_dict(state["model"], strict=True)
        manager.load_state_dict({key: _on(device, masks) for key, masks in state["manager"].items()})
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, IndexError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ValueError(f"recipe checkpoint does not fit this model/recipe ({detail}); "
                         "delete it to start the recipe from epoch 0") from None
    torch.set_rng_state(state["rng"])


def _on(device: torch.device, value: Any) -> Any:
    """``value`` with every tensor (in dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return type(value)((k, _on(device, v)) for k, v in value.items())
    return value
