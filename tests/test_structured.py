"""Structured pruning (``--channel-ratios``): thinning, the feature loss on kept channels, the targets,
and the full architecture (ResNet-101 student) thinned, fine-tuned, exported FP32 and INT8 on 16 images."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import onnx_op_types, residual_adds
from models import build_student, build_teacher, forward_features, save_checkpoint
from study import StudyConfig, StudyError, validate
from study.layout import RunLayout, Target, model_names, sparsity_targets
from trainables.compress.export import model_cost, read_metadata
from trainables.compress.sparsify import SparsifySettings
from trainables.compress.structured import ROUND_TO, thin, thin_student
from trainables.data import CIFAR10Tensors
from trainables.student import student_loss


def test_channel_ratios_are_targets_of_their_own():
    targets = sparsity_targets((0.5,), "recipes/prune_quantize.yaml", (0.5, 0.875))
    assert targets == [Target(0.5, "_s50"), Target(None, "_c50", 0.5), Target(None, "_c87p5", 0.875)]
    assert model_names(targets)[-4:] == ["structured_c50", "structured_c50_int8",
                                         "structured_c87p5", "structured_c87p5_int8"]
    assert RunLayout("run").onnx("structured_c50_int8").name == "structured_c50_int8.onnx"
    assert RunLayout("run").target(targets[1]).sparsify_summary.name == "summary_c50.json"
    with pytest.raises(ValueError, match="structured_c<percent>"):
        RunLayout("run").onnx("structured")


@pytest.mark.parametrize("ratios", [(0.0,), (1.0,), (0.5, 0.5), (-0.2,)])
def test_bad_channel_ratios_are_one_line(ratios):
    with pytest.raises(StudyError, match=r"^--channel-ratios .*: give distinct fractions above 0 and at most 0.85"):
        validate(StudyConfig(channel_ratios=ratios))


def test_thinning_removes_channels_and_reports_the_kept_ones():
    torch.manual_seed(0)
    model = build_student("resnet18").eval()
    bn = model.layer1[-1].bn2  # layer1's output channels
    with torch.no_grad():
        bn.weight.copy_(torch.arange(64, dtype=torch.float32))
    before = model_cost(model)
    kept = thin(model, 0.5)
    assert {name: len(idx) for name, idx in kept.items()} == {"layer1": 32, "layer2": 64, "layer4": 256}
    assert torch.equal(model.layer1[-1].bn2.weight, kept["layer1"].float())  # the kept channels, in order
    assert model.layer1[0].conv1.in_channels == model.conv1.out_channels == 32  # the stem shrank with layer1
    assert model.fc.out_features == 10 and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.out_channels % ROUND_TO == 0 for m in convs)
    macs, params = model_cost(model)
    assert macs < 0.3 * before[0] and params < 0.3 * before[1]  # both sides of each conv halved: about 1/4


def test_the_feature_loss_reads_the_teachers_kept_channels():
    torch.manual_seed(0)
    student, teacher = build_student("resnet18"), build_teacher("resnet18", weights=None).eval()
    kept = thin(student, 0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    _, terms = student_loss("kd_feat", student.eval(), teacher, 4.0, trace_student=False, teacher_channels=kept)(x, y)
    with torch.no_grad():
        (_, t_feats), (_, s_feats) = forward_features(teacher, x), forward_features(student, x)
    for name in ("layer1", "layer2", "layer4"):
        expected = F.mse_loss(s_feats[name], t_feats[name][:, kept[name]])
        assert float(terms[f"mse_{name}"]) == pytest.approx(float(expected), rel=1e-5), name


@pytest.fixture(scope="module")
def full_structured(tmp_path_factory):
    """The full preset's student (ResNet-101, truncated) thinned by 0.5 with kd_feat and the ResNet-101
    teacher, fine-tuned 1 epoch on 16 images, exported and quantized (8 calibration images)."""
    out = tmp_path_factory.mktemp("structured")
    gen = torch.Generator().manual_seed(0)
    student, teacher = build_student("resnet101"), build_teacher("resnet101", weights=None)
    (out / "trial").mkdir()
    save_checkpoint(student, out / "trial" / "model.pt", arch="resnet101", stem="cifar", num_classes=10,
                    role="student", extra={"setup": "kd_feat"})
    data = CIFAR10Tensors(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen),
                          torch.arange(16) % 10, torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                                                                generator=gen), torch.arange(16) % 10)
    settings = SparsifySettings(recipe="", recipe_epochs=1, batch_size=8, seed=0, threads=2, output_dir=str(out),
                                trial_id="trial", setup="kd_feat", loss="kd_feat", target=Target(None, "_c50", 0.5),
                                ptq_images=8)
    payload = {"arch": "resnet101", "stem": "cifar", "num_classes": 10, "state_dict": teacher.state_dict()}
    return out, thin_student(out / "trial", data, settings, teacher=payload), model_cost(student)


def test_the_full_student_is_thinned_exported_and_quantized(full_structured):
    out, summary, (dense_macs, dense_params) = full_structured
    layout = RunLayout(out).target(Target(None, "_c50", 0.5))
    assert json.loads(layout.sparsify_summary.read_text()) == summary
    assert summary["models"] == {"structured": "structured_c50", "structured_int8": "structured_c50_int8"}
    assert (summary["macs_dense"], summary["params_dense"]) == (dense_macs, dense_params) == (948_203_530, 17_934_922)
    assert summary["macs_structured"] < 0.3 * dense_macs and summary["params_structured"] < 0.3 * dense_params
    fp32, int8 = layout.onnx("structured_c50"), layout.onnx("structured_c50_int8")
    for path in (fp32, int8):
        meta = read_metadata(path)
        assert (meta["channel_ratio"], meta["macs"], meta["params"]) == (
            "0.5", str(summary["macs_structured"]), str(summary["params_structured"]))
        assert residual_adds(path) == [True] * 11, path.name  # a ReLU after each of the 11 residual Adds
    assert read_metadata(int8)["variant"] == "structured_int8"
    assert "DequantizeLinear" not in onnx_op_types(fp32)
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= onnx_op_types(int8)
    import onnx

    weights = {init.name: tuple(init.dims) for init in onnx.load(str(fp32)).graph.initializer}
    conv_out = sorted({dims[0] for dims in weights.values() if len(dims) == 4})
    assert conv_out == [32, 64, 128, 256, 512, 1024]  # every conv at half its width (64 ... 2048 before)
    channels = RunLayout(out).target(Target(None, "_c50", 0.5)).layer_sparsity.read_text().splitlines()
    assert channels[0] == "layer,channels,channels_kept,params" and "layer1.0.conv2,64,32," in "\n".join(channels)
    assert 0 <= summary["test_acc_structured_int8"] <= 1 and summary["ptq_calibration_images"] == 8


def test_every_engine_of_the_benchmark_runs_the_thinned_models(full_structured):
    """Each engine the benchmark would use here (``Engine.available``: DeepSparse where this Python
    has it) opens both thinned files, FP32 and INT8 QDQ, at batch 4 and gives finite (4, 10) logits.
    Catches a thinned graph an engine rejects (the benchmark would only show an error row)."""
    import numpy as np

    from bench.engines import REGISTRY

    out, _, _ = full_structured
    layout = RunLayout(out).target(Target(None, "_c50", 0.5))
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    engines = [engine for engine in REGISTRY if engine.available()]
    assert {"onnxruntime", "openvino"} <= {engine.name for engine in engines}
    for engine in engines:
        for name in ("structured_c50", "structured_c50_int8"):
            logits = np.asarray(engine.open(str(layout.onnx(name)), 4, 2).run(images))
            assert logits.shape == (4, 10) and np.isfinite(logits).all(), (engine.name, name)


@pytest.mark.parametrize("ratios", [(0.9,), (0.1234501, 0.1234502)])
def test_ratios_that_would_not_thin_or_share_a_file_name_are_refused(ratios):
    # 0.9: the 64-channel layers would keep fewer than 8 channels; the pair: both are _c12p345
    with pytest.raises(StudyError, match=r"^--channel-ratios .*: give distinct fractions above 0 and at most 0.85"):
        validate(StudyConfig(channel_ratios=ratios))
    validate(StudyConfig(channel_ratios=(0.85, 0.5)))


def test_an_empty_list_is_bad_input_not_the_default(capsys):
    import orchestrate

    with pytest.raises(SystemExit) as exit_:
        orchestrate.config_from_args(["--preset", "smoke", "--channel-ratios", ""])
    assert exit_.value.code == 2
    assert "argument --channel-ratios: invalid comma-separated float value: ''" in capsys.readouterr().err


def test_a_ratio_that_leaves_a_layer_whole_is_an_error_not_a_silent_dense_model():
    with pytest.raises(ValueError, match=r"channel ratio 0.95 left 10 of 18 convolutions whole \(e.g. conv1: 64 "):
        thin(build_student("resnet18"), 0.95)
