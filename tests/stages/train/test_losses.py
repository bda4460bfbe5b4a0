import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.registry import RegistryError
from stages.train.losses import LossSpec, cross_entropy, kd_loss, make_loss

S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
T = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_kd_matches_hand_computed_reference():
    temp = 2.0
    ref = 0.0
    for s_row, t_row in zip(S.tolist(), T.tolist()):
        ps, pt = _softmax(s_row, temp), _softmax(t_row, temp)
        ref += sum(q * math.log(q / p) for q, p in zip(pt, ps))
    ref = temp ** 2 * ref / 2
    assert kd_loss(S, T, temp).item() == pytest.approx(ref, rel=1e-6)
    assert ref > 0


def test_kd_with_stored_probabilities_equals_logit_teacher():
    temp = 3.0
    probs = F.softmax(T / temp, dim=1)
    torch.testing.assert_close(kd_loss(S, probs, temp, teacher_is_prob=True), kd_loss(S, T, temp))
    # sparse stored labels (exact zeros) stay finite
    onehot = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.isfinite(kd_loss(S, onehot, 1.0, teacher_is_prob=True))


def test_kd_is_zero_for_identical_logits_and_has_hinton_gradient():
    assert kd_loss(T, T, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    temp = 4.0
    s = S.clone().requires_grad_(True)
    kd_loss(s, T, temp).backward()
    expected = temp * (F.softmax(S / temp, 1) - F.softmax(T / temp, 1)) / len(S)  # T^2 * (1/T) * (p_s - p_t) / B
    torch.testing.assert_close(s.grad, expected)


def test_cross_entropy_label_smoothing_and_soft_targets():
    y = torch.tensor([1, 2])
    eps = 0.2
    logp = F.log_softmax(S, 1)
    target = torch.full_like(S, eps / 3).scatter_(1, y[:, None], 1 - eps + eps / 3)
    torch.testing.assert_close(cross_entropy(S, y, eps), -(target * logp).sum(1).mean())
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    torch.testing.assert_close(cross_entropy(S, probs), -(probs * logp).sum(1).mean())


def test_mixed_interpolates_between_ce_and_kd():
    y = torch.tensor([0, 2])
    ce = make_loss({"name": "ce"})(S, y)
    kd = make_loss({"name": "kd", "temperature": 2.0})(S, y, T)
    for a in (0.0, 0.3, 1.0):
        mixed = make_loss(LossSpec(name="mixed", alpha=a, temperature=2.0))(S, y, T)
        torch.testing.assert_close(mixed, (1 - a) * ce + a * kd)
    assert not torch.isclose(ce, kd)


def test_kd_without_teacher_uses_prob_targets_or_fails():
    probs = F.softmax(T, 1)
    kd = make_loss("kd")
    torch.testing.assert_close(kd(S, probs), kd_loss(S, probs, 4.0, teacher_is_prob=True))
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
