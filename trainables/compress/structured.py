"""Stage 3, structured targets (``--channel-ratios``): the best student thinned, fine-tuned, exported.

``thin_student`` is a plain function; ``stages.sparsify`` runs it as a Ray task beside the
unstructured targets' ``sparsify_student``. For one channel ratio r it

1. removes about the fraction r of the channels of every convolution (``thin``: Torch-Pruning's
   DepGraph ``MetaPruner`` with group L2 magnitude importance, Fang et al., CVPR 2023): the
   channels that residual adds couple are removed together from every layer that shares them,
   and the layers are physically rebuilt smaller, so every engine runs fewer MACs. The classifier's
   outputs (10 classes) are kept; kept counts are rounded down to multiples of 8 (``ROUND_TO``);
2. fine-tunes the thinned student for ``ceil(recipe_epochs)`` epochs with the setup's own loss
   and the frozen teacher (``trainables.student.student_loss``; for ``kd_feat`` the teacher's
   feature maps cut to the channels the student kept), Adam with the recipe's cosine learning
   rate, ``INIT_LR`` -> ``FINAL_LR`` (``recipes/prune_quantize.yaml``'s ``init_lr``/``final_lr``);
3. exports ``onnx/structured<tag>.onnx`` (FP32) and ``onnx/structured<tag>_int8.onnx``, the same
   model INT8 by NNCF static PTQ (QDQ, ``trainables.compress.ptq``), and writes
   ``sparsify/history<tag>.csv`` (per epoch), ``sparsify/layer_sparsity<tag>.csv`` (per layer:
   channels before and after) and ``sparsify/summary<tag>.json`` last.

A task that is interrupted starts again from the checkpoint: the fine-tuning is short.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import onnxruntime as ort
import pandas as pd
import torch
import torch_pruning as tp
from torch import nn

from study import FEATURE_LAYERS, RunLayout, needs_teacher
from study.files import atomic_write_text, sha256_file
from study.layout import STRUCTURED_KINDS
from trainables.batches import normalize, train_batches
from trainables.compress.export import export_model_onnx, model_cost, model_metadata
from trainables.compress.ptq import calibration_images, quantize_onnx
from trainables.compress.sparsify import SparsifySettings, load_student
from trainables.data import CIFAR10Tensors
from trainables.student import frozen_teacher, student_loss
from trainables.train import evaluate, pick_device

__all__ = ["INIT_LR", "FINAL_LR", "ROUND_TO", "thin", "thin_student"]

#: Adam learning rate at the start and end of the fine-tuning (cosine): the recipe's ``init_lr`` and
#: ``final_lr`` (``recipes/prune_quantize.yaml``), so both methods fine-tune alike.
INIT_LR, FINAL_LR = 1e-3, 1e-4
#: Channel counts are rounded to multiples of this (Torch-Pruning's ``round_to``): INT8 kernels work
#: on blocks of channels (AVX-512 VNNI: 16 bytes per lane group; OpenVINO pads to 8 or 16).
ROUND_TO = 8


def _last_bn(layer: nn.Sequential) -> nn.BatchNorm2d:
    """The BatchNorm that ends ``layer``'s last block (``bn3`` of a Bottleneck, ``bn2`` of a BasicBlock):
    its channels are the layer's output channels."""
    block = layer[-1]
    return getattr(block, "bn3", None) or block.bn2


def thin(model: nn.Module, ratio: float, image_size: int = 32) -> dict[str, torch.Tensor]:
    """Remove about the fraction ``ratio`` of the channels of every convolution of ``model`` (a ResNet
    of ``models``), in place: Torch-Pruning ``MetaPruner`` with ``GroupMagnitudeImportance`` (L2),
    one shot, the classifier ``fc`` kept; kept counts are rounded down to multiples of ``ROUND_TO``
    (so 0.3 keeps 40 of 64 channels, and 0.01 still removes 8 of 64).

    Returns: feature layer (``layer1``, ``layer2``, ``layer4``) -> int64 (C_kept,) indices, in
    order, of the channels of that layer's output that were kept (what ``student_loss``'s
    ``teacher_channels`` reads). Raises ValueError for a ratio outside (0, 1), or one that leaves a
    convolution whole (its kept count would fall below ``ROUND_TO``: above 0.875 for 64 channels)."""
    if not 0 < ratio < 1:
        raise ValueError(f"channel ratio {ratio!r} must be between 0 and 1 (exclusive)")
    outputs = {name: _last_bn(getattr(model, name)) for name in FEATURE_LAYERS}
    widths = {name: bn.num_features for name, bn in outputs.items()}
    example = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model.fc], round_to=ROUND_TO)
    convs = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    removed: dict[str, set] = {name: set() for name in outputs}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            for name, bn in outputs.items():
                if dep.target.module is bn and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                    removed[name].update(_plain(idxs))
        group.prune()
    whole = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == convs[name]]
    if whole:  # Torch-Pruning leaves a group whole when its rounded kept count would fall below ROUND_TO
        raise ValueError(f"channel ratio {ratio:g} left {len(whole)} of {len(convs)} convolutions whole (e.g. "
                         f"{whole[0]}: {convs[whole[0]]} channels would keep fewer than {ROUND_TO}); give a smaller ratio")
    return {name: torch.tensor([c for c in range(widths[name]) if c not in removed[name]], dtype=torch.int64)
            for name in outputs}


