"""Tests for trainables.losses: exact values on tiny tensors, computed independently with math."""

import math

import pytest
import torch

from trainables.losses import FEATURE_LAYERS, SETUPS, TERM_NAMES, distillation_loss, soft_cross_entropy

S = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]  # student logits, 2x3
T = [[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]]  # teacher logits, 2x3
Y = [2, 0]


def _softmax(row, temp=1.0):
    ex = [math.exp(v / temp) for v in row]
    z = sum(ex)
    return [e / z for e in ex]


def _soft_ce_ref(student, teacher, temp):
    total = 0.0
    for s, t in zip(student, teacher):
        q, p = _softmax(t, temp), _softmax(s, temp)
        total += -sum(qc * math.log(pc) for qc, pc in zip(q, p))
    return temp * temp * total / len(student)


def _ce_ref(student, labels):
    return sum(-math.log(_softmax(s)[y]) for s, y in zip(student, labels)) / len(student)


def _t(x, grad=False):
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


def _feats(values):
    # tiny (B=2, C=1, H=1, W=2) maps filled with one value per layer
    return {name: torch.full((2, 1, 1, 2), float(v)) for name, v in zip(FEATURE_LAYERS, values)}


def test_constants():
    assert SETUPS == ("ce", "kd", "kd_feat")
    assert FEATURE_LAYERS == ("layer1", "layer2", "layer4")
    assert TERM_NAMES == ("ce", "soft_ce", "mse_layer1", "mse_layer2", "mse_layer4")


