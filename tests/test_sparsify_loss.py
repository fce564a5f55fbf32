"""The sparsify stage's loss (``--sparsify-loss``): the winning setup's loss with the frozen
teacher inside the SparseML recipe, and feature maps that still line up once QAT has swapped
the student's modules.

Real resnet18 teacher and truncated student (cifar stem), random weights and images: shapes and
module swaps are what is checked, not accuracy.
"""

import json
import logging
import os

import pytest
import torch
import trainables.compress.compat  # noqa: F401,I001  (SparseML 1.7 on newer torch; before SparseML is imported)
from sparseml.pytorch.utils import LoggerManager, PythonLogger
from torch.ao.quantization import disable_observer

from bench.benchmark import graph_kind
from helpers import TinyResNet
from models import build_student, build_teacher, feature_extractor, forward_features, save_checkpoint
from trainables.data import CIFAR10Tensors
from study import RunLayout
from study import SETUP_INFO
from study.files import sha256_file
from trainables.compress.checkpoint import CHECKPOINT_FORMAT
from trainables.compress.export import read_metadata
from trainables.compress.sparsify import SparsifySettings, sparsify_student
from trainables.compress.core import RecipeRun, is_quantized, load_recipe
from trainables.student import student_loss
from trainables.train import MODEL_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "prune_quantize.yaml")

QAT_AT_ONCE = """
version: 1.1.0
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 1.0
  - !QuantizationModifier
    start_epoch: 0.0
"""


def _models(seed=0):
    torch.manual_seed(seed)
    student = build_student("resnet18", num_classes=10, stem="cifar")
    teacher = build_teacher("resnet18", num_classes=10, stem="cifar", weights=None)
    return student, teacher.eval().requires_grad_(False)


def _images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_student_features_follow_the_qat_swap_and_match_the_teacher(tmp_path):
    student, teacher = _models()
    x, y = _images(), torch.tensor([0, 1, 2, 3])
    traced_before = feature_extractor(student)  # what a graph traced before QAT would keep
    recipe = tmp_path / "qat.yaml"
    recipe.write_text(QAT_AT_ONCE)
    manager = load_recipe(str(recipe))
    quiet = LoggerManager([PythonLogger(logger=logging.getLogger(__name__), enabled=False)],
                          log_python=False)  # no ./sparse_logs
    manager.modify(student, torch.optim.SGD(student.parameters(), lr=0.0), steps_per_epoch=1,
                   loggers=quiet)
    assert is_quantized(student)
    student.apply(disable_observer)  # fixed quantization ranges: two forwards give the same values
    student.eval()
    traced_before.eval()  # its old BatchNorms share running stats with the fused QAT modules

    with torch.no_grad():
        live = student(x)
        hooked_logits, hooked = forward_features(student, x)
        stale_logits, _ = traced_before(x)
        _, teacher_feats = forward_features(teacher, x)
    # hooks read what the QAT model computes; the old traced graph runs the replaced modules
    assert torch.equal(hooked_logits, live)
    assert not torch.allclose(stale_logits, live, atol=1e-6)
    assert {k: tuple(v.shape) for k, v in hooked.items()} == \
        {k: tuple(v.shape) for k, v in teacher_feats.items()} == \
        {"layer1": (4, 64, 32, 32), "layer2": (4, 128, 16, 16), "layer4": (4, 512, 4, 4)}

    loss_fn = student_loss("kd_feat", student, teacher, 4.0, trace_student=False)
    loss, terms = loss_fn(x, y)
    assert tuple(terms) == SETUP_INFO["kd_feat"].terms
    assert float(loss) == pytest.approx(sum(float(v) for v in terms.values()) / 5, rel=1e-6)
    with torch.no_grad():  # the MSE terms compare the QAT student's maps with the teacher's
        expected = torch.nn.functional.mse_loss(hooked["layer4"], teacher_feats["layer4"])
    assert float(terms["mse_layer4"]) == pytest.approx(float(expected), rel=1e-6)


def test_run_recipe_trains_with_the_given_loss_and_logs_its_terms():
    torch.manual_seed(0)
    student, teacher = TinyResNet(), TinyResNet().eval().requires_grad_(False)
    images, labels = _images(8), torch.arange(8) % 10

    def batches(epoch):
        yield images[:4], labels[:4]
        yield images[4:], labels[4:]

    history = RecipeRun(student, load_recipe(RECIPE, num_epochs=2), torch.optim.Adam(student.parameters()),
                        batches, lambda m: 0.5, log=None,
                        loss_fn=student_loss("kd", student, teacher, 4.0, trace_student=False)).run()
    assert [row["quantized"] for row in history] == [False, True]
    for row in history:
        assert row["train_loss"] == pytest.approx((row["loss_ce"] + row["loss_soft_ce"]) / 2, rel=1e-5)
        assert not any(key.startswith("loss_mse") for key in row)
    plain = TinyResNet()  # no loss_fn: cross-entropy, one term
    history = RecipeRun(plain, load_recipe(RECIPE, num_epochs=2), torch.optim.Adam(plain.parameters()),
                        batches, lambda m: 0.5, log=None).run()
    for row in history:
        assert row["train_loss"] == pytest.approx(row["loss_ce"], rel=1e-6)
        assert [key for key in row if key.startswith("loss_")] == ["loss_ce"]


