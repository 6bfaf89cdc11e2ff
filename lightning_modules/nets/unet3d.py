"""The 3D UNet of CLISC's stage 3 (spec/methods/clisc.md, "Stage 3"; the authors' ``networks/unet_3D.py`` with
feature scale 4, instance norm)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvBlock3D(nn.Sequential):
    """Two (3x3x3 conv, padding 1 -> InstanceNorm3d without affine -> ReLU): [B, c_in, *S] -> [B, c_out, *S]."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.InstanceNorm3d(out_channels, affine=False),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.InstanceNorm3d(out_channels, affine=False),
            nn.ReLU(inplace=True),
        )


class UpBlock3D(nn.Module):
    """Trilinear x2 upsampling of the deeper features, concatenation [skip, up], a ConvBlock3D.

    forward(x [B, c_in, D, H, W], skip [B, c_skip, 2D, 2H, 2W]) -> [B, c_skip, 2D, 2H, 2W]."""

    def __init__(self, in_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.conv = ConvBlock3D(in_channels + skip_channels, skip_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet3D(nn.Module):
    """CLISC's 3D UNet: ``encoder[0]`` a ConvBlock3D, ``encoder[i]`` 2x max pooling then a ConvBlock3D with
    ``channels[i]`` features (the last one is the centre); one UpBlock3D a pooling, deepest first; dropout 0.3 after
    the centre and after the last decoder block; a 1x1x1 conv to ``num_classes``. Convolution weights Kaiming normal
    (fan in), biases PyTorch's default. Published: channels (16, 32, 64, 128, 256), 1 channel in, 2 classes out,
    5,884,050 parameters.

    forward(x [B, in_channels, D, H, W]) -> logits [B, num_classes, D, H, W]; D, H, W divisible by
    ``2 ** (len(channels) - 1)`` (16 by default) and at least twice that (instance norm needs more than one voxel
    at the centre)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, channels: Sequence[int] = (16, 32, 64, 128, 256),
                 dropout: float = 0.3) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"UNet3D needs at least two levels of channels, got {tuple(channels)}")
        self.factor = 2 ** (len(channels) - 1)
        self.encoder = nn.ModuleList([ConvBlock3D(in_channels, channels[0])])
        self.encoder.extend(nn.Sequential(nn.MaxPool3d(2), ConvBlock3D(a, b)) for a, b in zip(channels, channels[1:]))
        self.decoder = nn.ModuleList(UpBlock3D(a, b) for a, b in zip(channels[:0:-1], channels[-2::-1]))
        self.centre_dropout = nn.Dropout(dropout)
        self.out_dropout = nn.Dropout(dropout)
        self.out_conv = nn.Conv3d(channels[0], num_classes, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.factor for s in x.shape[2:]):
            raise ValueError(f"UNet3D needs spatial sizes divisible by {self.factor}, got {tuple(x.shape[2:])}")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = self.centre_dropout(skips.pop())
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(x, skip)
        return self.out_conv(self.out_dropout(x))
