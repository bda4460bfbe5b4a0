import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.registry import RegistryError
from stages.train.losses import LossSpec, SoftLabels, cross_entropy, kd_loss, make_loss

S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
T = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def _kl_by_hand(student, teacher_probs, temp):
    """mean over rows of KL(p_t || softmax(s / T)), in plain Python floats."""
    total = 0.0
    for s_row, pt in zip(student.tolist(), teacher_probs):
        ps = _softmax(s_row, temp)
        total += sum(q * math.log(q / p) for q, p in zip(pt, ps) if q > 0)
    return total / len(teacher_probs)


def test_kd_matches_hand_computed_reference_with_and_without_t_squared():
    temp = 2.0
    kl = _kl_by_hand(S, [_softmax(r, temp) for r in T.tolist()], temp)
    assert kl > 0
    assert kd_loss(S, T, temp).item() == pytest.approx(temp ** 2 * kl, rel=1e-6)
    assert kd_loss(S, T, temp, t_squared=False).item() == pytest.approx(kl, rel=1e-6)
    on = make_loss({"name": "kd", "temperature": temp})(S, torch.tensor([0, 1]), T)
    off = make_loss({"name": "kd", "temperature": temp, "t_squared": False})(S, torch.tensor([0, 1]), T)
    assert on.item() == pytest.approx(temp ** 2 * kl, rel=1e-6) and off.item() == pytest.approx(kl, rel=1e-6)


def test_stored_probabilities_at_the_loss_temperature_equal_the_logit_teacher():
    temp = 3.0
    probs = F.softmax(T / temp, dim=1)  # stored at T_s = T
    kd = make_loss({"name": "kd", "temperature": temp}, SoftLabels(kind="probs", temperature=temp))
    ref = temp ** 2 * _kl_by_hand(S, probs.tolist(), temp)
    assert kd(S, probs).item() == pytest.approx(ref, rel=1e-6)
    torch.testing.assert_close(kd(S, probs), kd_loss(S, T, temp))


def test_probabilities_from_another_temperature_are_retempered_not_softmaxed_again():
    """Labels stored at T_s = 1 and used at T = 4 mean softmax(z / 4) of the logits that made them."""
    temp, t_s = 4.0, 1.0
    probs = F.softmax(T / t_s, dim=1)
    kd = make_loss({"name": "kd", "temperature": temp}, SoftLabels(kind="probs", temperature=t_s))
    ref = temp ** 2 * _kl_by_hand(S, [_softmax(r, temp) for r in T.tolist()], temp)  # the teacher's z / T
    assert kd(S, probs).item() == pytest.approx(ref, rel=1e-5)
    as_given = temp ** 2 * _kl_by_hand(S, probs.tolist(), temp)  # taking them as if made at T
    double = temp ** 2 * _kl_by_hand(S, [_softmax(r, temp) for r in probs.tolist()], temp)  # softmax(p / T)
    assert abs(as_given - ref) > 1e-3 and abs(double - ref) > 1e-3
    logits = make_loss({"name": "kd", "temperature": temp}, SoftLabels(kind="logits"))
    assert logits(S, T).item() == pytest.approx(ref, rel=1e-6)  # stored logits: z / T directly
    # sparse stored labels (exact zeros) stay finite, at T_s = T and re-tempered
    onehot = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for t in (1.0, 4.0):
        out = make_loss({"name": "kd", "temperature": t}, SoftLabels(kind="probs", temperature=1.0))(S, onehot)
        assert torch.isfinite(out)


def test_kd_is_zero_for_identical_logits_and_has_hinton_gradient():
    assert kd_loss(T, T, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    temp = 4.0
    s = S.clone().requires_grad_(True)
    kd_loss(s, T, temp).backward()
    expected = temp * (F.softmax(S / temp, 1) - F.softmax(T / temp, 1)) / len(S)  # T^2 * (1/T) * (p_s - p_t) / B
    torch.testing.assert_close(s.grad, expected)
    s.grad = None
    kd_loss(s, T, temp, t_squared=False).backward()
    torch.testing.assert_close(s.grad, expected / temp ** 2)


def test_cross_entropy_label_smoothing_and_soft_targets():
    y = torch.tensor([1, 2])
    eps = 0.2
    logp = F.log_softmax(S, 1)
    target = torch.full_like(S, eps / 3).scatter_(1, y[:, None], 1 - eps + eps / 3)
    torch.testing.assert_close(cross_entropy(S, y, eps), -(target * logp).sum(1).mean())
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    torch.testing.assert_close(cross_entropy(S, probs), -(probs * logp).sum(1).mean())
    # soft CE reads stored labels at temperature 1: probabilities made at T_s = 2 are re-tempered to softmax(z)
    at2 = F.softmax(T / 2, 1)
    torch.testing.assert_close(cross_entropy(S, at2, form=SoftLabels(temperature=2.0)),
                               -(F.softmax(T, 1) * logp).sum(1).mean())


def test_mixed_interpolates_between_ce_and_kd():
    y = torch.tensor([0, 2])
    ce = make_loss({"name": "ce"})(S, y)
    kd = make_loss({"name": "kd", "temperature": 2.0})(S, y, T)
    for a in (0.0, 0.3, 1.0):
        mixed = make_loss(LossSpec(name="mixed", alpha=a, temperature=2.0))(S, y, T)
        torch.testing.assert_close(mixed, (1 - a) * ce + a * kd)
    assert not torch.isclose(ce, kd)


def test_kd_without_teacher_uses_prob_targets_or_fails():
    probs = F.softmax(T, 1)  # default form: probabilities at T_s = 1
    kd = make_loss("kd")
    torch.testing.assert_close(kd(S, probs), kd_loss(S, T, 4.0))
    with pytest.raises(ValueError, match="needs a teacher"):
        kd(S, torch.tensor([0, 1]))


def test_make_loss_validation():
    with pytest.raises(RegistryError):
        make_loss("focal")
    with pytest.raises(ValueError):
        make_loss({"name": "ce", "smoothing": 0.1})


def test_losses_are_float32_under_bf16_logits():
    out = make_loss("mixed")(S.bfloat16(), torch.tensor([0, 1]), T.bfloat16())
    assert out.dtype == torch.float32
