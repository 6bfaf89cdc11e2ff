"""Segmentation nets: shapes, gradients reaching every parameter, published sizes, mode behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks import nets as monai_nets
from torch import nn

from lightning_modules.nets import REGISTRY, UNet2D, VNet


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# Every registered lemis net, and MONAI nets standing in for "any net by class_path".
NETS = [pytest.param(*entry, id=name) for name, entry in REGISTRY.items()] + [
    pytest.param(
        lambda: monai_nets.UNet(
            spatial_dims=2, in_channels=1, out_channels=4, channels=(8, 16, 32), strides=(2, 2), num_res_units=1
        ),
        (2, 1, 64, 64),
        4,
        id="monai-UNet-2d",
    ),
    pytest.param(
        lambda: monai_nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)),
        (2, 1, 32, 32, 32),
        2,
        id="monai-BasicUNet-3d",
    ),
]


def flat_outputs(output) -> list[torch.Tensor]:
    """Every tensor of a net's output (a tensor, or a tuple/list/dict of them, nested)."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output
    return [t for value in values for t in flat_outputs(value)]


@pytest.mark.parametrize(("factory", "shape", "num_classes"), NETS)
def test_forward_backward_reaches_every_parameter(factory, shape, num_classes):
    torch.manual_seed(0)
    net = factory().train()
    x = torch.randn(shape)
    outputs = flat_outputs(net(x))
    logits = outputs[0]
    assert logits.shape == (shape[0], num_classes, *shape[2:])
    assert all(torch.isfinite(t).all() for t in outputs)

    target = torch.randint(num_classes, (shape[0], *shape[2:]))
    (F.cross_entropy(logits, target) + sum(t.float().mean() for t in outputs[1:])).backward()
    # A parameter with no gradient sits on a branch that forward() never uses.
    no_grad = [name for name, p in net.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    non_finite = [name for name, p in net.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not non_finite, f"parameters with non-finite gradient: {non_finite}"


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        pytest.param(lambda: UNet2D(1, 4, upsample="deconv"), 1_944_324, id="UNet2D-deconv"),
        pytest.param(lambda: UNet2D(1, 4), 1_813_764, id="UNet2D-bilinear"),
        pytest.param(lambda: VNet(1, 2), 9_448_866, id="VNet"),
        pytest.param(lambda: VNet(1, 2, has_dropout=True), 9_448_866, id="VNet-dropout"),
    ],
)
def test_published_parameter_counts(factory, expected):
    assert n_params(factory()) == expected


@pytest.mark.parametrize("normalization", ["batchnorm", "groupnorm", "instancenorm", "none"])
def test_vnet_normalizations(normalization):
    net = VNet(1, 3, normalization=normalization)
    # 32^3 so instance norm still sees 2x2x2 voxels at the deepest level.
    assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="normalization must be one of"):
        VNet(normalization="layernorm")
    with pytest.raises(ValueError, match="upsample must be"):
        UNet2D(upsample="nearest")
    with pytest.raises(ValueError, match="same length"):
        UNet2D(channels=(16, 32), dropout=(0.1,))


def test_vnet_rejects_sizes_not_divisible_by_16():
    with pytest.raises(ValueError, match=r"VNet needs spatial sizes divisible by 16, got \(24, 32, 32\)"):
        VNet()(torch.randn(1, 1, 24, 32, 32))


def test_unet2d_rejects_sizes_not_divisible_by_16():
    with pytest.raises(ValueError, match=r"UNet2D needs spatial sizes divisible by 16, got \(64, 40\)"):
        UNet2D()(torch.randn(1, 1, 64, 40))


@torch.no_grad()
def test_unet2d_modes_differ_only_by_dropout_and_batchnorm():
    torch.manual_seed(0)
    net = UNet2D(1, 4)
    x = torch.randn(2, 1, 32, 32)
    net.eval()
    reference = net(x)
    assert torch.equal(net(x), reference)

    net.train()
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, nn.BatchNorm2d):
            module.eval()
    torch.testing.assert_close(net(x), reference)
    # Last, because batch statistics in train mode also update the running ones.
    assert not torch.allclose(net.train()(x), reference)


@torch.no_grad()
def test_vnet_with_dropout_in_eval_mode_is_the_test_net():
    torch.manual_seed(0)
    train_net = VNet(1, 2, has_dropout=True)
    test_net = VNet(1, 2, has_dropout=False)
    test_net.load_state_dict(train_net.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(train_net.eval()(x), test_net.eval()(x))
