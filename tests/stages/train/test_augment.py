import pytest
import torch

from pipeline.registry import RegistryError
from stages.train.augment import (AUGMENTATIONS, DSA_FAMILIES, CropFlipParams, DSAParams, crop_flip, dsa,
                            make_augmentation)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=gen(123))


@pytest.mark.parametrize("family", sorted(DSA_FAMILIES))
def test_each_family_changes_images_and_is_differentiable(family, x):
    params = DSAParams(strategy=family, mode="M", prob_flip=1.0)
    inp = x.clone().requires_grad_(True)
    out = dsa(inp, params, gen(1))
    assert out.shape == x.shape
    assert not torch.allclose(out, x), f"{family} left the batch unchanged"
    (out * torch.randn_like(out)).sum().backward()
    assert inp.grad is not None and inp.grad.abs().sum() > 0


@pytest.mark.parametrize("family", sorted(DSA_FAMILIES))
def test_gradcheck_each_family(family):
    params = DSAParams(strategy=family, mode="M")
    inp = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dsa(t, params, gen(5)), (inp,))


def test_siamese_same_seed_same_transform(x):
    params = DSAParams()  # mode S, all six families
    for seed in range(12):
        torch.testing.assert_close(dsa(x, params, gen(seed)), dsa(x, params, gen(seed)), rtol=0, atol=0)
    assert not torch.allclose(dsa(x, DSAParams(mode="M"), gen(0)), dsa(x, DSAParams(mode="M"), gen(1)))


def test_siamese_across_different_batches(x):
    # geometric families are linear in the pixels: identical parameters <=> aug(a + b) = aug(a) + aug(b)
    params = DSAParams(strategy="crop_cutout_flip_scale_rotate", mode="M")
    y = torch.randn_like(x)
    torch.testing.assert_close(dsa(x + y, params, gen(7)), dsa(x, params, gen(7)) + dsa(y, params, gen(7)))
    assert not torch.allclose(dsa(x + y, params, gen(7)), dsa(x, params, gen(8)) + dsa(y, params, gen(9)))


def test_flip_twice_is_identity(x):
    always = DSAParams(strategy="flip", prob_flip=1.0)
    torch.testing.assert_close(dsa(dsa(x, always, gen(0)), always, gen(1)), x, rtol=0, atol=0)
    torch.testing.assert_close(dsa(x, always, gen(0)), x.flip(3), rtol=0, atol=0)
    half = DSAParams(strategy="flip")  # p = 0.5: the same seed flips the same images back
    torch.testing.assert_close(dsa(dsa(x, half, gen(3)), half, gen(3)), x, rtol=0, atol=0)


def test_color_on_flat_grey_is_a_brightness_shift():
    # saturation and contrast scale deviations from a mean, so a flat image only gets brightness: +U(-0.5, 0.5)
    grey = torch.full((32, 3, 8, 8), 0.25)
    out = dsa(grey, DSAParams(strategy="color", mode="M"), gen(0))
    shift = out - grey
    assert torch.allclose(shift, shift[:, :1, :1, :1].expand_as(shift), atol=1e-6)
    assert shift.abs().max() <= 0.5 and shift.std() > 0.1
    x = torch.rand(32, 3, 8, 8)
    sat = dsa(x, DSAParams(strategy="color", mode="M", brightness=0.0, contrast=1.0), gen(0))
    torch.testing.assert_close(sat.mean((1, 2, 3)), x.mean((1, 2, 3)))  # no shift without brightness


def test_crop_and_cutout_magnitudes():
    ones = torch.ones(64, 1, 32, 32)
    cropped = dsa(ones, DSAParams(strategy="crop", mode="M"), gen(0))
    assert (cropped[:, :, 4:28, 4:28] == 1).all()  # shift of at most 0.125 * 32 = 4 pixels, zero fill
    assert (cropped == 0).any()
    cut = dsa(ones, DSAParams(strategy="cutout", mode="M"), gen(0))
    zeros = (cut[:, 0] == 0).sum((1, 2))
    assert (zeros > 0).all() and (zeros <= 16 * 16).all()  # a 0.5H x 0.5W square, clipped at the border
    assert (zeros == 256).any()


def test_mode_s_applies_one_family_mode_m_all(x):
    s, m = DSAParams(strategy="cutout_flip", mode="S", prob_flip=1.0), DSAParams(strategy="cutout_flip", mode="M",
                                                                                  prob_flip=1.0)
    outcomes = set()
    for seed in range(20):
        out = dsa(x, s, gen(seed))
        flipped, has_holes = torch.equal(out, x.flip(3)), bool((out == 0).any())
        assert flipped != has_holes  # exactly one family
        outcomes.add(flipped)
    assert outcomes == {True, False}
    both = dsa(x, m, gen(0))
    assert (both == 0).any() and not torch.equal(both, x)