def test_soft_ce_equal_logits_is_entropy():
    # q == p at T=1: -sum q log q = entropy of softmax([1,2,3]) and of uniform (log 3).
    p = _softmax([1.0, 2.0, 3.0])
    h1 = -sum(v * math.log(v) for v in p)
    expected = (h1 + math.log(3.0)) / 2
    logits = _t([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    got = soft_cross_entropy(logits, logits.clone(), 1.0)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx((0.83240 + 1.09861) / 2, abs=1e-5)  # H(softmax[1,2,3]), log 3 by hand


def test_soft_ce_values_and_t_squared_scaling():
    for temp in (1.0, 2.0, 4.0):
        got = soft_cross_entropy(_t(S), _t(T), temp).item()
        assert got == pytest.approx(_soft_ce_ref(S, T, temp), rel=1e-6)
    # T² factor: uniform teacher & uniform student at T=2 -> 4 * log(3) exactly.
    zeros = torch.zeros(2, 3)
    assert soft_cross_entropy(zeros, zeros, 2.0).item() == pytest.approx(4 * math.log(3.0), rel=1e-6)


def test_soft_ce_gradient_is_t_times_prob_difference():
    # d/ds [T² · CE(q, softmax(s/T))] = T · (softmax(s/T) - softmax(t/T)) / B  (Hinton et al. 2015, §2.1)
    temp = 2.0
    s = _t(S, grad=True)
    soft_cross_entropy(s, _t(T), temp).backward()
    for b in range(2):
        p, q = _softmax(S[b], temp), _softmax(T[b], temp)
        for c in range(3):
            assert s.grad[b, c].item() == pytest.approx(temp * (p[c] - q[c]) / 2, rel=1e-5, abs=1e-7)


def test_ce_setup():
    loss, terms = distillation_loss("ce", _t(S), torch.tensor(Y))
    expected = _ce_ref(S, Y)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert list(terms) == ["ce"] and float(terms["ce"]) == pytest.approx(expected, rel=1e-6)
    # A detached 0-d tensor (no host read per step): summed on the device, read once per epoch.
    assert isinstance(terms["ce"], torch.Tensor) and terms["ce"].dim() == 0
    assert not terms["ce"].requires_grad and terms["ce"].dtype == torch.float32


def test_kd_is_mean_of_ce_and_soft_ce():
    loss, terms = distillation_loss("kd", _t(S), torch.tensor(Y), teacher_logits=_t(T), temperature=4.0)
    assert list(terms) == ["ce", "soft_ce"]
    assert float(terms["ce"]) == pytest.approx(_ce_ref(S, Y), rel=1e-6)
    assert float(terms["soft_ce"]) == pytest.approx(_soft_ce_ref(S, T, 4.0), rel=1e-6)
    assert loss.item() == pytest.approx(float(terms["ce"] + terms["soft_ce"]) / 2, rel=1e-6)
    assert loss.item() == pytest.approx((_ce_ref(S, Y) + _soft_ce_ref(S, T, 4.0)) / 2, rel=1e-6)


def test_kd_feat_is_mean_of_five_with_known_mse():
    student_feats = _feats([0.0, 0.0, 3.0])
    teacher_feats = _feats([1.0, 2.0, 3.0])  # MSE: 1, 4, 0
    loss, terms = distillation_loss(
        "kd_feat", _t(S), torch.tensor(Y), _t(T), student_feats, teacher_feats, temperature=2.0
    )
    assert list(terms) == ["ce", "soft_ce", "mse_layer1", "mse_layer2", "mse_layer4"]
    assert {k: float(v) for k, v in terms.items() if k.startswith("mse")} == {
        "mse_layer1": 1.0, "mse_layer2": 4.0, "mse_layer4": 0.0}
    expected = (_ce_ref(S, Y) + _soft_ce_ref(S, T, 2.0) + 1.0 + 4.0 + 0.0) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_kd_feat_ignores_extra_feature_keys():
    sf, tf = _feats([0, 0, 0]), _feats([1, 1, 1])
    sf["layer3"] = torch.zeros(1)  # not matched, shape differs on purpose
    tf["layer3"] = torch.ones(5)
    _, terms = distillation_loss("kd_feat", _t(S), torch.tensor(Y), _t(T), sf, tf)
    assert [float(terms[f"mse_{k}"]) for k in FEATURE_LAYERS] == [1.0, 1.0, 1.0]


def test_no_gradient_into_teacher_tensors():
    s = _t(S, grad=True)
    t = _t(T, grad=True)
    sf = {k: v.clone().requires_grad_(True) for k, v in _feats([0, 0, 0]).items()}
    tf = {k: v.clone().requires_grad_(True) for k, v in _feats([1, 2, 3]).items()}
    loss, _ = distillation_loss("kd_feat", s, torch.tensor(Y), t, sf, tf)
    loss.backward()
    assert s.grad is not None and torch.count_nonzero(s.grad) > 0
    assert all(sf[k].grad is not None for k in FEATURE_LAYERS)
    assert t.grad is None
    assert all(tf[k].grad is None for k in FEATURE_LAYERS)
    # MSE gradient on the student map: 2 (s - t) / numel / 5 summands -> layer1: 2 * (0 - 1) / 4 / 5
    assert sf["layer1"].grad.flatten().tolist() == pytest.approx([-0.1] * 4)


def test_ce_setup_ignores_teacher_inputs():
    loss_a, _ = distillation_loss("ce", _t(S), torch.tensor(Y))
    loss_b, _ = distillation_loss("ce", _t(S), torch.tensor(Y), _t(T), temperature=-1.0)
    assert loss_a.item() == loss_b.item()


def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("temp", [0.0, -1.0, float("nan"), float("inf"), "hot"])
def test_bad_temperature(temp):
    msg = _one_line_error("temperature", soft_cross_entropy, _t(S), _t(T), temp)
    assert "> 0" in msg
    _one_line_error("temperature", distillation_loss, "kd", _t(S), torch.tensor(Y), _t(T), temperature=temp)


def test_soft_ce_shape_mismatch():
    _one_line_error("shape", soft_cross_entropy, _t(S), torch.zeros(2, 4), 1.0)
    _one_line_error("student_logits", soft_cross_entropy, torch.zeros(3), torch.zeros(3), 1.0)


def test_unknown_setup():
    msg = _one_line_error("setup='fitnet'", distillation_loss, "fitnet", _t(S), torch.tensor(Y))
    assert "kd_feat" in msg  # names what is allowed


@pytest.mark.parametrize("setup", ["kd", "kd_feat"])
def test_missing_teacher_logits(setup):
    _one_line_error("teacher_logits", distillation_loss, setup, _t(S), torch.tensor(Y), None, _feats([0] * 3), _feats([0] * 3))


def test_kd_feat_missing_feature_dict():
    _one_line_error("student_feats", distillation_loss, "kd_feat", _t(S), torch.tensor(Y), _t(T), None, _feats([0] * 3))
    _one_line_error("teacher_feats", distillation_loss, "kd_feat", _t(S), torch.tensor(Y), _t(T), _feats([0] * 3), None)


def test_kd_feat_missing_feature_key():
    tf = _feats([0] * 3)
    del tf["layer2"]
    msg = _one_line_error("layer2", distillation_loss, "kd_feat", _t(S), torch.tensor(Y), _t(T), _feats([0] * 3), tf)
    assert "teacher_feats" in msg and "layer4" in msg


def test_kd_feat_feature_shape_mismatch():
    tf = _feats([0] * 3)
    tf["layer4"] = torch.zeros(2, 1, 2, 2)
    msg = _one_line_error("layer4", distillation_loss, "kd_feat", _t(S), torch.tensor(Y), _t(T), _feats([0] * 3), tf)
    assert "(2, 1, 1, 2)" in msg and "(2, 1, 2, 2)" in msg


# --- the setup table (study.SETUP_INFO) drives the dispatch -------------------------------------

def _all_inputs():
    return dict(teacher_logits=_t(T), student_feats=_feats([1, 2, 3]), teacher_feats=_feats([0, 0, 0]))


@pytest.mark.parametrize("setup", SETUPS)
def test_setup_table_names_the_terms_its_loss_returns(setup):
    from study import SETUP_INFO

    loss, terms = distillation_loss(setup, _t(S), torch.tensor(Y), **_all_inputs())
    assert tuple(terms) == SETUP_INFO[setup].terms
    assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()) / len(terms), rel=1e-6)


