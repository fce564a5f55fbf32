"""The full preset's architecture through the sparsify stage's code, on a CPU and 16 images.

The ``full`` preset (ResNet-101 teacher, truncated ResNet-101 student) is a GPU job, so its models
are proved here on few images: the recipe (80 % global magnitude pruning, then QAT) runs on the
ResNet-101 student for 4 recipe epochs of one step each, and the dense, pruned and INT8 exports
(ConvInteger and QDQ) are read back: weight sparsity, integer nodes, and a ReLU after each of the
student's 3 + 4 + 1 + 3 = 11 residual Adds.
"""

import os

import pytest
import torch

from helpers import onnx_op_types, onnx_weight_sparsity, residual_adds
from models import build_student, build_teacher, count_parameters, forward_features
from trainables.compress.core import RecipeRun, global_sparsity, is_quantized, load_recipe
from trainables.compress.export import export_model_onnx

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "prune_quantize.yaml")


@pytest.fixture(scope="module")
def full_student(tmp_path_factory):
    out = tmp_path_factory.mktemp("full_arch")
    torch.manual_seed(0)
    student = build_student("resnet101")
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10
    paths = {"dense": export_model_onnx(student, out / "dense.onnx")}
    snapshots = []

    def on_pruning_end(model):
        snapshots.append(global_sparsity(model))
        paths["pruned"] = export_model_onnx(model, out / "pruned.onnx")

    # recipe epochs 4: prune [0, 2), fine-tune [2, 3), QAT [3, 4); one step per epoch
    run = RecipeRun(student, load_recipe(RECIPE, num_epochs=4), torch.optim.Adam(student.parameters(), lr=1e-4),
                    lambda epoch: [(images, labels)], lambda m: 0.0, on_pruning_end=on_pruning_end, log=None)
    run.run()
    paths["int8"] = export_model_onnx(student, out / "pruned_quantized.onnx", convert_qat=True)
    paths["int8_qdq"] = export_model_onnx(student, out / "pruned_quantized_qdq.onnx")
    return student, paths, snapshots


def test_the_full_teacher_and_student_line_up():
    with torch.no_grad():
        teacher, student = build_teacher("resnet101", weights=None).eval(), build_student("resnet101").eval()
        images = torch.randn(2, 3, 32, 32)
        (t_logits, t_feats), (s_logits, s_feats) = forward_features(teacher, images), forward_features(student, images)
    assert t_logits.shape == s_logits.shape == (2, 10)
    assert {k: tuple(v.shape) for k, v in s_feats.items()} == {k: tuple(v.shape) for k, v in t_feats.items()} == {
        "layer1": (2, 256, 32, 32), "layer2": (2, 512, 16, 16), "layer4": (2, 2048, 4, 4)}
    assert (count_parameters(teacher), count_parameters(student)) == (42_512_970, 17_934_922)


def test_the_full_student_is_pruned_quantized_and_exported(full_student):
    student, paths, snapshots = full_student
    assert is_quantized(student)
    assert snapshots == [pytest.approx(0.80, abs=0.005)]  # the pruned snapshot at its final sparsity
    for name in ("pruned", "int8", "int8_qdq"):
        assert onnx_weight_sparsity(paths[name])[0] == pytest.approx(0.80, abs=0.01), name
    assert onnx_weight_sparsity(paths["dense"])[0] < 0.01
    assert {"ConvInteger", "MatMulInteger"} <= onnx_op_types(paths["int8"])
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= onnx_op_types(paths["int8_qdq"])
    assert "ConvInteger" not in onnx_op_types(paths["int8_qdq"])
    for name, path in paths.items():
        assert residual_adds(path) == [True] * 11, name