def test_shared_draws_one_transform_for_the_batch():
    same = torch.randn(1, 3, 16, 16).expand(6, -1, -1, -1).contiguous()
    params = DSAParams(strategy="crop_scale_rotate_color", mode="M")
    shared = dsa(same, params.model_copy(update={"shared": True}), gen(0))
    assert all(torch.equal(shared[0], shared[i]) for i in range(6))
    per_sample = dsa(same, params, gen(0))
    assert not all(torch.allclose(per_sample[0], per_sample[i]) for i in range(6))


def test_fyi_flip_first_always_flips():
    x = torch.randn(64, 3, 8, 8)
    params = DSAParams(strategy="flip_cutout", flip_first=True)
    out = dsa(x, params, gen(0))
    assert (out == 0).any()  # the other family (cutout) was applied as well as the flip
    assert 10 < sum(torch.equal(out[i][out[i] != 0], x[i].flip(2)[out[i] != 0]) for i in range(64)) < 54


def test_crop_flip_fast_augmentation(x):
    ones = torch.ones(32, 3, 16, 16)
    assert (crop_flip(ones, CropFlipParams(pad=4, padding_mode="reflect"), gen(0)) == 1).all()
    assert (crop_flip(ones, CropFlipParams(pad=4, padding_mode="zeros"), gen(0)) == 0).any()
    identity = CropFlipParams(pad=0, flip=False)
    torch.testing.assert_close(crop_flip(x, identity, gen(0)), x, rtol=0, atol=0)
    p = CropFlipParams(pad=2)
    torch.testing.assert_close(crop_flip(x, p, gen(4)), crop_flip(x, p, gen(4)), rtol=0, atol=0)
    inp = x.clone().requires_grad_(True)
    crop_flip(inp, p, gen(4)).sum().backward()
    assert inp.grad.abs().sum() > 0
    # a reflect-pad crop is a permutation of (reflected) pixels: the translated interior is kept exactly
    out = crop_flip(x, CropFlipParams(pad=2, flip=False), gen(1))
    assert any(torch.equal(out[0, :, 2:14, 2:14], x[0, :, 2 + dy:14 + dy, 2 + dx:14 + dx])
               for dy in range(-2, 3) for dx in range(-2, 3))


def test_registry_and_validation(x):
    assert {"none", "dsa", "crop_flip"} <= set(AUGMENTATIONS.names())
    assert make_augmentation("none")(x, generator=gen(0)) is x
    aug = make_augmentation("dsa", {"strategy": "color_crop", "mode": "M"})
    torch.testing.assert_close(aug(x, generator=gen(2)), dsa(x, DSAParams(strategy="color_crop", mode="M"), gen(2)))
    with pytest.raises(ValueError, match="unknown DSA families"):
        make_augmentation("dsa", {"strategy": "color_blur"})
    with pytest.raises(ValueError):
        make_augmentation("crop_flip", {"padding": 4})
    with pytest.raises(RegistryError):
        make_augmentation("mixup")


# --------------------------------------------------------------------------------------------------------------
# Every DSA op against a hand computation for fixed draws (numpy loops, no torch ops shared with the code)

import math  # noqa: E402

import numpy as np  # noqa: E402

from stages.train.augment import (DSA_OPS, apply_brightness, apply_contrast, apply_crop, apply_cutout,  # noqa: E402
                                  apply_flip, apply_rotate, apply_saturation, apply_scale, plan_dsa)

IMG = torch.randn(2, 3, 5, 6, generator=gen(11), dtype=torch.float64)
NP = IMG.numpy()


def _bilinear_by_hand(img: np.ndarray, a: np.ndarray) -> np.ndarray:
    """affine_grid + grid_sample(align_corners=True, zeros) for one CHW image and a 2x2 matrix, pixel by pixel."""
    c, h, w = img.shape
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            xs, ys = a @ np.array([-1 + 2 * j / (w - 1), -1 + 2 * i / (h - 1)])
            px, py = (xs + 1) * (w - 1) / 2, (ys + 1) * (h - 1) / 2
            x0, y0 = math.floor(px), math.floor(py)
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, i, j] += wy * wx * img[:, yy, xx]
    return out


def test_color_ops_equal_hand_formulas():
    shift, sat, con = np.array([0.3, -0.2]), np.array([1.7, 0.4]), np.array([0.6, 1.3])
    np.testing.assert_allclose(apply_brightness(IMG, torch.tensor(shift)).numpy(), NP + shift[:, None, None, None])
    ref = np.empty_like(NP)
    for n in range(2):
        for i in range(5):
            for j in range(6):
                m = NP[n, :, i, j].mean()
                ref[n, :, i, j] = (NP[n, :, i, j] - m) * sat[n] + m
    np.testing.assert_allclose(apply_saturation(IMG, torch.tensor(sat)).numpy(), ref, rtol=1e-12)
    ref = np.stack([(NP[n] - NP[n].mean()) * con[n] + NP[n].mean() for n in range(2)])
    np.testing.assert_allclose(apply_contrast(IMG, torch.tensor(con)).numpy(), ref, rtol=1e-12)