def test_every_loss_term_has_a_computation_and_a_known_input():
    from study import LOSS_TERMS, SETUP_INFO
    from trainables.losses import LOSS_TERM_FUNCTIONS

    assert tuple(LOSS_TERM_FUNCTIONS) == tuple(LOSS_TERMS) == TERM_NAMES
    assert {term.needs for term in LOSS_TERMS.values()} <= {"labels", "teacher_logits", "features"}
    assert all(set(info.terms) <= set(LOSS_TERMS) and info.terms for info in SETUP_INFO.values())


def _student_loss_terms(setup):
    from models import build_student
    from trainables.student import student_loss

    torch.manual_seed(0)
    student, teacher = build_student("resnet18"), build_student("resnet18").eval()
    fn = student_loss(setup, student, teacher, 4.0, trace_student=False)
    _, terms = fn(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    return tuple(terms)


def test_student_loss_feeds_each_setup_what_its_terms_need():
    from study import SETUP_INFO

    for setup in SETUPS:
        assert _student_loss_terms(setup) == SETUP_INFO[setup].terms


def test_a_new_row_in_the_table_is_a_new_setup(monkeypatch):
    # A setup made only of existing terms needs nothing but its row in study.SETUP_INFO.
    from study import SETUP_INFO, Setup

    monkeypatch.setitem(SETUP_INFO, "ce_layer4", Setup(("ce", "mse_layer4"), "CE + MSE", "words"))
    loss, terms = distillation_loss("ce_layer4", _t(S), torch.tensor(Y), **_all_inputs())
    assert tuple(terms) == ("ce", "mse_layer4")
    assert loss.item() == pytest.approx((_ce_ref(S, Y) + 9.0) / 2, rel=1e-6)  # MSE of 3 vs 0 = 9
    assert _student_loss_terms("ce_layer4") == ("ce", "mse_layer4")


def test_each_term_is_a_function_of_one_named_batch():
    """The terms read the fields of one ``LossInputs``, by name: hand-computed values."""
    from trainables.losses import LOSS_TERM_FUNCTIONS, LossInputs

    batch = LossInputs("kd_feat", _t(S), torch.tensor(Y), teacher_logits=_t(T),
                       student_feature_maps=_feats([1, 2, 3]), teacher_feature_maps=_feats([0, 0, 0]),
                       temperature=2.0)
    values = {name: fn(batch).item() for name, fn in LOSS_TERM_FUNCTIONS.items()}
    assert values == pytest.approx({"ce": _ce_ref(S, Y), "soft_ce": _soft_ce_ref(S, T, 2.0),
                                    "mse_layer1": 1.0, "mse_layer2": 4.0, "mse_layer4": 9.0}, rel=1e-6)
    assert [fn.__name__ for fn in LOSS_TERM_FUNCTIONS.values()] == \
        ["cross_entropy_term", "soft_target_term", "mse_layer1", "mse_layer2", "mse_layer4"]
