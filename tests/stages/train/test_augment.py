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