def _student_checkpoint(folder, student):
    save_checkpoint(student, folder / MODEL_FILE, arch="resnet18", stem="cifar", num_classes=10,
                    role="student", extra={"setup": "kd_feat"})
    return folder


def test_sparsify_student_records_the_loss_it_trained_with(tmp_path):
    """kd_feat through the whole stage (the end-to-end test covers ``ce``)."""
    loss = "kd_feat"
    student, teacher = _models()
    checkpoint = _student_checkpoint(tmp_path / "ckpt", student)
    gen = torch.Generator().manual_seed(1)
    data = CIFAR10Tensors(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen),
                          torch.arange(16) % 10,
                          torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen),
                          torch.arange(8) % 10)
    payload = {"arch": "resnet18", "stem": "cifar", "num_classes": 10,
               "state_dict": teacher.state_dict()}
    # batch 8: 2 steps per epoch, one of them in the window between pruning's end (0.5) and QAT (1)
    settings = SparsifySettings(recipe=RECIPE, recipe_epochs=2, batch_size=8, seed=0, threads=2,
                                output_dir=str(tmp_path / "run"), trial_id="t0", setup="kd_feat",
                                loss=loss, temperature=4.0)
    summary = sparsify_student(checkpoint, data, settings, teacher=payload)
    saved = json.loads((tmp_path / "run" / "sparsify" / "summary.json").read_text())
    assert saved["loss"] == summary["loss"] == loss
    assert saved["temperature"] == 4.0
    history = (tmp_path / "run" / "sparsify" / "history.csv").read_text().splitlines()[0].split(",")
    assert [c for c in history if c.startswith("loss_")] == [f"loss_{t}" for t in SETUP_INFO["kd_feat"].terms]
    assert saved["weight_sparsity_pruned_quantized"] == pytest.approx(0.8, abs=0.01)
    # the QAT model also as QDQ: its own file, metadata, digest and accuracy, the ConvInteger file kept
    layout = RunLayout(tmp_path / "run")
    assert set(saved["sha256"]) == {"dense", "dense_int8", "pruned", "pruned_quantized", "pruned_quantized_qdq"}
    assert saved["models"] == {"pruned": "pruned", "pruned_quantized": "pruned_quantized",
                               "pruned_quantized_qdq": "pruned_quantized_qdq"}
    for name, graph in (("pruned_quantized", "ConvInteger INT8"), ("pruned_quantized_qdq", "QDQ INT8")):
        assert sha256_file(layout.onnx(name)) == saved["sha256"][name] and graph_kind(layout.onnx(name)) == graph
        meta = read_metadata(layout.onnx(name))
        assert meta["variant"] == name and meta["recipe_loss"] == loss and "convert_qat" in meta["quantization"]
        assert float(meta["test_acc"]) == pytest.approx(saved["test_acc_pruned_quantized"], abs=1e-6)
    assert saved["test_acc_pruned_quantized_qdq"] == saved["test_acc_pruned_quantized"]
    assert saved["weight_sparsity_pruned_quantized_qdq"] == saved["weight_sparsity_pruned_quantized"]
    layout.check_onnx(saved)  # the layout's own list of a target's models: the QDQ one among them


def _settings(output_dir, **fields):
    """The stage's settings for a 2-epoch recipe in ``output_dir`` (one thread), with ``fields``."""
    return SparsifySettings(recipe=RECIPE, recipe_epochs=2, batch_size=16, seed=0, threads=1,
                            output_dir=str(output_dir), **fields)


def test_a_distillation_loss_without_the_teacher_is_refused(tmp_path):
    student, _ = _models()
    data = CIFAR10Tensors(*(torch.zeros(0),) * 4)
    with pytest.raises(ValueError, match="loss 'kd' needs the teacher"):
        sparsify_student(_student_checkpoint(tmp_path, student), data, _settings(tmp_path / "run", loss="kd"))
    with pytest.raises(ValueError, match="loss 'mse' is unknown; allowed: ce, kd, kd_feat"):
        sparsify_student(tmp_path, data, _settings(tmp_path / "run", loss="mse"))


def test_a_recipe_checkpoint_trained_with_another_loss_is_refused(tmp_path):
    """An interrupted attempt with ``ce`` is not continued with ``kd``: one line, before training."""
    student, teacher = _models()
    layout = RunLayout(tmp_path / "run")
    layout.sparsify_checkpoint.parent.mkdir(parents=True)  # what the attempt's checks read first
    settings = _settings(layout.root, trial_id="t0", loss="kd")
    same_recipe = sha256_file(settings.recipe)  # the attempt ran this recipe: only the loss differs
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 1, "extra": {"trial_id": "t0", "loss": "ce", "sha256": {},
                                                                    "recipe_sha256": same_recipe}},
               layout.sparsify_checkpoint)
    payload = {"arch": "resnet18", "stem": "cifar", "num_classes": 10, "state_dict": teacher.state_dict()}
    data = CIFAR10Tensors(*(torch.zeros(0),) * 4)
    with pytest.raises(ValueError, match=r"recipe_checkpoint.pt was trained with loss 'ce', not 'kd'; "
                                         r"delete it to run the recipe from epoch 0$"):
        sparsify_student(_student_checkpoint(tmp_path, student), data, settings, teacher=payload)
