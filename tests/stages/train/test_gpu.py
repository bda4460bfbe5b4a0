"""Real GPU checks (``pytest -m gpu``): bf16 autocast, device placement, DSA / ZCA / a trainer epoch on CUDA equal
to CPU within tolerance. Skipped cleanly where CUDA is absent."""
from __future__ import annotations

import pytest
import torch

from stages.train.augment import DSAParams, dsa
from stages.train.model_space import fit_zca, fixed
from stages.train.recipes import load_recipe
from stages.train.trainer import _autocast, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPACE = fixed((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def data(n: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g), torch.arange(n) % 4


def test_dsa_on_cuda_equals_cpu_for_the_same_generator():
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for seed in range(8):
        cpu = dsa(x, DSAParams(mode="M"), torch.Generator().manual_seed(seed))
        gpu = dsa(x.cuda(), DSAParams(mode="M"), torch.Generator().manual_seed(seed))
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_zca_encode_on_cuda_equals_cpu():
    x, _ = data(200)
    zca = fit_zca(x.permute(0, 3, 1, 2), 0.1)
    u = x.permute(0, 3, 1, 2)
    torch.testing.assert_close(zca.to("cuda").encode(u.cuda()).cpu(), zca.encode(u), rtol=1e-3, atol=1e-3)


def test_bf16_autocast_is_used_and_losses_stay_float32():
    recipe = load_recipe("fast", epochs=1, network_kwargs={"width": 8}, batch_size=64)
    assert recipe.precision == "bf16"
    net = torch.nn.Conv2d(3, 4, 3).cuda()
    with _autocast(torch.device("cuda"), "bf16"):
        assert net(torch.randn(2, 3, 8, 8, device="cuda")).dtype == torch.bfloat16
    res = train(*data(), recipe, num_classes=4, seed=0, device="cuda", space=SPACE, test=data(64, 1))
    assert all(v.device.type == "cpu" for v in res.state_dict.values())  # results come back on the CPU
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in res.curve) and res.test is not None


def test_a_trainer_epoch_on_cuda_equals_cpu_within_tolerance():
    recipe = load_recipe("standard-dd", epochs=1, mtt_exact=False, batch_size=32,
                         network_kwargs={"width": 8, "depth": 2})
    x, y = data()
    cpu = train(x, y, recipe, num_classes=4, seed=0, device="cpu")
    gpu = train(x, y, recipe, num_classes=4, seed=0, device="cuda")
    for k in cpu.state_dict:
        torch.testing.assert_close(gpu.state_dict[k], cpu.state_dict[k], rtol=1e-3, atol=1e-4)
