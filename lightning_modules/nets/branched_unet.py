"""The subclass-learning U-Net with a coarse and a fine head (spec/methods/subclass.md sec. 2; the authors'
``networks/singlybranchedunet.py``), in 2D (ACDC) and 3D (BraTS): one class, ``dims`` switches the convolutions.

Backbone: 5 levels of ``conv3-BN-ReLU-conv3-BN-ReLU`` (16-32-64-128-256), max-pool 2; the decoder upsamples x2
(bilinear / trilinear), concatenates the skip and applies a block. Dropout 0.3 on the bottleneck and on the
16-channel feature map F before the head. With Separate Normalization the last decoder block ends with a bare
conv (v2, quirk Q2): normalisation then happens only inside the head's branches.

Head, F [B, 16, *S] -> {"fine": z_f [B, K_f, *S], "coarse": z_c [B, K_c, *S]}, with G = BN-ReLU-conv3-ReLU:
    plain: h = G(F), z_c = conv1(h), z_f = conv1(h)
    PC:    z_f = conv1(cat[h, z_c])                           (raw coarse logits, not probabilities)
    SN:    one branch per superclass c (G_c, 1 coarse logit, its fine logits from conv1(h_c) or, with PC,
           conv1(cat[h_c, z_c])) and one background branch whose single logit is channel 0 of both z_c and
           z_f (the shared background logit).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from datamodules.hierarchy import Hierarchy


def conv(dims: int, c_in: int, c_out: int, kernel: int) -> nn.Module:
    return (nn.Conv2d if dims == 2 else nn.Conv3d)(c_in, c_out, kernel_size=kernel, padding=kernel // 2)


def batch_norm(dims: int, channels: int) -> nn.Module:
    return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)


def block(dims: int, c_in: int, c_out: int, bare_end: bool = False) -> nn.Sequential:
    """conv3-BN-ReLU-conv3-BN-ReLU, or ending at the second conv (``bare_end``)."""
    layers = [conv(dims, c_in, c_out, 3), batch_norm(dims, c_out), nn.ReLU(inplace=True), conv(dims, c_out, c_out, 3)]
    if not bare_end:
        layers += [batch_norm(dims, c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def head_features(dims: int, channels: int) -> nn.Sequential:
    """G(.) = BN -> ReLU -> conv3 (channels -> channels) -> ReLU."""
    return nn.Sequential(batch_norm(dims, channels), nn.ReLU(inplace=True), conv(dims, channels, channels, 3),
                         nn.ReLU(inplace=True))


class SharedHead(nn.Module):
    """plain / Prior Concatenation: one G for both heads. [B, F, *S] -> (z_c [B, K_c], z_f [B, K_f])."""

    def __init__(self, dims: int, channels: int, hierarchy: Hierarchy, prior_concatenation: bool):
        super().__init__()
        self.prior_concatenation = prior_concatenation
        self.features = head_features(dims, channels)
        self.coarse = conv(dims, channels, hierarchy.num_coarse, 1)
        self.fine = conv(dims, channels + (hierarchy.num_coarse if prior_concatenation else 0), hierarchy.num_fine, 1)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(f)
        z_c = self.coarse(h)
        return z_c, self.fine(torch.cat([h, z_c], 1) if self.prior_concatenation else h)


class SuperclassBranch(nn.Module):
    """Separate Normalization, one superclass: its own G, one coarse logit, its fine logits.
    [B, F, *S] -> (z [B, 1, *S], s [B, n_fine, *S])."""

    def __init__(self, dims: int, channels: int, n_fine: int, prior_concatenation: bool):
        super().__init__()
        self.prior_concatenation = prior_concatenation
        self.features = head_features(dims, channels)
        self.coarse = conv(dims, channels, 1, 1)
        self.fine = conv(dims, channels + (1 if prior_concatenation else 0), n_fine, 1)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(f)
        z = self.coarse(h)
        return z, self.fine(torch.cat([h, z], 1) if self.prior_concatenation else h)


class SeparateHead(nn.Module):
    """Separate Normalization: a background branch and one ``SuperclassBranch`` per superclass (mapping order);
    channel 0 of z_c and z_f is the same background logit. [B, F, *S] -> (z_c [B, K_c], z_f [B, K_f])."""

    def __init__(self, dims: int, channels: int, hierarchy: Hierarchy, prior_concatenation: bool):
        super().__init__()
        self.background = nn.Sequential(head_features(dims, channels), conv(dims, channels, 1, 1))
        self.branches = nn.ModuleList(SuperclassBranch(dims, channels, len(group), prior_concatenation)
                                      for group in hierarchy.groups)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_bg = self.background(f)
        coarse, fine = zip(*(branch(f) for branch in self.branches))
        return torch.cat([z_bg, *coarse], 1), torch.cat([z_bg, *fine], 1)


class BranchedUNet(nn.Module):
    """U-Net with coarse and fine heads.

    Args:
        in_channels: image channels (ACDC 1, BraTS 4).
        mapping: {superclass: [fine ids]} (``datamodules.hierarchy``; ACDC and BraTS ``{1: [1, 2, 3]}``).
        dims: 2 or 3.
        channels: per level (16, 32, 64, 128, 256).
        dropout: p on the bottleneck and on F (0.3).
        prior_concatenation, separate_normalization: the head options (sec. 2).

    forward(x [B, C, *S], sides divisible by 16) -> {"fine": [B, K_f, *S], "coarse": [B, K_c, *S]}.
    """

    def __init__(self, in_channels: int, mapping: dict[int, list[int]] | None = None, dims: int = 2,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), dropout: float = 0.3,
                 prior_concatenation: bool = False, separate_normalization: bool = False):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        hierarchy = Hierarchy.from_mapping(mapping or {1: [1, 2, 3]}, "model.init_args.net.init_args.mapping")
        self.mapping = hierarchy.mapping
        channels = list(channels)
        self.encoder = nn.ModuleList(block(dims, c_in, c_out) for c_in, c_out in zip([in_channels] + channels,
                                                                                     channels))
        self.pool = (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear" if dims == 2 else "trilinear", align_corners=False)
        skips = channels[-2::-1]
        self.decoder = nn.ModuleList(
            block(dims, c_below + c_skip, c_skip, bare_end=separate_normalization and i == len(skips) - 1)
            for i, (c_below, c_skip) in enumerate(zip(channels[:0:-1], skips)))
        self.dropout = nn.Dropout(dropout)
        head = SeparateHead if separate_normalization else SharedHead
        self.head = head(dims, channels[0], hierarchy, prior_concatenation)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """F [B, channels[0], *S]: the backbone's last feature map, before dropout."""
        skips = []
        for i, level in enumerate(self.encoder):
            x = level(x if i == 0 else self.pool(x))
            skips.append(x)
        x = self.dropout(skips.pop())
        for level in self.decoder:
            x = level(torch.cat([skips.pop(), self.up(x)], 1))
        return x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z_c, z_f = self.head(self.dropout(self.features(x)))
        return {"fine": z_f, "coarse": z_c}
