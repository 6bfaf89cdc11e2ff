"""The 2D UNet of SSL4MIS (HiLab-git/SSL4MIS, ``code/networks/unet.py``, class ``UNet``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """Two 3x3 conv -> BN -> LeakyReLU layers, dropout in between: [B, c_in, H, W] -> [B, c_out, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.01),
            # Element-wise dropout, not Dropout2d: that is what SSL4MIS uses.
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.01),
        )


class DownBlock(nn.Sequential):
    """2x2 max pooling then a ConvBlock: [B, c_in, H, W] -> [B, c_out, H/2, W/2]."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(nn.MaxPool2d(2), ConvBlock(in_channels, out_channels, dropout))


class UpBlock(nn.Module):
    """2x upsampling to the skip's width, concatenation [skip, up], then a ConvBlock without dropout.

    ``upsample="deconv"``: 2x2 stride-2 transposed conv. ``upsample="bilinear"``: 1x1 conv, then bilinear
    interpolation with ``align_corners=True``.

    forward(x [B, c_in, H, W], skip [B, c_skip, 2H, 2W]) -> [B, c_skip, 2H, 2W].
    """

    def __init__(self, in_channels: int, skip_channels: int, upsample: str) -> None:
        super().__init__()
        if upsample == "deconv":
            self.up = nn.ConvTranspose2d(in_channels, skip_channels, kernel_size=2, stride=2)
        elif upsample == "bilinear":
            self.up = nn.Sequential(
                nn.Conv2d(in_channels, skip_channels, kernel_size=1),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            )
        else:
            raise ValueError(f"upsample must be 'deconv' or 'bilinear', got {upsample!r}")
        self.conv = ConvBlock(2 * skip_channels, skip_channels, dropout=0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet2D(nn.Module):
    """The SSL4MIS 2D UNet, layer for layer.

    Encoder: ``encoder[0]`` is the input ConvBlock, ``encoder[1:]`` are DownBlocks; level ``i`` has
    ``channels[i]`` features and dropout ``dropout[i]``. Decoder: one UpBlock per DownBlock, deepest
    first. ``out_conv`` is a 3x3 conv (not 1x1) to ``num_classes``. Default PyTorch initialisation.

    ``upsample="bilinear"`` (default) is what SSL4MIS's ``UNet`` runs in every version of its code: a 1x1
    conv, then bilinear x2 upsampling (align_corners=True); 1,813,764 parameters with 1 channel, 4 classes.
    ``upsample="deconv"`` is the 2x2 stride-2 transposed conv that spec/methods/mean_teacher.md sec. 5
    describes (1,944,324 parameters); the SSL4MIS flag that would select it never reaches the UpBlocks.
    Module names differ from SSL4MIS, but the state_dict entries come in the same order with the
    same shapes, so an SSL4MIS checkpoint loads by position.

    forward(x [B, in_channels, H, W]) -> logits [B, num_classes, H, W]; H and W must be divisible by
    ``2 ** (len(channels) - 1)`` (16 by default).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        if len(channels) != len(dropout) or len(channels) < 2:
            raise ValueError(
                f"channels and dropout need the same length >= 2, got {tuple(channels)} and {tuple(dropout)}"
            )
        self.divisor = 2 ** (len(channels) - 1)
        self.encoder = nn.ModuleList([ConvBlock(in_channels, channels[0], dropout[0])])
        self.encoder.extend(DownBlock(c_in, c_out, p) for c_in, c_out, p in zip(channels, channels[1:], dropout[1:]))
        deep_to_shallow = list(reversed(channels))
        self.decoder = nn.ModuleList(
            UpBlock(c_in, c_skip, upsample) for c_in, c_skip in zip(deep_to_shallow, deep_to_shallow[1:])
        )
        self.out_conv = nn.Conv2d(channels[0], num_classes, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(size % self.divisor for size in x.shape[2:]):
            raise ValueError(f"UNet2D needs spatial sizes divisible by {self.divisor}, got {tuple(x.shape[2:])}")
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up, skip in zip(self.decoder, reversed(skips)):
            x = up(x, skip)
        return self.out_conv(x)
