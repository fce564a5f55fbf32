"""Stage 3: the best student through the SparseML recipe, exported to ONNX.

``sparsify_student`` is a plain function; ``orchestrate.py`` runs it as a Ray task on the
training device (``ray.remote(num_gpus=..., num_cpus=...)``). No stopping rule applies here:
the recipe's epochs rule. The fine-tuning and QAT loss is ``SparsifySettings.loss``: by default (``--sparsify-loss
setup``) the winning setup's own, through the students' ``trainables.student.student_loss`` with the
frozen teacher (soft targets at the students' temperature; for ``kd_feat`` also the layer1/2/4
feature MSE, the student's feature maps read by hooks so they follow SparseML's QAT module swap), or
cross-entropy to the labels (``ce``). On a GPU with bf16 the epochs before QAT run under bf16
autocast, QAT epochs in float32 (fake-quant needs it).

Outputs under ``output_dir`` (paths from ``study.RunLayout``; each written atomically):
``onnx/dense.onnx`` (the student as trained), ``onnx/pruned.onnx`` (FP32, saved when pruning ends,
before QAT), ``onnx/pruned_quantized.onnx`` (``convert_qat=True``: INT8 ConvInteger/MatMulInteger, the
form DeepSparse runs) and ``onnx/pruned_quantized_qdq.onnx`` (the same QAT model with
``convert_qat=False``: QuantizeLinear/DequantizeLinear around float Conv/Gemm, the form OpenVINO and
onnxruntime run in INT8), each with ``metadata_props`` describing its input, output and origin (``export.model_metadata``);
``sparsify/history.csv`` (per recipe epoch), ``sparsify/layer_sparsity.csv`` (per prunable layer
of the pruned model) and ``sparsify/summary.json`` (written last: its presence marks the stage done;
it records each ONNX file's sha256, which later stages and resumed runs check).

Interrupted? ``sparsify/recipe_checkpoint.pt`` holds the state after the latest finished recipe
epoch (``trainables.compress.checkpoint``) and the recipe's sha256 (in its ``extra``); a rerun
continues from there, checking that the ONNX files already exported are unchanged; under another
recipe (or a checkpoint that records none) it starts the recipe from epoch 0 and says so. It is deleted once ``summary.json`` is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd
import torch
from torch import nn

from models import load_checkpoint
from study import SETUPS, RunLayout, needs_teacher
from study.layout import PTQ_MODEL, QDQ_MODEL, SPARSE_MODELS, Target, recipe_sparsity
from study.files import atomic_write_text, check_digests, sha256_file
from trainables.batches import normalize, train_batches
from trainables.data import CIFAR10Tensors
from trainables.compress.export import export_model_onnx, model_cost, model_metadata
from trainables.compress.checkpoint import load_recipe_checkpoint, same_recipe
from trainables.compress.core import RecipeRun, global_sparsity, is_quantized, load_recipe, weight_sparsity
from trainables.student import frozen_teacher, student_loss
from trainables.train import MODEL_FILE, autocast, evaluate, pick_device

__all__ = ["SparsifySettings", "load_student", "sparsify_student"]

#: The ``quantization`` metadata of the two exports of the QAT model (the file's graph, in words).
QUANTIZATION = {
    "pruned_quantized": "quantization-aware training (SparseML 1.7), exported with convert_qat=True: "
                        "ConvInteger/MatMulInteger with int8/uint8 weights (the form DeepSparse runs)",
    QDQ_MODEL: "quantization-aware training (SparseML 1.7), exported with convert_qat=False: QDQ "
               "(QuantizeLinear/DequantizeLinear around float Conv/Gemm; the form OpenVINO and onnxruntime run in INT8)",
}


@dataclass(frozen=True)
class SparsifySettings:
    """What the sparsify stage runs with.

    Attributes:
        recipe: SparseML recipe YAML path; ``recipe_epochs`` overrides its ``num_epochs`` variable.
        batch_size, seed: as in the student trials (same augmentation stream).
        threads: torch intra-op threads and the PTQ peer's onnxruntime intra-op threads (the task's CPU
            share).
        output_dir: the run directory.
        trial_id, setup: the Tune trial the checkpoint comes from and its setup (recorded in the
            summary and in each ONNX file's metadata; an empty ``setup``: the checkpoint's).
        loss: the setup whose loss the recipe trains with (``study.SETUPS``: ``ce``, ``kd``,
            ``kd_feat``; ``trainables.losses.distillation_loss``).
        temperature: softmax temperature T of the soft targets (> 0; the trial's own value).
        variant: the trial's swept values (``--sweep``: field -> value; empty without a sweep),
            recorded in the summary (``variant``) and each ONNX file's metadata (``source_variant``).
        target: the sparsity target (``study.layout.Target``): its ``sparsity`` overrides the
            recipe's ``final_sparsity`` (None: the recipe's own), its ``tag`` names its outputs.
        export_dense: whether this task exports ``dense.onnx`` and its INT8 PTQ peer
            ``dense_int8.onnx`` (``study.layout.dense_owner``: one task of the stage does).
        ptq_images: training images that calibrate ``dense_int8`` (``trainables.compress.ptq``).
    """

    recipe: str
    recipe_epochs: float
    batch_size: int
    seed: int
    threads: int
    output_dir: str
    trial_id: str = ""
    setup: str = ""
    loss: str = "ce"
    temperature: float = 4.0
    variant: Optional[Dict[str, Any]] = None
    target: Target = Target(None, "")
    export_dense: bool = True
    ptq_images: int = 300


def sparsify_student(checkpoint, data: CIFAR10Tensors, settings: SparsifySettings,
                     teacher: Optional[dict] = None) -> dict:
    """Prune + quantize the student in ``checkpoint`` (read once, never written) with
    ``settings.recipe`` at ``settings.target``'s sparsity; export its pruned, pruned_quantized and
    pruned_quantized_qdq ONNX models, and with ``settings.export_dense`` also ``dense`` and ``dense_int8``.

    Args: ``checkpoint``, a ``ray.train.Checkpoint`` (or a folder) holding the student trainable's
    ``model.pt``; ``data``, the run's CIFAR-10 uint8 tensors (train (N,3,32,32), test (M,3,32,32));
    ``teacher``, the payload of ``teacher.pt`` (``torch.load``), needed unless the loss is ``ce``.
    Returns the summary dict, also ``sparsify/summary<tag>.json`` (its keys: ``_Stage.finish``).

    Raises:
        ValueError: the recipe is missing, not YAML, or names an unknown modifier
            (``load_recipe``); the checkpoint is not a student checkpoint of this project;
            ``loss`` is unknown or needs a teacher that is missing; a recipe checkpoint from an
            interrupted attempt is unreadable, belongs to another trial, loss or recipe length,
            or an ONNX file it recorded has changed (one line each).
    """
    s = settings
    overrides = {} if s.target.sparsity is None else {"final_sparsity": float(s.target.sparsity)}
    manager = load_recipe(s.recipe, num_epochs=s.recipe_epochs, **overrides)  # fail before any work
    if s.loss not in SETUPS:
        raise ValueError(f"loss {s.loss!r} is unknown; allowed: {', '.join(SETUPS)}")
    if needs_teacher(s.loss) and teacher is None:
        raise ValueError(f"loss {s.loss!r} needs the teacher's checkpoint payload; got None")
    torch.manual_seed(s.seed)
    torch.set_num_threads(max(1, int(s.threads)))
    device = pick_device()
    model, meta = load_student(checkpoint)
    model.to(device)
    stage = _Stage(s, RunLayout(s.output_dir).target(s.target), meta, device, data)
    stage.cost = model_cost(model)  # every export has the student's architecture (unstructured zeros stay)
    recipe_sha256 = sha256_file(s.recipe)
    resume = same_recipe(load_recipe_checkpoint(stage.layout.sparsify_checkpoint), recipe_sha256,
                         stage.layout.sparsify_checkpoint)
    if resume is None:
        stage.record = {"trial_id": s.trial_id, "loss": s.loss, "test_acc_dense": stage.accuracy(model),
                        "sha256": {}, "recipe_sha256": recipe_sha256, "sparsity": s.target.sparsity}
        if s.export_dense:
            stage.export("dense", model, stage.record["test_acc_dense"])
            stage.quantize_dense()
    else:
        stage.record = stage.checked_record(resume)

    train_images, train_labels = data.train_images.to(device), data.train_labels.to(device)
    run = RecipeRun(
        model, manager, torch.optim.Adam(model.parameters()),
        lambda epoch: train_batches(train_images, train_labels, s.batch_size, seed=s.seed,
                                    epoch=epoch, device=device),
        stage.accuracy, autocast=autocast, on_pruning_end=stage.pruning_end,
        loss_fn=student_loss(s.loss, model, frozen_teacher(teacher, device) if needs_teacher(s.loss) else None,
                             s.temperature, trace_student=False))
    history = run.run(checkpoint_path=stage.layout.sparsify_checkpoint, resume=resume, extra=stage.record)
    test_acc_quantized = stage.accuracy(model)
    stage.export("pruned_quantized", model, test_acc_quantized, convert_qat=True)
    stage.export(QDQ_MODEL, model, test_acc_quantized)
    return stage.finish(model, history, test_acc_quantized)


def load_student(checkpoint) -> tuple:
    """(model, meta) from ``model.pt`` in ``checkpoint`` (a ``ray.train.Checkpoint`` or a folder)."""
    if hasattr(checkpoint, "as_directory"):  # ray.train.Checkpoint
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / MODEL_FILE)
    return load_checkpoint(Path(checkpoint) / MODEL_FILE)


class _Stage:
    """The stage's outputs in the making: the ONNX exports and ``record``, the plain values the
    recipe checkpoint carries as its ``extra`` (``trial_id``, ``loss``, ``test_acc_dense``,
    ``sha256`` name -> digest of each file exported so far, ``pruned`` once pruning has ended)."""

    def __init__(self, settings: SparsifySettings, layout: RunLayout, meta: dict,
                 device: torch.device, data: CIFAR10Tensors) -> None:
        self.settings, self.layout, self.meta, self.device, self.data = settings, layout, meta, device, data
        self.setup = settings.setup or (meta.get("extra") or {}).get("setup")
        self.record: Dict[str, Any] = {}
        self.cost: tuple = (None, None)  # (MACs, params) per image of the student, set before the recipe

    def accuracy(self, model: nn.Module) -> float:
        """Test accuracy 0..1; bf16 autocast (where the device has it) only before QAT."""
        return evaluate(model, self.data.test_images, self.data.test_labels, self.settings.batch_size,
                        self.device, amp=not is_quantized(model))

    def model_name(self, variant: str) -> str:
        """The file name (without ``.onnx``) of ``variant`` (dense or one of ``SPARSE_MODELS``) for
        this task's target: the pruned ones carry its tag."""
        return variant if variant == "dense" else variant + self.settings.target.tag

    def export(self, variant: str, model: nn.Module, test_acc: float, convert_qat: bool = False) -> None:
        """Write ``onnx/<variant><tag>.onnx`` with its metadata; record its sha256."""
        s, path = self.settings, self.layout.onnx(self.model_name(variant))
        export_model_onnx(model, path, convert_qat=convert_qat, metadata=model_metadata(
            variant=variant, arch=self.meta["arch"], stem=self.meta["stem"], source_trial=s.trial_id,
            setup=self.setup, recipe=s.recipe, recipe_epochs=s.recipe_epochs,
            recipe_loss=None if variant == "dense" else s.loss, source_variant=dict(s.variant or {}),
            recipe_temperature=None if variant == "dense" or s.loss == "ce" else s.temperature, weight_sparsity=global_sparsity(model),
            test_acc=test_acc, quantization=QUANTIZATION.get(variant), macs=self.cost[0], params=self.cost[1]))
        self.record["sha256"][self.model_name(variant)] = sha256_file(path)

    def quantize_dense(self) -> None:
        """Write ``onnx/dense_int8.onnx``: ``dense.onnx`` INT8 by static PTQ (NNCF), calibrated on
        ``ptq_images`` training images chosen by the seed; its metadata is dense's with ``variant``
        dense_int8, ``quantization`` and ``calibration_images``; record its sha256 and N."""
        from trainables.compress.ptq import calibration_images, quantize_onnx

        path = self.layout.onnx(PTQ_MODEL)
        images = calibration_images(normalize(self.data.train_images), self.settings.ptq_images, self.settings.seed)
        self.record["ptq_calibration_images"] = quantize_onnx(self.layout.onnx("dense"), path, images,
                                                              threads=max(1, int(self.settings.threads)),
                                                              variant=PTQ_MODEL)
        self.record["sha256"][PTQ_MODEL] = sha256_file(path)

    def pruning_end(self, model: nn.Module) -> None:
        """The recipe's pruning-end hook: measure the pruned model, export ``pruned.onnx``."""
        layers = weight_sparsity(model)
        weights = dict(model.named_parameters())
        self.record["pruned"] = {"test_acc": self.accuracy(model), "layers": layers,
                                 "sparsity": global_sparsity(model),
                                 "params": {name: weights[name].numel() for name in layers}}
        self.export("pruned", model, self.record["pruned"]["test_acc"])

    def checked_record(self, resume: dict) -> Dict[str, Any]:
        """The record of an interrupted attempt, after checking it is this trial's and loss's and
        that its exports are the files it made. Raises ValueError (one line) otherwise."""
        record, s, path = resume["extra"], self.settings, self.layout.sparsify_checkpoint
        if record.get("trial_id") != s.trial_id:
            raise ValueError(f"{path} belongs to trial {record.get('trial_id')!r}, "
                             f"not {s.trial_id!r}; delete it to run the recipe from epoch 0")
        trained_with = record.get("loss", "ce")  # no key: an attempt from before --sparsify-loss
        if trained_with != s.loss:
            raise ValueError(f"{path} was trained with loss {trained_with!r}, "
                             f"not {s.loss!r}; delete it to run the recipe from epoch 0")
        if record.get("sparsity") != s.target.sparsity:
            raise ValueError(f"{path} was made for sparsity {record.get('sparsity')!r}, not "
                             f"{s.target.sparsity!r}; delete it to run the recipe from epoch 0")
        check_digests(record["sha256"], {name: self.layout.onnx(name) for name in record["sha256"]},
                      remedy=f"delete {path} to run the recipe from epoch 0")
        return record

    def finish(self, model: nn.Module, history: List[Dict[str, Any]], test_acc_quantized: float) -> dict:
        """Write ``layer_sparsity.csv``, ``history.csv``, then ``summary.json`` (last: it marks
        the stage done) and delete the recipe checkpoint. Returns the summary: ``trial_id``, ``setup``, ``variant``
        (the trial's swept values, field -> value; ``{}`` without ``--sweep``), ``loss`` (the
        setup whose loss the recipe trained with), ``temperature`` (None for ``ce``), ``arch``,
        ``recipe``, ``recipe_epochs``, ``test_acc_dense``, ``test_acc_pruned``,
        ``test_acc_pruned_quantized`` and ``test_acc_pruned_quantized_qdq`` (0..1; one torch model, two
        exports), ``weight_sparsity_pruned``, ``weight_sparsity_pruned_quantized``,
        ``weight_sparsity_pruned_quantized_qdq`` (fraction 0..1 of prunable conv/linear weights that
        are zero), ``epoch_seconds_before_qat`` / ``epoch_seconds_qat`` (mean wall seconds per
        recipe epoch without / with QAT modules; None when the recipe has no such epoch),
        ``sparsity`` (the target's final_sparsity: given, or the recipe's own), ``tag`` (its
        outputs' suffix), ``models`` (``study.layout.SPARSE_MODELS`` -> file name without ``.onnx``),
        ``ptq_calibration_images`` (the owner task only, else None), ``onnx`` (name -> path) and
        ``sha256`` (name -> hex digest) of the files this task made (the owner's: also ``dense``
        and ``dense_int8``)."""
        s, layout, pruned = self.settings, self.layout, self.record["pruned"]
        layer_table = pd.DataFrame({"layer": list(pruned["layers"]), "params": list(pruned["params"].values()),
                                    "sparsity": list(pruned["layers"].values())})
        atomic_write_text(layout.layer_sparsity, layer_table.to_csv(index=False))
        table = pd.DataFrame(history)
        atomic_write_text(layout.sparsify_history, table.to_csv(index=False))
        seconds = table.groupby("quantized")["epoch_seconds"].mean()
        summary = {
            "trial_id": s.trial_id, "setup": self.setup, "variant": dict(s.variant or {}), "loss": s.loss,
            "temperature": None if s.loss == "ce" else s.temperature, "arch": self.meta["arch"],
            "recipe": str(s.recipe), "recipe_sha256": self.record.get("recipe_sha256"),
            "recipe_epochs": s.recipe_epochs,
            "test_acc_dense": self.record["test_acc_dense"],
            "test_acc_pruned": pruned["test_acc"], "weight_sparsity_pruned": pruned["sparsity"],
            "test_acc_pruned_quantized": test_acc_quantized, "test_acc_pruned_quantized_qdq": test_acc_quantized,
            "weight_sparsity_pruned_quantized": global_sparsity(model),
            "weight_sparsity_pruned_quantized_qdq": global_sparsity(model),
            "epoch_seconds_before_qat": float(seconds[False]) if False in seconds else None,
            "epoch_seconds_qat": float(seconds[True]) if True in seconds else None,
            "sparsity": s.target.sparsity if s.target.sparsity is not None else recipe_sparsity(s.recipe),
            "tag": s.target.tag,
            "models": {variant: self.model_name(variant) for variant in SPARSE_MODELS},
            "ptq_calibration_images": self.record.get("ptq_calibration_images"),
            "onnx": {name: str(layout.onnx(name)) for name in self.record["sha256"]},
            "sha256": dict(self.record["sha256"]),
        }
        atomic_write_text(layout.sparsify_summary, json.dumps(summary, indent=2))
        layout.sparsify_checkpoint.unlink(missing_ok=True)  # done: nothing left to resume
        return summary