def _plain(idxs) -> list[int]:
    """Torch-Pruning's pruning indices (ints, or ``_HybridIndex`` pairs) as plain ints of the layer."""
    return [int(getattr(i, "idx", i)) for i in idxs]


def _onnx_accuracy(path: Path, images: torch.Tensor, labels: torch.Tensor, threads: int) -> float:
    """Top-1 accuracy (0..1) of the ONNX classifier at ``path`` in onnxruntime on uint8 images
    (N, 3, 32, 32) and labels (N,), in batches of 256, with ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = normalize(images).numpy()
    correct = sum(int((session.run(None, {"input": x[i:i + 256]})[0].argmax(1) == labels[i:i + 256].numpy()).sum())
                  for i in range(0, len(x), 256))
    return correct / len(x)


def _fine_tune(model: nn.Module, loss_fn, data: CIFAR10Tensors, s: SparsifySettings, device, accuracy) -> list:
    """``ceil(s.recipe_epochs)`` epochs of Adam on ``loss_fn`` (cosine LR ``INIT_LR`` -> ``FINAL_LR``
    over all steps); one history row per epoch (epoch, lr, loss, test_acc, epoch_seconds)."""
    import time

    epochs = max(1, math.ceil(s.recipe_epochs))
    steps = epochs * math.ceil(len(data.train_labels) / s.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=INIT_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=FINAL_LR)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    history = []
    for epoch in range(epochs):
        start, total, count = time.perf_counter(), torch.zeros((), device=device), 0
        model.train()
        for x, y in train_batches(images, labels, s.batch_size, seed=s.seed, epoch=epoch, device=device):
            loss, _ = loss_fn(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count = total + loss.detach(), count + 1
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "loss": float(total) / max(1, count),
               "test_acc": accuracy(model), "epoch_seconds": time.perf_counter() - start}
        history.append(row)
        print(f"fine-tune epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} acc {row['test_acc']:.4f} "
              f"lr {row['lr']:.2e} {row['epoch_seconds']:.1f} s", flush=True)
    return history


def _layer_channels(before: nn.Module, after: nn.Module) -> pd.DataFrame:
    """One row per convolution: its name, output channels before and after thinning, parameters after."""
    old = dict(before.named_modules())
    return pd.DataFrame([{"layer": name, "channels": old[name].out_channels, "channels_kept": module.out_channels,
                          "params": module.weight.numel()}
                         for name, module in after.named_modules() if isinstance(module, nn.Conv2d)])


def thin_student(checkpoint, data: CIFAR10Tensors, settings: SparsifySettings, teacher: dict | None = None) -> dict:
    """Thin the student in ``checkpoint`` (read once, never written) by ``settings.target.ratio``,
    fine-tune it with ``settings.loss``, export it FP32 and INT8 (see the module docstring).

    Args: as ``trainables.compress.sparsify.sparsify_student`` (``settings.target`` is a
    structured ``study.layout.Target``; ``recipe_epochs`` is the number of fine-tuning epochs,
    rounded up).

    Returns the summary (also ``sparsify/summary<tag>.json``): ``trial_id``, ``setup``, ``variant``,
    ``loss``, ``temperature``, ``arch``, ``recipe_epochs``, ``channel_ratio``, ``tag``, ``models``
    (kind -> file name without ``.onnx``: ``structured``, ``structured_int8``), ``test_acc_dense``,
    ``test_acc_thinned`` (right after thinning), ``test_acc_structured`` (torch, after fine-tuning),
    ``test_acc_structured_int8`` (onnxruntime), ``weight_sparsity_structured(_int8)`` (0.0: no
    zeros are kept), ``macs_<kind>`` / ``params_<kind>`` (per image, ``model_cost``; dense too),
    ``ptq_calibration_images``, ``onnx`` and ``sha256`` (name -> path / hex digest).

    Raises:
        ValueError: the target is not structured, ``loss`` needs a teacher that is missing, or
            the checkpoint is not a student checkpoint of this project (one line each).
    """
    s, target = settings, settings.target
    if not target.structured:
        raise ValueError(f"target {target!r} has no channel ratio; thin_student runs --channel-ratios targets")
    if needs_teacher(s.loss) and teacher is None:
        raise ValueError(f"loss {s.loss!r} needs the teacher's checkpoint payload; got None")
    torch.manual_seed(s.seed)
    threads = max(1, int(s.threads))
    torch.set_num_threads(threads)
    device = pick_device()
    model, meta = load_student(checkpoint)
    layout = RunLayout(s.output_dir).target(target)
    model.to(device)

    def accuracy(m: nn.Module) -> float:
        return evaluate(m, data.test_images, data.test_labels, s.batch_size, device)

    dense = copy.deepcopy(model).cpu()
    record = {"test_acc_dense": accuracy(model)}
    kept = _thin_and_report(model, target.ratio, record, accuracy)
    loss_fn = student_loss(s.loss, model, frozen_teacher(teacher, device) if needs_teacher(s.loss) else None,
                           s.temperature, trace_student=False, teacher_channels=kept)
    history = _fine_tune(model, loss_fn, data, s, device, accuracy)
    record["test_acc_structured"] = accuracy(model)
    setup = s.setup or (meta.get("extra") or {}).get("setup")  # the trial's, else the checkpoint's
    names = _export(model.cpu().eval(), meta, setup, s, layout, record, data, threads)
    atomic_write_text(layout.layer_sparsity, _layer_channels(dense, model).to_csv(index=False))
    atomic_write_text(layout.sparsify_history, pd.DataFrame(history).to_csv(index=False))
    summary = {
        "trial_id": s.trial_id, "setup": setup,
        "variant": dict(s.variant or {}), "loss": s.loss, "temperature": None if s.loss == "ce" else s.temperature,
        "arch": meta["arch"], "recipe_epochs": s.recipe_epochs, "channel_ratio": target.ratio, "sparsity": None,
        "tag": target.tag, "models": names, **record,
        "onnx": {name: str(layout.onnx(name)) for name in names.values()},
        "sha256": {name: sha256_file(layout.onnx(name)) for name in names.values()},
    }
    atomic_write_text(layout.sparsify_summary, json.dumps(summary, indent=2))
    return summary


def _thin_and_report(model: nn.Module, ratio: float, record: dict, accuracy) -> dict:
    """``thin`` ``model`` by ``ratio``; put ``macs``/``params`` of the dense and the thinned model
    (``macs_dense``, ``params_dense``, ``macs_structured``, ``params_structured`` and the same for
    ``structured_int8``), ``weight_sparsity_*`` (0.0) and ``test_acc_thinned`` into ``record``;
    print one line. Returns ``thin``'s kept channels."""
    record["macs_dense"], record["params_dense"] = model_cost(model)
    kept = thin(model, ratio)
    record["test_acc_thinned"] = accuracy(model)
    macs, params = model_cost(model)
    for kind in STRUCTURED_KINDS:
        record.update({f"macs_{kind}": macs, f"params_{kind}": params, f"weight_sparsity_{kind}": 0.0})
    print(f"thinned by channel ratio {ratio:g}: MACs {record['macs_dense'] / 1e6:.0f} M -> {macs / 1e6:.0f} M, "
          f"parameters {record['params_dense'] / 1e6:.2f} M -> {params / 1e6:.2f} M, test accuracy "
          f"{record['test_acc_dense']:.4f} -> {record['test_acc_thinned']:.4f}", flush=True)
    return kept


