"""Stage 3: the best student through the SparseML recipe, exported to ONNX.

``sparsify_student`` is a plain function; ``orchestrate.py`` runs it as a Ray task on the
training device (``ray.remote(num_gpus=..., num_cpus=...)``). No stopping rule applies here:
the recipe's epochs rule. The fine-tuning loss is cross-entropy to the labels.

Outputs under ``output_dir`` (paths from ``study.RunLayout``; each written atomically):
``onnx/dense.onnx`` (the student as trained), ``onnx/pruned.onnx`` (FP32, saved when pruning ends,
before QAT), ``onnx/pruned_quantized.onnx`` (``convert_qat=True``: INT8 ConvInteger/QLinearConv),
``sparsify/history.csv`` (per recipe epoch), ``sparsify/layer_sparsity.csv`` (per prunable layer
of the pruned model) and ``sparsify/summary.json`` (written last: its presence marks the stage done).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from models import load_checkpoint
from study import ONNX_MODELS, RunLayout
from study.files import atomic_write_text
from trainables.batches import train_batches
from trainables.data import CIFAR10Tensors
from trainables.export import export_model_onnx
from trainables.sparsify_core import global_sparsity, load_recipe, run_recipe, weight_sparsity
from trainables.train import MODEL_FILE, evaluate, pick_device


def sparsify_student(checkpoint, data: CIFAR10Tensors, *, recipe: str, recipe_epochs: float,
                     batch_size: int, seed: int, threads: int, output_dir: str,
                     trial_id: str = "", setup: str = "") -> dict:
    """Prune + quantize the student in ``checkpoint`` with ``recipe``; export three ONNX models.

    Args:
        checkpoint: a ``ray.train.Checkpoint`` (or a folder path) holding ``model.pt`` as written by
            the student trainable.
        data: CIFAR-10 uint8 tensors (train (N,3,32,32), test (M,3,32,32)) of the run.
        recipe: SparseML recipe YAML; ``recipe_epochs`` overrides its ``num_epochs`` variable.
        batch_size, seed: as in the student trials (same augmentation stream).
        threads: torch intra-op threads (the task's CPU share).
        output_dir: the run directory.

    Returns:
        The summary dict (also ``sparsify/summary.json``): ``trial_id``, ``setup``,
        ``test_acc_dense``, ``test_acc_pruned``, ``test_acc_pruned_quantized`` (0..1),
        ``weight_sparsity_pruned``, ``weight_sparsity_pruned_quantized`` (fraction 0..1 of
        prunable conv/linear weights that are zero), ``recipe_epochs``, ``onnx`` (name -> path).

    Raises:
        ValueError: the recipe is missing, not YAML, or names an unknown modifier
            (``load_recipe``); the checkpoint is not a student checkpoint of this project.
    """
    manager = load_recipe(recipe, num_epochs=recipe_epochs)  # fail before any work
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

    def accuracy(m):
        return evaluate(m, data.test_images, data.test_labels, batch_size, device)

    summary = {"trial_id": trial_id, "setup": setup or (meta.get("extra") or {}).get("setup"),
               "arch": meta["arch"], "recipe": str(recipe), "recipe_epochs": recipe_epochs,
               "test_acc_dense": accuracy(model)}
    export_model_onnx(model, layout.onnx("dense"))
    pruned = {}

    def on_pruning_end(m):
        pruned["test_acc"] = accuracy(m)
        pruned["layers"] = weight_sparsity(m)
        weights = dict(m.named_parameters())
        pruned["params"] = {name: weights[name].numel() for name in pruned["layers"]}
        pruned["sparsity"] = global_sparsity(m)
        export_model_onnx(m, layout.onnx("pruned"))

    train_images, train_labels = data.train_images.to(device), data.train_labels.to(device)
    history = run_recipe(
        model, manager,
        lambda epoch: train_batches(train_images, train_labels, batch_size, seed=seed,
                                    epoch=epoch, device=device),
        accuracy, optimizer=torch.optim.Adam(model.parameters()), on_pruning_end=on_pruning_end)
    export_model_onnx(model, layout.onnx("pruned_quantized"), convert_qat=True)

    layer_table = pd.DataFrame({"layer": list(pruned["layers"]),
                                "params": list(pruned["params"].values()),
                                "sparsity": list(pruned["layers"].values())})
    atomic_write_text(layout.layer_sparsity, layer_table.to_csv(index=False))
    atomic_write_text(layout.sparsify_history, pd.DataFrame(history).to_csv(index=False))
    summary.update(
        test_acc_pruned=pruned["test_acc"], weight_sparsity_pruned=pruned["sparsity"],
        test_acc_pruned_quantized=accuracy(model),
        weight_sparsity_pruned_quantized=global_sparsity(model),
        onnx={name: str(layout.onnx(name)) for name in ONNX_MODELS})
    atomic_write_text(layout.sparsify_summary, json.dumps(summary, indent=2))
    return summary
