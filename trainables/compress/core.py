"""Recipe-driven sparsification core: run a SparseML recipe (``trainables.compress.recipe`` loads it),
checkpoint it after every recipe epoch and resume it, measure sparsity.

Pure torch + SparseML 1.7 (no Ray); the Ray task in ``trainables.compress.sparsify`` wraps these.

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

import contextlib
import logging
import math
import os
import time
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS before SparseML is imported)
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.pytorch.utils import LoggerManager, PythonLogger
from trainables.compress.recipe import RECIPE_EXTENSIONS, load_recipe, recipe_phases
from trainables.compress.checkpoint import restore, save_recipe_checkpoint

__all__ = [
    "RECIPE_EXTENSIONS",
    "load_recipe",
    "recipe_phases",
    "run_recipe",
    "weight_sparsity",
    "global_sparsity",
    "is_quantized",
]


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
    autocast: Optional[Callable[[torch.device], ContextManager]] = None,
    checkpoint_path: "str | os.PathLike | None" = None,
    resume: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor],
                               Tuple[torch.Tensor, Dict[str, torch.Tensor]]]] = None,
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
        autocast: ``autocast(device)`` -> the context the forward pass and loss run in, used
            only in epochs that end before the recipe's QAT start (fake-quant needs float32;
            SparseML's pruning masks work under any dtype). E.g. ``trainables.train.autocast``:
            bf16 on a GPU that supports it, a no-op elsewhere. None: float32 throughout.
        checkpoint_path: where the state after every finished epoch is saved
            (``trainables.compress.checkpoint``, atomically); None: no checkpoints.
        resume: a checkpoint dict (``load_recipe_checkpoint``) to continue from: the
            finished epochs are not trained again, their history rows are kept, and the
            model, optimizer and manager continue from the saved state (the model,
            optimizer and manager passed in must be built as in the run that saved it).
        extra: a dict of plain values saved with every checkpoint (e.g. what
            ``on_pruning_end`` measured); on resume the caller reads it back from
            ``resume["extra"]``.
        loss_fn: ``loss_fn(x, y) -> (loss, terms)`` on a batch already on the model's
            device: ``loss`` a 0-d float tensor with gradient w.r.t. ``model``, ``terms``
            name -> detached 0-d tensor (e.g. ``trainables.train.student_loss``, whose
            summands are ``trainables.losses.TERM_NAMES``). It must call ``model`` itself
            so that it runs what the model is at that step (QAT modules included). None:
            cross-entropy of ``model(x)`` to ``y``, one term ``ce``.

    Returns:
        One dict per epoch: ``epoch`` (int), ``train_loss`` (mean of ``loss_fn``'s loss
        over the epoch's batches; cross-entropy by default, nats), ``loss_<term>`` (mean of
        each term), ``test_acc`` (0..1, from ``eval_fn`` after the
        epoch), ``sparsity`` (:func:`global_sparsity`, 0..1), ``lr`` (learning rate
        of param group 0 at the end of the epoch), ``quantized`` (bool, QAT modules
        present), ``steps`` (real optimizer steps taken), ``precision`` (``bfloat16``
        when ``autocast`` gave a bf16 autocast context that epoch, else ``float32``),
        ``epoch_seconds`` (wall seconds of the epoch's training and evaluation).

    Raises:
        ValueError: ``steps_per_epoch`` < 1, ``train_batches_fn(0)`` is empty, or
            ``resume`` was saved with another ``steps_per_epoch``/``max_epochs`` or
            does not fit the model.
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
    qat_start = math.inf if phases["qat_start_epoch"] is None else phases["qat_start_epoch"]

    if steps_per_epoch is None:
        steps_per_epoch = _count_steps(train_batches_fn, 0)
    if int(steps_per_epoch) < 1:
        raise ValueError(
            f"steps_per_epoch must be >= 1, got {steps_per_epoch} (is train_batches_fn(0) empty?)"
        )
    steps_per_epoch = int(steps_per_epoch)
    device = next(model.parameters()).device
    if loss_fn is None:
        def loss_fn(x, y):
            ce = F.cross_entropy(model(x), y)
            return ce, {"ce": ce.detach()}

    fired = bool(resume and resume["fired"])

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
    start = 0
    if resume is not None:
        restore(resume, wrapped=wrapped, model=model, optimizer=optimizer, manager=manager,
                steps_per_epoch=steps_per_epoch, max_epochs=max_epochs)
        history, start = [dict(row) for row in resume["history"]], int(resume["epoch"])
        say(f"resumed the recipe after epoch {start}/{max_epochs} from its checkpoint")
    for epoch in range(start, max_epochs):
        t0 = time.perf_counter()
        model.train()
        # Reduced precision only for epochs that end before QAT starts: fake-quant needs float32.
        amp = autocast is not None and epoch + 1 <= qat_start
        precision = _precision(autocast(device)) if amp else "float32"
        loss_sum = torch.zeros((), device=device)
        term_sums: Dict[str, torch.Tensor] = {}  # summed on the device, read once per epoch
        steps = 0
        for x, y in train_batches_fn(epoch):
            if steps >= steps_per_epoch:
                break
            if not fired and wrapped.wrapped_epoch >= hook_epoch:
                fire(f"epoch {wrapped.wrapped_epoch:g}")
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            wrapped.zero_grad(set_to_none=True)
            with autocast(device) if amp else contextlib.nullcontext():
                loss, terms = loss_fn(x, y)
            loss = wrapped.loss_update(loss)
            loss.backward()
            wrapped.step()
            loss_sum += loss.detach().float()
            for name, value in terms.items():
                term_sums[name] = term_sums[name] + value if name in term_sums else value.float()
            steps += 1
        for _ in range(steps, steps_per_epoch):
            if not fired and wrapped.wrapped_epoch >= hook_epoch:
                fire(f"epoch {wrapped.wrapped_epoch:g}")
            wrapped.emulated_step()

        test_acc = float(eval_fn(model))
        model.train()
        row = {
            "epoch": epoch,
            "train_loss": float(loss_sum) / steps if steps else float("nan"),
            **{f"loss_{name}": float(total) / steps for name, total in term_sums.items()},
            "test_acc": test_acc,
            "sparsity": global_sparsity(model),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "quantized": is_quantized(model),
            "steps": steps,
            "precision": precision,
            "epoch_seconds": time.perf_counter() - t0,
        }
        history.append(row)
        say(
            f"recipe epoch {epoch + 1}/{max_epochs}: loss {row['train_loss']:.4f} acc {test_acc:.4f} "
            f"sparsity {row['sparsity']:.4f} lr {row['lr']:.2e} qat {row['quantized']} "
            f"{precision} {row['epoch_seconds']:.1f} s"
        )
        if checkpoint_path is not None:
            save_recipe_checkpoint(checkpoint_path, model=model, optimizer=optimizer, manager=manager,
                                   epoch=epoch + 1, steps_per_epoch=steps_per_epoch,
                                   max_epochs=max_epochs, history=history, fired=fired, extra=extra)

    if not fired:
        fire(f"end of training (epoch {max_epochs})")
    manager.finalize(model)
    return history


def _precision(context: ContextManager) -> str:
    """``bfloat16``/``float16`` for an enabled ``torch.autocast`` context, else ``float32``."""
    if isinstance(context, torch.autocast) and getattr(context, "_enabled", True):
        return str(context.fast_dtype).replace("torch.", "")
    return "float32"