def _export(model: nn.Module, meta: dict, setup: str, s: SparsifySettings, layout: RunLayout, record: dict,
            data: CIFAR10Tensors, threads: int) -> dict:
    """Write ``structured<tag>.onnx`` (FP32, with ``model_metadata``) and ``structured<tag>_int8.onnx``
    (NNCF PTQ on ``s.ptq_images`` training images); add ``ptq_calibration_images`` and
    ``test_acc_structured_int8`` (onnxruntime) to ``record``. Returns kind -> file name."""
    names = dict(zip(STRUCTURED_KINDS, s.target.models))
    fp32, int8 = layout.onnx(names["structured"]), layout.onnx(names["structured_int8"])
    export_model_onnx(model, fp32, metadata=model_metadata(
        variant="structured", arch=meta["arch"], stem=meta["stem"], source_trial=s.trial_id,
        setup=setup, recipe="", recipe_epochs=s.recipe_epochs,
        recipe_loss=s.loss, source_variant=dict(s.variant or {}), weight_sparsity=0.0,
        recipe_temperature=None if s.loss == "ce" else s.temperature, test_acc=record["test_acc_structured"],
        macs=record["macs_structured"], params=record["params_structured"], channel_ratio=s.target.ratio))
    images = calibration_images(normalize(data.train_images), s.ptq_images, s.seed)
    record["ptq_calibration_images"] = quantize_onnx(fp32, int8, images, threads=threads, variant="structured_int8")
    record["test_acc_structured_int8"] = _onnx_accuracy(int8, data.test_images, data.test_labels, threads)
    return names
