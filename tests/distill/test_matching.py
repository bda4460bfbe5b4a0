"""The trajectory-matching core: the loss and one student step by hand, the unrolled gradient against finite
differences in float64 (with a first-order negative control that must fail the same check)."""
import pytest
import torch
from torch import nn

from distill.matching import (GRADIENT_MODES, InnerStep, MatchingPlan, distance_ratio, inner_loss, plan_inner_steps,
                              unroll, unrolled_gradient)
from stages.train.augment import DSAParams
from stages.train.networks import create_network


def test_distance_ratio_by_hand():
    start, target, theta = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]), torch.tensor([2.0, 2.0])
    # |theta - target|^2 = 1 + 4 = 5 ; |start - target|^2 = 9 + 16 = 25
    assert float(distance_ratio(theta, start, target)) == pytest.approx(0.2)


def test_one_student_step_by_hand():
    # a linear classifier at zero weights: logits 0, softmax (0.5, 0.5); CE gradient of row c is (p_c - y_c) x
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    x, y = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]]), torch.tensor([0])
    plan = MatchingPlan((InnerStep(torch.tensor([0]), None),))
    theta = unroll(net, x, y, torch.tensor(0.1), torch.zeros(8), plan)
    # W0 -= 0.1 * (-0.5 * x) ; W1 -= 0.1 * (0.5 * x)
    assert torch.allclose(theta, torch.tensor([0.05, 0.1, 0, 0, -0.05, -0.1, 0, 0]))
    assert float(inner_loss(net, torch.zeros(8), x, y, plan.steps[0])) == pytest.approx(0.6931471805599453)


def test_plan_chunks_a_permutation_and_is_replayable():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = plan_inner_steps(10, 5, 4, image_shape=(3, 8, 8), dsa=DSAParams(), generator=gen())
    b = plan_inner_steps(10, 5, 4, image_shape=(3, 8, 8), dsa=DSAParams(), generator=gen())
    assert len(a) == 5 and all(len(s.rows) == 4 for s in a.steps)
    assert torch.equal(torch.cat([a.steps[0].rows, a.steps[1].rows]).unique(), torch.cat([a.steps[0].rows, a.steps[1].rows]).sort().values)
    assert all(torch.equal(s.rows, t.rows) for s, t in zip(a.steps, b.steps))
    assert [[op for op, _ in s.augment] for s in a.steps] == [[op for op, _ in s.augment] for s in b.steps]


def _problem(steps: int = 3):
    torch.manual_seed(0)
    net = create_network("convnet", 3, in_channels=1, image_size=8, width=4, depth=2).double()
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target = start + 0.05 * torch.randn_like(start)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    # DSA without the non-smooth families (crop/cutout/flip are piecewise constant in x: fine, but keep it smooth)
    plan = plan_inner_steps(6, steps, 4, image_shape=(1, 8, 8), dsa=DSAParams(strategy="color_scale_rotate"),
                            generator=torch.Generator().manual_seed(1))
    plan = MatchingPlan(tuple(InnerStep(s.rows, [(op, {k: v.double() if v.is_floating_point() else v
                                                       for k, v in d.items()}) for op, d in s.augment])
                              for s in plan.steps))
    return net, x, y, torch.tensor(0.05, dtype=torch.float64), start, target, plan


def _loss(net, x, y, lr, start, target, plan) -> float:
    with torch.enable_grad():
        return float(distance_ratio(unroll(net, x, y, lr, start, plan, create_graph=False), start, target))


def _first_order(net, x, y, lr, start, target, plan):
    """Negative control: the gradient with the parameter path held constant (Hessian terms dropped)."""
    xs, lr_ = x.detach().requires_grad_(True), lr.detach().requires_grad_(True)
    theta = start.clone()
    for step in plan.steps:
        th = theta.detach().requires_grad_(True)
        g, = torch.autograd.grad(inner_loss(net, th, xs, y, step), th, create_graph=True)
        theta = theta.detach() + (theta - theta.detach()) - lr_ * g
    gx, gl = torch.autograd.grad(distance_ratio(theta, start, target), [xs, lr_])
    return gx, gl


def test_unrolled_gradient_equals_finite_differences_float64():
    net, x, y, lr, start, target, plan = _problem()
    res = GRADIENT_MODES.get("unrolled")(net, x, y, lr.requires_grad_(True), start, target, plan)
    assert res.loss == pytest.approx(_loss(net, x, y, lr, start, target, plan), rel=1e-12)
    d = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eps = 1e-5
    fd_x = (_loss(net, x + eps * d, y, lr, start, target, plan) - _loss(net, x - eps * d, y, lr, start, target, plan)) / (2 * eps)
    fd_lr = (_loss(net, x, y, lr + eps, start, target, plan) - _loss(net, x, y, lr - eps, start, target, plan)) / (2 * eps)
    assert float((res.grad_images * d).sum()) == pytest.approx(fd_x, rel=1e-6)
    assert float(res.grad_lr) == pytest.approx(fd_lr, rel=1e-6)
    # negative control: the first-order gradient misses the Hessian terms and fails the same check
    gx, gl = _first_order(net, x, y, lr, start, target, plan)
    assert abs(float((gx * d).sum()) - fd_x) > 1e-4 * abs(fd_x)
    assert abs(float(gl) - fd_lr) > 1e-4 * abs(fd_lr)


def test_fixed_lr_gives_no_lr_gradient():
    net, x, y, lr, start, target, plan = _problem(steps=1)
    res = unrolled_gradient(net, x, y, lr, start, target, plan)
    assert res.grad_lr is None and res.grad_images.shape == x.shape
