"""Networks for curation baselines and dataset distillation, behind one registry.

``create_network(name, num_classes, ...)`` builds any member; ``timm:<model>`` builds a timm model (randomly
initialised: weights are never downloaded). Every network can also run *functionally* from one flat parameter
vector (``flat_params`` / ``functional_forward``), which trajectory matching (MTT/FTD/TESLA) needs to unroll
student updates without touching module state.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.registry import Registry

NetworkFactory = Callable[..., nn.Module]
NETWORKS: Registry[NetworkFactory] = Registry("network")

TIMM_PREFIX = "timm:"


def create_network(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kw: Any) -> nn.Module:
    """Build a registered network (or ``timm:<name>``, pretrained=False) for ``image_size`` inputs.

    ``image_size`` is not forwarded to timm (most timm CNNs are size-agnostic); pass ``img_size=`` for models
    that need it.
    """
    if name.startswith(TIMM_PREFIX):
        import timm  # optional dependency: only needed for timm models

        return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels, **kw)
    return NETWORKS.get(name)(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw)


# --------------------------------------------------------------------------------------------------------------
# Flat-parameter view (MTT's ReparamModule, done with torch.func instead of re-registering parameters)


def flat_params(model: nn.Module) -> Tensor:
    """All parameters (``model.parameters()`` order) concatenated into one 1-D tensor (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflatten_params(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """Split ``flat`` into views shaped like ``model``'s named parameters (differentiable w.r.t. ``flat``)."""
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat parameter vector has shape {tuple(flat.shape)}, model needs ({total},)")
    out, offset = {}, 0
    for name, p in named:
        out[name] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def functional_forward(model: nn.Module, flat: Tensor, x: Tensor) -> Tensor:
    """``model(x)`` with parameters taken from ``flat``; buffers (BN statistics) stay the module's own."""
    return torch.func.functional_call(model, unflatten_params(model, flat), (x,))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# ConvNet (DC / DSA / MTT family)


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "instancenorm":  # what the DC/MTT code calls instance norm: one group per channel, affine
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{norm}'; expected instancenorm, batchnorm or none")


class ConvNet(nn.Module):
    """``depth`` x [conv3x3 -> norm -> relu -> avgpool2], then a linear head on the flattened features."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 128,
                 depth: int = 3, norm: str = "instancenorm") -> None:
        super().__init__()
        if image_size >> depth < 1:
            raise ValueError(f"ConvNet depth {depth} pools a {image_size}px image below 1px")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), _norm_layer(norm, width), nn.ReLU(),
                       nn.AvgPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = width * (image_size >> depth) ** 2
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Flattened embedding before the classifier (DataDAM's MMD term, DM's embedding)."""
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


@NETWORKS.register("convnet")
def convnet(num_classes: int, in_channels: int = 3, image_size: int = 32, **kw: Any) -> nn.Module:
    return ConvNet(num_classes, in_channels, image_size, **kw)


@NETWORKS.register("convnet_d4")
def convnet_d4(num_classes: int, in_channels: int = 3, image_size: int = 32, **kw: Any) -> nn.Module:
    return ConvNet(num_classes, in_channels, image_size, **{"depth": 4, **kw})


@NETWORKS.register("convnet_d5")
def convnet_d5(num_classes: int, in_channels: int = 3, image_size: int = 32, **kw: Any) -> nn.Module:
    return ConvNet(num_classes, in_channels, image_size, **{"depth": 5, **kw})


# --------------------------------------------------------------------------------------------------------------
# ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), as in DC-bench / SRe2L's small-image variant


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, blocks: tuple[int, ...] = (2, 2, 2, 2),
                 width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stages += [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


@NETWORKS.register("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32, **kw: Any) -> nn.Module:
    return ResNet(num_classes, in_channels, (2, 2, 2, 2), **kw)


# --------------------------------------------------------------------------------------------------------------
# airbench94-style net (Keller Jordan's cifar10-airbench): patch-whitening stem, three conv groups, BN with frozen
# scale, GELU, scaled logits. ``init_from_data`` sets the whitening filters from training patches; the trainer
# calls it on the first (normalised) training images when a network defines it.


class _Conv(nn.Conv2d):
    """Bias-free 3x3 'same' conv with identity (dirac) init on the first in-channels: an implicit residual."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding="same", bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:cin])


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)  # airbench's momentum 0.6 in its convention
    bn.weight.requires_grad_(False)  # only the shift is learned
    return bn


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.norm1 = _Conv(cin, cout), _bn(cout)
        self.conv2, self.norm2 = _Conv(cout, cout), _bn(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64, whiten_kernel: int = 2,
                 logit_scale: float = 1 / 9) -> None:
        super().__init__()
        wwidth = 2 * in_channels * whiten_kernel ** 2
        self.whiten = nn.Conv2d(in_channels, wwidth, whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from data, then frozen
        nn.init.zeros_(self.whiten.bias)
        self.groups = nn.Sequential(ConvGroup(wwidth, width), ConvGroup(width, 4 * width),
                                    ConvGroup(4 * width, 4 * width))
        self.num_features = 4 * width
        self.head = nn.Linear(4 * width, num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_from_data(self, x: Tensor, eps: float = 5e-4) -> None:
        """Whitening filters = +/- eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue)."""
        k = self.whiten.kernel_size[0]
        c = x.shape[1]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c * k * k).double()
        eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))
        eigval, eigvec = eigval.flip(0), eigvec.T.flip(0)  # largest first
        filt = (eigvec / torch.sqrt(eigval.clamp_min(0) + eps)[:, None]).reshape(c * k * k, c, k, k)
        self.whiten.weight.copy_(torch.cat([filt, -filt]).to(self.whiten.weight))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        return F.adaptive_max_pool2d(x, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)) * self.logit_scale


@NETWORKS.register("airbench")
def airbench(num_classes: int, in_channels: int = 3, image_size: int = 32, **kw: Any) -> nn.Module:
    return AirbenchNet(num_classes, in_channels, **kw)
