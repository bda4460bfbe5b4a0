"""Model spaces: per-channel normalisation and ZCA whitening checked against independent references."""
import numpy as np
import pytest
import torch

from stages.train.model_space import (ChannelNorm, ZCA, bridge, channel_stats, fit_zca, fixed, load_space,
                                      save_space, space_from)


def images(n: int = 300, seed: int = 0, shape=(3, 4, 4)) -> torch.Tensor:
    """uint8 NCHW images with correlated channels and pixels (so whitening has something to do)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, *shape[1:], generator=g)
    noise = torch.rand(n, *shape, generator=g)
    return ((0.6 * base + 0.4 * noise) * 255).round().to(torch.uint8)


def test_channel_stats_equal_a_direct_computation():
    x = images(200)
    mean, std = channel_stats(x, chunk=37)
    ref = x.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref.mean((0, 2, 3)))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), ref.std((0, 2, 3), unbiased=False))


def test_channel_norm_is_the_hand_formula_and_inverts():
    space = fixed((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    x = images(5)
    out = space.encode(x)
    ref = (x.double() / 255 - torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor([0.2023, 0.1994, 0.2010], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(space.to_unit(out), x.float() / 255, rtol=0, atol=1e-6)
    assert space.describe() == {"kind": "normalize", "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
    with pytest.raises(ValueError):
        ChannelNorm((0.5,), (0.0,))


def _numpy_zca(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The textbook formula: unbiased covariance, SVD, T = U (S + eps)^-1/2 U^T (float64 numpy)."""
    flat = x.reshape(len(x), -1)
    mean = flat.mean(0)
    cov = np.cov(flat, rowvar=False)  # divides by N - 1
    u, s, _ = np.linalg.svd(cov)
    return mean, (u / np.sqrt(s + eps)) @ u.T, (u * np.sqrt(s + eps)) @ u.T


@pytest.mark.parametrize("eps", [0.1, 1e-3])
def test_zca_equals_the_numpy_svd_formula(eps):
    x = images(300)
    zca = fit_zca(x, eps, chunk=64)
    mean, t, t_inv = _numpy_zca(x.double().numpy() / 255, eps)
    np.testing.assert_allclose(zca.mean.numpy(), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(zca.matrix.numpy(), t, rtol=1e-4, atol=1e-4 * np.abs(t).max())
    np.testing.assert_allclose(zca.inverse.numpy(), t_inv, rtol=1e-4, atol=1e-6)
    out = zca.encode(x).double().numpy().reshape(len(x), -1)
    ref = (x.double().numpy().reshape(len(x), -1) / 255 - mean) @ t
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_zca_equals_kornia():
    kornia = pytest.importorskip("kornia")
    x = images(300)
    u = x.float() / 255
    ref = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(u)
    zca = fit_zca(x, 0.1)
    torch.testing.assert_close(zca.mean, ref.mean_vector.flatten(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zca.matrix, ref.transform_matrix, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(zca.encode(x), ref(u), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(zca.to_unit(zca.encode(x)), ref.inverse_transform(ref(u)), rtol=1e-3, atol=1e-4)


def test_zca_whitens_as_far_as_eps_allows():
    x = images(3000, seed=1, shape=(3, 2, 2))
    u = (x.double() / 255).reshape(len(x), -1)
    s = torch.linalg.eigvalsh(torch.cov(u.T))
    for eps in (1e-6, 0.1):
        z = fit_zca(x, eps).encode(x).double().reshape(len(x), -1)
        cov = torch.cov(z.T)
        # whitened covariance = U diag(S / (S + eps)) U^T: its eigenvalues are known by hand
        torch.testing.assert_close(torch.linalg.eigvalsh(cov), s / (s + eps), rtol=1e-4, atol=1e-5)
        if eps == 1e-6:
            torch.testing.assert_close(cov, torch.eye(len(cov), dtype=torch.float64), rtol=0, atol=2e-3)
        torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1], dtype=torch.float64), rtol=0, atol=1e-5)
    zca = fit_zca(x, 0.1)
    torch.testing.assert_close(zca.to_unit(zca.encode(x)), x.float() / 255, rtol=0, atol=1e-4)


def test_spaces_round_trip_through_safetensors_and_bridge(tmp_path):
    x = images(100)
    zca = fit_zca(x, 0.1, fitted_on={"artifact_id": "abc", "split": "train"})
    back = load_space(save_space(tmp_path / "zca.safetensors", zca))
    assert isinstance(back, ZCA) and back.describe() == zca.describe() and back.describe()["fitted_on"]["images"] == 100
    torch.testing.assert_close(back.encode(x), zca.encode(x), rtol=0, atol=0)
    norm = fixed((0.4, 0.5, 0.6), (0.2, 0.2, 0.3))
    assert load_space(save_space(tmp_path / "n.safetensors", norm)).describe() == norm.describe()
    to_zca = bridge(norm, zca)
    torch.testing.assert_close(to_zca(norm.encode(x)), zca.encode(x), rtol=1e-4, atol=1e-4)
    assert bridge(norm, fixed((0.4, 0.5, 0.6), (0.2, 0.2, 0.3))) is None  # same space: no map at all
    bad = dict(zca.describe(), sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        space_from(bad, zca.tensors())
