"""The 3D VNet of UA-MT (yulequan/UA-MT, ``code/networks/vnet.py``, class ``VNet``)."""

from __future__ import annotations

import torch
from torch import nn

NORMALIZATIONS = ("batchnorm", "groupnorm", "instancenorm", "none")


def _norm_relu(normalization: str, channels: int) -> list[nn.Module]:
    """The layers that follow every conv in UA-MT: the chosen normalization (if any), then ReLU."""
    if normalization == "batchnorm":
        layers = [nn.BatchNorm3d(channels)]
    elif normalization == "groupnorm":
        layers = [nn.GroupNorm(num_groups=16, num_channels=channels)]
    elif normalization == "instancenorm":
        # Non-affine, PyTorch's default and what UA-MT gets.
        layers = [nn.InstanceNorm3d(channels)]
    elif normalization == "none":
        layers = []
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    # In place is safe: each ReLU follows a conv or norm whose output nothing else reads.
    return [*layers, nn.ReLU(inplace=True)]


class ConvBlock(nn.Sequential):
    """``n_convs`` x [3x3x3 conv -> norm -> ReLU], no residual: [B, c_in, H, W, D] -> [B, c_out, H, W, D]."""

    def __init__(self, n_convs: int, in_channels: int, out_channels: int, normalization: str) -> None:
        layers = []
        for i in range(n_convs):
            layers.append(nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1))
            layers.extend(_norm_relu(normalization, out_channels))
        super().__init__(*layers)


class DownStage(nn.Sequential):
    """2x2x2 stride-2 conv -> norm -> ReLU, then a ConvBlock: [B, c_in, H, W, D] -> [B, c_out, H/2, W/2, D/2]."""

    def __init__(self, n_convs: int, in_channels: int, out_channels: int, normalization: str) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2),
            *_norm_relu(normalization, out_channels),
            ConvBlock(n_convs, out_channels, out_channels, normalization),
        )


class UpStage(nn.Module):
    """2x2x2 stride-2 transposed conv -> norm -> ReLU, plus the skip (an addition), then a ConvBlock.

    forward(x [B, c_in, H, W, D], skip [B, c_out, 2H, 2W, 2D]) -> [B, c_out, 2H, 2W, 2D].
    """

    def __init__(self, n_convs: int, in_channels: int, out_channels: int, normalization: str) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2),
            *_norm_relu(normalization, out_channels),
        )
        self.conv = ConvBlock(n_convs, out_channels, out_channels, normalization)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x) + skip)


class VNet(nn.Module):
    """The UA-MT VNet, layer for layer: five levels of ``n_filters * (1, 2, 4, 8, 16)`` channels.

    Encoder: ``encoder[0]`` is block1 (1 conv); ``encoder[1:]`` are DownStages with 2, 3, 3, 3 convs
    (block2..block5). Decoder: UpStages with 3, 3, 2, 1 convs (block6..block9); skips are added, not
    concatenated. ``out_conv`` is a 1x1x1 conv to ``num_classes``. ``normalization`` is one of
    ``NORMALIZATIONS`` as in UA-MT (groupnorm uses 16 groups, instancenorm is non-affine).
    With the defaults and 2 classes the net has 9,448,866 parameters. Default PyTorch initialisation.
    Module names differ from UA-MT, but the state_dict entries come in the same order with the same
    shapes, so a UA-MT checkpoint loads by position.

    With ``has_dropout`` a Dropout3d(0.5) acts on the block5 output and on the block9 output. UA-MT
    trains student and teacher with ``has_dropout=True`` and tests with ``has_dropout=False``; since
    PyTorch dropout is inactive in ``eval()`` mode and has no parameters, a ``has_dropout=True`` net in
    eval mode computes exactly what the test net computes with the same weights.

    forward(x [B, in_channels, H, W, D]) -> logits [B, num_classes, H, W, D]; H, W, D must be
    divisible by 16.
    """

    divisor = 16

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        n_filters: int = 16,
        normalization: str = "batchnorm",
        has_dropout: bool = False,
    ) -> None:
        super().__init__()
        widths = [n_filters * 2**i for i in range(5)]
        depths = (1, 2, 3, 3, 3)
        self.has_dropout = has_dropout
        self.encoder = nn.ModuleList([ConvBlock(depths[0], in_channels, widths[0], normalization)])
        self.encoder.extend(
            DownStage(n, c_in, c_out, normalization) for n, c_in, c_out in zip(depths[1:], widths, widths[1:])
        )
        # The decoder mirrors the encoder: 3, 3, 2, 1 convs from 8n down to n channels.
        self.decoder = nn.ModuleList(
            UpStage(depths[i], widths[i + 1], widths[i], normalization) for i in reversed(range(4))
        )
        self.dropout = nn.Dropout3d(0.5) if has_dropout else nn.Identity()
        self.out_conv = nn.Conv3d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(size % self.divisor for size in x.shape[2:]):
            raise ValueError(f"VNet needs spatial sizes divisible by {self.divisor}, got {tuple(x.shape[2:])}")
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = self.dropout(skips.pop())
        for up, skip in zip(self.decoder, reversed(skips)):
            x = up(x, skip)
        return self.out_conv(self.dropout(x))
