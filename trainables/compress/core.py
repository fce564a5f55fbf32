"""Recipe-driven sparsification core: run a SparseML recipe (``trainables.compress.recipe`` loads it),
checkpoint it after every recipe epoch and resume it, measure sparsity.

Pure torch + SparseML 1.7 (no Ray); the Ray task in ``trainables.compress.sparsify`` wraps :class:`RecipeRun`.

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
  where :class:`RecipeRun` calls ``on_pruning_end`` (for an integer
  ``qat_start_epoch``, the start of that epoch).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS before SparseML is imported)
import trainables.compress.compat  # noqa: F401  (SparseML 1.7 on newer torch; before SparseML is imported)
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.pytorch.utils import LoggerManager, PythonLogger
from trainables.compress.recipe import RECIPE_EXTENSIONS, check_pruning_window, load_recipe, recipe_phases
from trainables.compress.checkpoint import restore, save_recipe_checkpoint

__all__ = [
    "RECIPE_EXTENSIONS",
    "load_recipe",
    "recipe_phases",
    "RecipeRun",
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


def _quiet_loggers() -> LoggerManager:
    """One disabled ``PythonLogger`` for the modifiers: no modifier-level logging. (No loggers, or
    an empty ``LoggerManager`` - it is falsy - make SparseML build its default ``PythonLogger``,
    which creates ``./sparse_logs/<date>.log`` in the current directory.)"""
    return LoggerManager(
        [PythonLogger(logger=logging.getLogger(__name__ + ".sparseml"), enabled=False)],
        log_python=False,
    )


class RecipeRun:
    """One SparseML recipe applied to one model, epoch by epoch, in place: the model, the
    recipe's ``manager``, the optimizer it wraps, the per-epoch ``history`` and whether the
    pruning-end hook has run (``fired``).

    Use: ``RecipeRun(...)``, then :meth:`start` (or :meth:`resume` from a recipe checkpoint),
    :meth:`train_epoch` until ``epoch == max_epochs`` (:meth:`save` after each to checkpoint),
    then :meth:`finish`; :meth:`run` does all of that.

    Args:
        model: torch module, float32; modified in place (pruned, then QAT modules swapped in if
            the recipe quantizes). Batches are moved to the device of its first parameter.
        manager: from :func:`load_recipe`; must not have been used for another run.
        optimizer: a torch optimizer over ``model.parameters()`` (e.g. Adam); the recipe's LR
            modifiers overwrite its learning rate.
        train_batches: ``train_batches(epoch)`` -> iterable of ``(x float32 (B, C, H, W),
            y int64 (B,))`` for that epoch.
        evaluate: ``evaluate(model)`` -> test accuracy, float 0..1 (it may switch the model to
            eval mode; train mode is set again after).
        steps_per_epoch: optimizer steps per epoch. Default: counted by iterating
            ``train_batches(0)`` once. Epochs that yield more batches are cut at this count;
            epochs that yield fewer are padded with ``emulated_step()`` so SparseML's epoch
            clock stays exact.
        loss_fn: ``loss_fn(x, y) -> (loss, terms)`` on a batch already on the model's device:
            ``loss`` a 0-d float tensor with gradient w.r.t. ``model``, ``terms`` name ->
            detached 0-d tensor (e.g. ``trainables.student.student_loss``). It must call ``model``
            itself, so that it runs what the model is at that step (QAT modules included).
            None: cross-entropy of ``model(x)`` to ``y``, one term ``ce``.
        autocast: ``autocast(device)`` -> the context the forward pass and loss run in, used
            only in epochs that end before the recipe's QAT start (fake-quant needs float32).
            E.g. ``trainables.train.autocast``. None: float32 throughout.
        on_pruning_end: called once as ``on_pruning_end(model)`` at the last point where the
            model is pruned but not quantized: just before the first optimizer step whose epoch
            is >= the recipe's QAT start (the start of that epoch for an integer QAT start;
            before ``modify`` when QAT starts at epoch <= 0). Without a QAT modifier: at the
            first step whose epoch is >= the pruning end. If that point lies at/after
            ``max_epochs``: in :meth:`finish`, before ``finalize``. The model is in train mode;
            the hook may switch it to eval, train mode is restored after.
        log: one-line progress messages (``None`` for silence).

    Raises:
        ValueError: ``steps_per_epoch`` < 1 or ``train_batches(0)`` is empty; no optimizer step
            falls between the end of pruning and the start of QAT (``recipe.check_pruning_window``).
    """

    def __init__(self, model: nn.Module, manager: ScheduledModifierManager,
                 optimizer: torch.optim.Optimizer,
                 train_batches: Callable[[int], Iterable[Tuple[torch.Tensor, torch.Tensor]]],
                 evaluate: Callable[[nn.Module], float], *,
                 steps_per_epoch: Optional[int] = None,
                 loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor],
                                            Tuple[torch.Tensor, Dict[str, torch.Tensor]]]] = None,
                 autocast: Optional[Callable[[torch.device], ContextManager]] = None,
                 on_pruning_end: Optional[Callable[[nn.Module], Any]] = None,
                 log: Optional[Callable[[str], Any]] = print) -> None:
        phases = recipe_phases(manager)
        qat_start, pruning_end = phases["qat_start_epoch"], phases["pruning_end_epoch"]
        if steps_per_epoch is None:
            steps_per_epoch = sum(1 for _ in train_batches(0))
        if int(steps_per_epoch) < 1:
            raise ValueError(
                f"steps_per_epoch must be >= 1, got {steps_per_epoch} (is train_batches_fn(0) empty?)"
            )
        note = check_pruning_window(phases, int(steps_per_epoch))  # ValueError before any step
        self.model, self.manager, self.optimizer = model, manager, optimizer
        self.train_batches, self.evaluate = train_batches, evaluate
        self.steps_per_epoch = int(steps_per_epoch)
        self.max_epochs: int = phases["max_epochs"]
        #: the epoch (fractional) at which ``on_pruning_end`` is due; inf: at the end
        self.hook_epoch = (qat_start if qat_start is not None
                           else pruning_end if pruning_end is not None else math.inf)
        self.qat_start = math.inf if qat_start is None else qat_start
        self.loss_fn = loss_fn or self._cross_entropy
        self.autocast, self.on_pruning_end = autocast, on_pruning_end
        self.say = log or (lambda _msg: None)
        self.device = next(model.parameters()).device
        self.wrapped = None  # the manager's optimizer wrapper, from start()
        self.history: List[Dict[str, Any]] = []
        self.epoch = 0  # recipe epochs finished
        self.fired = False  # on_pruning_end has been called (or was due without a hook)
        if note:
            self.say(note)

    def _cross_entropy(self, x: torch.Tensor, y: torch.Tensor):
        ce = F.cross_entropy(self.model(x), y)
        return ce, {"ce": ce.detach()}

    def start(self) -> None:
        """Wrap the optimizer (``manager.modify``, epoch 0), after calling the hook if it is
        due at epoch 0 (QAT from epoch <= 0). No step is taken."""
        self.model.train()
        self._pruning_end_if_due(0.0, "epoch 0 (before modify)")
        self.wrapped = self.manager.modify(self.model, self.optimizer, steps_per_epoch=self.steps_per_epoch,
                                           epoch=0.0, loggers=_quiet_loggers())

    def resume(self, state: Dict[str, Any]) -> None:
        """:meth:`start`, then continue from ``state`` (``load_recipe_checkpoint``): its
        finished epochs are not trained again, their history rows are kept, and the model,
        optimizer and manager continue from the saved state (they must be built as in the run
        that saved it; ``trainables.compress.checkpoint.restore``).

        Raises:
            ValueError (one line): ``state`` was saved with another ``steps_per_epoch`` or
                ``max_epochs``, or does not fit the model.
        """
        self.fired = bool(state["fired"])
        self.start()
        restore(state, wrapped=self.wrapped, model=self.model, optimizer=self.optimizer,
                manager=self.manager, steps_per_epoch=self.steps_per_epoch, max_epochs=self.max_epochs)
        self.history, self.epoch = [dict(row) for row in state["history"]], int(state["epoch"])
        self.say(f"resumed the recipe after epoch {self.epoch}/{self.max_epochs} from its checkpoint")

    def _pruning_end_if_due(self, epoch: float, where: str) -> None:
        """Call ``on_pruning_end`` if it has not run and ``epoch`` (the wrapper's fractional
        epoch) has reached ``hook_epoch``; ``where`` names the point in the log line."""
        if self.fired or epoch < self.hook_epoch:
            return
        self.fired = True
        if self.on_pruning_end is None:
            return
        model = self.model
        for mod in self.manager.pruning_modifiers:
            if getattr(mod, "initialized", False) and not mod.ended:
                self.say(
                    f"warning: pruning modifier not finished at {where} "
                    f"(end_epoch={mod.end_epoch}); snapshot sparsity {global_sparsity(model):.4f}"
                )
        was_training = model.training
        self.on_pruning_end(model)
        model.train(was_training)
        self.say(f"on_pruning_end at {where}: global sparsity {global_sparsity(model):.4f}")

    def train_epoch(self) -> Dict[str, Any]:
        """Train recipe epoch ``self.epoch`` (``steps_per_epoch`` optimizer steps, real or
        emulated), evaluate, append its history row and return it (keys: :meth:`run`)."""
        epoch, model, wrapped, device = self.epoch, self.model, self.wrapped, self.device
        t0 = time.perf_counter()
        model.train()
        # Reduced precision only for epochs that end before QAT starts: fake-quant needs float32.
        amp = self.autocast is not None and epoch + 1 <= self.qat_start
        precision = _precision(self.autocast(device)) if amp else "float32"
        loss_sum = torch.zeros((), device=device)
        term_sums: Dict[str, torch.Tensor] = {}  # summed on the device, read once per epoch
        steps = 0
        # exactly steps_per_epoch steps: the epoch's batches, then None (an emulated step) if short
        batches = itertools.chain(itertools.islice(self.train_batches(epoch), self.steps_per_epoch),
                                  itertools.repeat(None))
        for batch in itertools.islice(batches, self.steps_per_epoch):
            self._pruning_end_if_due(wrapped.wrapped_epoch, f"epoch {wrapped.wrapped_epoch:g}")
            if batch is None:
                wrapped.emulated_step()
                continue
            x, y = (t.to(device, non_blocking=True) for t in batch)
            wrapped.zero_grad(set_to_none=True)
            with self.autocast(device) if amp else contextlib.nullcontext():
                loss, terms = self.loss_fn(x, y)
            loss = wrapped.loss_update(loss)
            loss.backward()
            wrapped.step()
            loss_sum += loss.detach().float()
            for name, value in terms.items():
                term_sums[name] = term_sums[name] + value if name in term_sums else value.float()
            steps += 1

        test_acc = float(self.evaluate(model))
        model.train()
        row = {
            "epoch": epoch,
            "train_loss": float(loss_sum) / steps if steps else float("nan"),
            **{f"loss_{name}": float(total) / steps for name, total in term_sums.items()},
            "test_acc": test_acc,
            "sparsity": global_sparsity(model),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "quantized": is_quantized(model),
            "steps": steps,
            "precision": precision,
            "epoch_seconds": time.perf_counter() - t0,
        }
        self.history.append(row)
        self.epoch += 1
        self.say(
            f"recipe epoch {self.epoch}/{self.max_epochs}: loss {row['train_loss']:.4f} acc {test_acc:.4f} "
            f"sparsity {row['sparsity']:.4f} lr {row['lr']:.2e} qat {row['quantized']} "
            f"{precision} {row['epoch_seconds']:.1f} s"
        )
        return row

    def save(self, path: "str | os.PathLike", extra: Optional[Dict[str, Any]] = None) -> None:
        """Checkpoint the state after the finished epochs to ``path`` (atomically;
        ``trainables.compress.checkpoint``), with ``extra``: a dict of plain values the caller
        reads back from the checkpoint's ``"extra"`` on resume."""
        save_recipe_checkpoint(path, model=self.model, optimizer=self.optimizer, manager=self.manager,
                               epoch=self.epoch, steps_per_epoch=self.steps_per_epoch,
                               max_epochs=self.max_epochs, history=self.history, fired=self.fired,
                               extra=extra)

    def finish(self) -> List[Dict[str, Any]]:
        """Call the hook if it has not run yet, ``manager.finalize`` the model; the history."""
        self._pruning_end_if_due(math.inf, f"end of training (epoch {self.max_epochs})")
        self.manager.finalize(self.model)
        return self.history

    def run(self, *, checkpoint_path: "str | os.PathLike | None" = None,
            resume: Optional[Dict[str, Any]] = None,
            extra: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        """The whole recipe: :meth:`start` (or :meth:`resume` from ``resume``), every remaining
        epoch (checkpointed to ``checkpoint_path`` with ``extra`` after each, unless None),
        :meth:`finish`.

        Returns:
            One dict per epoch: ``epoch`` (int), ``train_loss`` (mean of ``loss_fn``'s loss
            over the epoch's batches; cross-entropy by default, nats), ``loss_<term>`` (mean of
            each term), ``test_acc`` (0..1, from ``evaluate`` after the epoch), ``sparsity``
            (:func:`global_sparsity`, 0..1), ``lr`` (learning rate of param group 0 at the end
            of the epoch), ``quantized`` (bool, QAT modules present), ``steps`` (real optimizer
            steps taken), ``precision`` (``bfloat16`` when ``autocast`` gave a bf16 autocast
            context that epoch, else ``float32``), ``epoch_seconds`` (wall seconds of the
            epoch's training and evaluation).

        Raises:
            ValueError: ``resume`` was saved with another ``steps_per_epoch``/``max_epochs``
                or does not fit the model (:meth:`resume`).
        """
        if resume is None:
            self.start()
        else:
            self.resume(resume)
        while self.epoch < self.max_epochs:
            self.train_epoch()
            if checkpoint_path is not None:
                self.save(checkpoint_path, extra)
        return self.finish()


def _precision(context: ContextManager) -> str:
    """``bfloat16``/``float16`` for an enabled ``torch.autocast`` context, else ``float32``."""
    if isinstance(context, torch.autocast) and getattr(context, "_enabled", True):
        return str(context.fast_dtype).replace("torch.", "")
    return "float32"
