"""Stage 3: the best student through the SparseML recipe, exported to ONNX.

``sparsify_student`` is a plain function; ``orchestrate.py`` runs it as a Ray task on the
training device (``ray.remote(num_gpus=..., num_cpus=...)``). No stopping rule applies here:
the recipe's epochs rule. The fine-tuning and QAT loss is ``loss``: by default (``--sparsify-loss
setup``) the winning setup's own, through the students' ``trainables.train.student_loss`` with the
frozen teacher (soft targets at the students' temperature; for ``kd_feat`` also the layer1/2/4
feature MSE, the student's feature maps read by hooks so they follow SparseML's QAT module swap), or
cross-entropy to the labels (``ce``). On a GPU with bf16 the epochs before QAT run under bf16
autocast, QAT epochs in float32 (fake-quant needs it).

Outputs under ``output_dir`` (paths from ``study.RunLayout``; each written atomically):
``onnx/dense.onnx`` (the student as trained), ``onnx/pruned.onnx`` (FP32, saved when pruning ends,
before QAT), ``onnx/pruned_quantized.onnx`` (``convert_qat=True``: INT8 ConvInteger/QLinearConv),
each with ``metadata_props`` describing its input, output and origin (``export.model_metadata``);
``sparsify/history.csv`` (per recipe epoch), ``sparsify/layer_sparsity.csv`` (per prunable layer
of the pruned model) and ``sparsify/summary.json`` (written last: its presence marks the stage done;
it records each ONNX file's sha256, which later stages and resumed runs check).

Interrupted? ``sparsify/recipe_checkpoint.pt`` holds the state after the latest finished recipe
epoch (``trainables.compress.checkpoint``); a rerun continues from there, checking that the ONNX files
already exported are unchanged. It is deleted once ``summary.json`` is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from models import load_checkpoint
from study import ONNX_MODELS, SETUPS, RunLayout
from study.files import atomic_write_text, check_digests, sha256_file
from trainables.batches import train_batches
from trainables.data import CIFAR10Tensors
from trainables.compress.export import export_model_onnx, model_metadata
from trainables.compress.checkpoint import load_recipe_checkpoint
from trainables.compress.core import (global_sparsity, is_quantized, load_recipe, run_recipe,
                                      weight_sparsity)
from trainables.train import MODEL_FILE, autocast, evaluate, frozen_teacher, pick_device, student_loss


def sparsify_student(checkpoint, data: CIFAR10Tensors, *, recipe: str, recipe_epochs: float,
                     batch_size: int, seed: int, threads: int, output_dir: str,
                     trial_id: str = "", setup: str = "", loss: str = "ce",
                     teacher: dict | None = None, temperature: float = 4.0) -> dict:
    """Prune + quantize the student in ``checkpoint`` with ``recipe``; export three ONNX models.

    Args:
        checkpoint: a ``ray.train.Checkpoint`` (or a folder path) holding ``model.pt`` as written by
            the student trainable.
        data: CIFAR-10 uint8 tensors (train (N,3,32,32), test (M,3,32,32)) of the run.
        recipe: SparseML recipe YAML; ``recipe_epochs`` overrides its ``num_epochs`` variable.
        batch_size, seed: as in the student trials (same augmentation stream).
        threads: torch intra-op threads (the task's CPU share).
        output_dir: the run directory.
        trial_id, setup: the Tune trial the checkpoint comes from and its setup (recorded in the
            summary and in each ONNX file's metadata).
        loss: the setup whose loss the recipe trains with (``study.SETUPS``: ``ce``, ``kd``,
            ``kd_feat``; ``trainables.losses.distillation_loss``).
        teacher: the frozen teacher's checkpoint payload (``torch.load`` of ``teacher.pt``);
            needed unless ``loss`` is ``ce``.
        temperature: softmax temperature T of the soft targets (> 0; the students' value).

    Returns:
        The summary dict (also ``sparsify/summary.json``): ``trial_id``, ``setup``, ``loss`` (the
        setup whose loss the recipe trained with), ``temperature`` (None for ``ce``), ``arch``,
        ``recipe``, ``recipe_epochs``, ``test_acc_dense``, ``test_acc_pruned``,
        ``test_acc_pruned_quantized`` (0..1), ``weight_sparsity_pruned``,
        ``weight_sparsity_pruned_quantized`` (fraction 0..1 of prunable conv/linear weights that
        are zero), ``epoch_seconds_before_qat`` / ``epoch_seconds_qat`` (mean wall seconds per
        recipe epoch without / with QAT modules; None when the recipe has no such epoch),
        ``onnx`` (name -> path), ``sha256`` (name -> hex digest of that file).

    Raises:
        ValueError: the recipe is missing, not YAML, or names an unknown modifier
            (``load_recipe``); the checkpoint is not a student checkpoint of this project;
            ``loss`` is unknown or needs a teacher that is missing; a recipe checkpoint from an
            interrupted attempt is unreadable, belongs to another trial, loss or recipe length,
            or an ONNX file it recorded has changed (one line each).
    """
    manager = load_recipe(recipe, num_epochs=recipe_epochs)  # fail before any work
    if loss not in SETUPS:
        raise ValueError(f"loss {loss!r} is unknown; allowed: {', '.join(SETUPS)}")
    if loss != "ce" and teacher is None:
        raise ValueError(f"loss {loss!r} needs the teacher's checkpoint payload; got None")
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, int(threads)))
    device = pick_device()
    if hasattr(checkpoint, "as_directory"):  # ray.train.Checkpoint
        with checkpoint.as_directory() as folder:
            model, meta = load_checkpoint(Path(folder) / MODEL_FILE)
    else:
        model, meta = load_checkpoint(Path(checkpoint) / MODEL_FILE)
    model.to(device)
    layout = RunLayout(output_dir)
    setup = setup or (meta.get("extra") or {}).get("setup")
    resume = load_recipe_checkpoint(layout.sparsify_checkpoint)

    def accuracy(m):  # float32 once fake-quant modules are in
        return evaluate(m, data.test_images, data.test_labels, batch_size, device, amp=not is_quantized(m))

    def export(variant, m, test_acc, convert_qat=False):
        path = layout.onnx(variant)
        export_model_onnx(m, path, convert_qat=convert_qat, metadata=model_metadata(
            variant=variant, arch=meta["arch"], stem=meta["stem"], source_trial=trial_id, setup=setup,
            recipe=recipe, recipe_epochs=recipe_epochs, recipe_loss=None if variant == "dense" else loss,
            weight_sparsity=global_sparsity(m),
            test_acc=test_acc))
        state["sha256"][variant] = sha256_file(path)

    if resume is None:
        state = {"trial_id": trial_id, "loss": loss, "test_acc_dense": accuracy(model), "sha256": {}}
        export("dense", model, state["test_acc_dense"])
    else:  # an interrupted attempt: its exports must be the files it made
        state = resume["extra"]
        if state.get("trial_id") != trial_id:
            raise ValueError(f"{layout.sparsify_checkpoint} belongs to trial {state.get('trial_id')!r}, "
                             f"not {trial_id!r}; delete it to run the recipe from epoch 0")
        trained_with = state.get("loss", "ce")  # no key: an attempt from before --sparsify-loss
        if trained_with != loss:
            raise ValueError(f"{layout.sparsify_checkpoint} was trained with loss {trained_with!r}, "
                             f"not {loss!r}; delete it to run the recipe from epoch 0")
        check_digests(state["sha256"], {name: layout.onnx(name) for name in state["sha256"]},
                      remedy=f"delete {layout.sparsify_checkpoint} to run the recipe from epoch 0")

    def on_pruning_end(m):
        layers = weight_sparsity(m)
        weights = dict(m.named_parameters())
        state["pruned"] = {"test_acc": accuracy(m), "layers": layers, "sparsity": global_sparsity(m),
                           "params": {name: weights[name].numel() for name in layers}}
        export("pruned", m, state["pruned"]["test_acc"])

    train_images, train_labels = data.train_images.to(device), data.train_labels.to(device)
    loss_fn = student_loss(loss, model, None if loss == "ce" else frozen_teacher(teacher, device),
                           temperature, trace_student=False)
    history = run_recipe(
        model, manager,
        lambda epoch: train_batches(train_images, train_labels, batch_size, seed=seed,
                                    epoch=epoch, device=device),
        accuracy, optimizer=torch.optim.Adam(model.parameters()), on_pruning_end=on_pruning_end,
        autocast=autocast, checkpoint_path=layout.sparsify_checkpoint, resume=resume, extra=state,
        loss_fn=loss_fn)
    test_acc_quantized = accuracy(model)
    export("pruned_quantized", model, test_acc_quantized, convert_qat=True)

    pruned = state["pruned"]
    layer_table = pd.DataFrame({"layer": list(pruned["layers"]), "params": list(pruned["params"].values()),
                                "sparsity": list(pruned["layers"].values())})
    atomic_write_text(layout.layer_sparsity, layer_table.to_csv(index=False))
    table = pd.DataFrame(history)
    atomic_write_text(layout.sparsify_history, table.to_csv(index=False))
    seconds = table.groupby("quantized")["epoch_seconds"].mean()
    summary = {
        "trial_id": trial_id, "setup": setup, "loss": loss,
        "temperature": None if loss == "ce" else temperature, "arch": meta["arch"], "recipe": str(recipe),
        "recipe_epochs": recipe_epochs, "test_acc_dense": state["test_acc_dense"],
        "test_acc_pruned": pruned["test_acc"], "weight_sparsity_pruned": pruned["sparsity"],
        "test_acc_pruned_quantized": test_acc_quantized,
        "weight_sparsity_pruned_quantized": global_sparsity(model),
        "epoch_seconds_before_qat": float(seconds[False]) if False in seconds else None,
        "epoch_seconds_qat": float(seconds[True]) if True in seconds else None,
        "onnx": {name: str(layout.onnx(name)) for name in ONNX_MODELS},
        "sha256": {name: state["sha256"][name] for name in ONNX_MODELS},
    }
    atomic_write_text(layout.sparsify_summary, json.dumps(summary, indent=2))
    layout.sparsify_checkpoint.unlink(missing_ok=True)  # done: nothing left to resume
    return summary
