import pytest
import torch
from torch import nn

from pipeline.registry import RegistryError
from stages.train.networks import (NETWORKS, create_network, flat_params, functional_forward, num_params,
                             unflatten_params)


def test_convnet3_cifar_shapes_and_param_count():
    net = create_network("convnet", num_classes=10)
    assert num_params(net) == 320_010  # ≈320k in the MTT ConvNet (distillation.md §1.1)
    assert net.num_features == 128 * 4 * 4
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 128 and m.affine for m in norms)
    assert num_params(create_network("convnet", num_classes=100)) == 504_420  # ≈504k for CIFAR-100


def test_convnet_d4_tiny_and_norm_variants():
    net = create_network("convnet_d4", num_classes=200, image_size=64)
    assert net.num_features == 2048 and num_params(net) == 857_160  # ≈857k (§1.1)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 200)
    bn = create_network("convnet", 10, norm="batchnorm")
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    plain = create_network("convnet", 10, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in plain.modules())
    with pytest.raises(ValueError, match="unknown norm"):
        create_network("convnet", 10, norm="layerwise")


def test_resnet18_cifar_stem():
    net = create_network("resnet18", num_classes=10)
    stem_conv = net.stem[0]
    assert stem_conv.kernel_size == (3, 3) and stem_conv.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert num_params(net) == 11_173_962  # the usual CIFAR ResNet-18
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_prefix_builds_untrained_model():
    pytest.importorskip("timm")
    net = create_network("timm:resnet18", num_classes=7, in_channels=1)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_unknown_network_lists_members():
    with pytest.raises(RegistryError, match="convnet"):
        create_network("convnet9000", 10)
    assert {"convnet", "convnet_d4", "resnet18", "airbench"} <= set(NETWORKS.names())


@pytest.mark.parametrize("name,kw", [("convnet", {"width": 32}), ("convnet", {"width": 32, "norm": "batchnorm"}),
                                     ("airbench", {"width": 8})])
def test_functional_forward_matches_module(name, kw):
    torch.manual_seed(0)
    net = create_network(name, 10, **kw).eval()
    x = torch.randn(3, 3, 32, 32)
    flat = flat_params(net).requires_grad_(True)
    out = functional_forward(net, flat, x)
    torch.testing.assert_close(out, net(x))
    out.sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    # a different vector really changes the output (parameters come from `flat`, not the module)
    assert not torch.allclose(functional_forward(net, flat.detach() * 0.5, x), out)
    with pytest.raises(ValueError, match="flat parameter vector"):
        unflatten_params(net, flat[:-1])


def test_airbench_whitening_init_whitens_patches():
    torch.manual_seed(0)
    net = create_network("airbench", 10, width=8)
    mix = torch.randn(3, 3)
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16))  # correlated channels
    net.init_from_data(x)
    assert not net.whiten.weight.requires_grad
    out = nn.functional.conv2d(x, net.whiten.weight)[:, :12]  # the + half of the filters, no bias
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / len(flat)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=0.02, rtol=0)