def test_crop_cutout_flip_equal_hand_loops():
    dy, dx = [1, -2], [-3, 0]
    ref = np.zeros_like(NP)
    for n in range(2):
        for i in range(5):
            for j in range(6):
                if 0 <= i + dy[n] < 5 and 0 <= j + dx[n] < 6:
                    ref[n, :, i, j] = NP[n, :, i + dy[n], j + dx[n]]
    np.testing.assert_array_equal(apply_crop(IMG, torch.tensor(dy), torch.tensor(dx), 3).numpy(), ref)
    top, left = [-1, 3], [4, 0]
    ref = NP.copy()
    for n in range(2):
        for i in range(top[n], top[n] + 3):
            for j in range(left[n], left[n] + 3):
                if 0 <= i < 5 and 0 <= j < 6:
                    ref[n, :, i, j] = 0
    np.testing.assert_array_equal(apply_cutout(IMG, torch.tensor(top), torch.tensor(left), 3, 3).numpy(), ref)
    out = apply_flip(IMG, torch.tensor([True, False])).numpy()
    np.testing.assert_array_equal(out[0], NP[0, :, :, ::-1])
    np.testing.assert_array_equal(out[1], NP[1])


def test_scale_and_rotate_equal_hand_bilinear_sampling():
    sx, sy, angle = np.array([1.15, 0.9]), np.array([0.85, 1.2]), np.array([0.2, -0.25])
    scaled = apply_scale(IMG, torch.tensor(sx), torch.tensor(sy)).numpy()
    rotated = apply_rotate(IMG, torch.tensor(angle)).numpy()
    for n in range(2):
        np.testing.assert_allclose(scaled[n], _bilinear_by_hand(NP[n], np.diag([sx[n], sy[n]])), atol=1e-10)
        c, s = math.cos(angle[n]), math.sin(angle[n])
        np.testing.assert_allclose(rotated[n], _bilinear_by_hand(NP[n], np.array([[c, -s], [s, c]])), atol=1e-10)


def test_draws_follow_the_dsa_parameters():
    p = DSAParams(mode="M")
    plan = dict(plan_dsa(p, (4000, 3, 32, 32), gen(0)))
    assert list(plan) == ["brightness", "saturation", "contrast", "crop", "cutout", "flip", "scale", "rotate"]
    assert set(plan) == set(DSA_OPS)
    within = lambda t, lo, hi: bool((t >= lo).all() and (t <= hi).all())  # noqa: E731
    assert within(plan["brightness"]["shift"], -0.5, 0.5) and within(plan["saturation"]["factor"], 0, 2)
    assert within(plan["contrast"]["factor"], 0.5, 1.5)
    assert set(plan["crop"]["dy"].tolist()) == set(range(-4, 5)) and plan["crop"]["pad"] == 4  # 0.125 * 32
    assert (plan["cutout"]["height"], plan["cutout"]["width"]) == (16, 16)
    assert within(plan["cutout"]["top"], -8, 32 - 8) and 0.45 < plan["flip"]["flip"].float().mean() < 0.55
    assert within(plan["scale"]["sx"], 1 / 1.2, 1.2) and within(plan["rotate"]["angle"], -math.pi / 12, math.pi / 12)


def test_siamese_real_and_synthetic_batches_of_different_sizes():
    """Real batch 256 vs synthetic batch 10, identically seeded: the same family every time; with ``shared`` the
    same parameters too (the synthetic batch is transformed exactly as the first real images)."""
    families = set()
    for seed in range(40):
        real = plan_dsa(DSAParams(), (256, 3, 32, 32), gen(seed))
        syn = plan_dsa(DSAParams(), (10, 3, 32, 32), gen(seed))
        assert [op for op, _ in real] == [op for op, _ in syn]
        families.add(real[0][0])
    assert len(families) >= 5  # the pick really varies with the seed
    shared = DSAParams(shared=True)
    x = torch.randn(256, 3, 32, 32, generator=gen(5))
    for seed in range(12):
        real, syn = plan_dsa(shared, tuple(x.shape), gen(seed)), plan_dsa(shared, (10, 3, 32, 32), gen(seed))
        for (op, a), (_, b) in zip(real, syn):
            for k, v in a.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v[:10], b[k]) and bool((v == v[0]).all()), (op, k)
        torch.testing.assert_close(dsa(x, shared, gen(seed))[:10], dsa(x[:10], shared, gen(seed)), rtol=0, atol=0)
