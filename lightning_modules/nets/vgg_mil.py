"""VGG-MIL: the DWS-MIL network of IKD-MIL (spec/methods/ikd_mil.md sec. 1; the authors' ``models/vgg_mil.py``).

Three VGG16-style blocks with BatchNorm; a 1x1-conv side output after each block, upsampled to the input size
(bilinear, align_corners=True) and squashed by a sigmoid; a fixed fusion of the three side probabilities.
Written here rather than taken from torchvision, which does not import beside the CPU torch of the default
install; ImageNet weights come only from a file (``backbone_weights``), never from a download.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lemis.errors import ConfigError

# torchvision vgg16 ``features`` indices of the seven 3x3 convs of blocks 1-3, in order.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14)
BLOCKS = ((64, 2), (128, 2), (256, 3))  # (channels, convs) per block


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class VGGMIL(nn.Module):
    """x [B, 3, H, W] (H, W multiples of 8) -> (s1, s2, s3, f), each [B, 1, H, W] probabilities;
    f = w1 s1 + w2 s2 + w3 s3 (fixed, not learned).

    Args:
        in_channels: 3 (RGB, ImageNet-normalised).
        fusion_weights: (0.3, 0.3, 0.4) as IKD-MIL (DWS/SA-MIL used 0.2/0.35/0.45).
        backbone_weights: a torchvision VGG16 state dict file (``features.{0,2,5,7,10,12,14}``): the seven convs
            start from it; null = PyTorch's default init. BatchNorm and the side heads are always fresh.
    """

    def __init__(self, in_channels: int = 3, fusion_weights: Sequence[float] = (0.3, 0.3, 0.4),
                 backbone_weights: str | None = None):
        super().__init__()
        if len(fusion_weights) != 3:
            raise ConfigError(f"model.init_args.net.init_args.fusion_weights needs 3 values, got "
                              f"{list(fusion_weights)}.")
        self.fusion_weights = tuple(float(w) for w in fusion_weights)
        blocks, c_in = [], in_channels
        for channels, n in BLOCKS:
            layers = []
            for i in range(n):
                layers += conv_bn_relu(c_in if i == 0 else channels, channels)
            blocks.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
            c_in = channels
        self.blocks = nn.ModuleList(blocks)
        self.sides = nn.ModuleList(nn.Conv2d(channels, 1, 1) for channels, _ in BLOCKS)
        if backbone_weights:
            self.load_backbone(backbone_weights)

    def convs(self) -> list[nn.Conv2d]:
        return [m for block in self.blocks for m in block if isinstance(m, nn.Conv2d)]

    def load_backbone(self, path: str) -> None:
        """The seven convs from a torchvision VGG16 state dict (``features.N.weight`` / ``.bias``)."""
        file = Path(path)
        option = "model.init_args.net.init_args.backbone_weights"
        if not file.is_file():
            raise ConfigError(f"VGG16 weights file {file} not found ({option}).")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for damaged or foreign files
            raise ConfigError(f"cannot read VGG16 weights file {file} ({type(err).__name__}).") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        for conv, index in zip(self.convs(), VGG16_CONV_INDICES):
            for name in ("weight", "bias"):
                key = f"features.{index}.{name}"
                value = state.get(key)
                target = getattr(conv, name)
                if value is None or value.shape != target.shape:
                    found = "missing" if value is None else f"shaped {tuple(value.shape)}"
                    raise ConfigError(f"VGG16 weights file {file}: {key} is {found}, expected "
                                      f"{tuple(target.shape)} ({option}).")
                with torch.no_grad():
                    target.copy_(value)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        sides = []
        for block, head in zip(self.blocks, self.sides):
            x = block(x)
            sides.append(torch.sigmoid(F.interpolate(head(x), size=size, mode="bilinear", align_corners=True)))
        w1, w2, w3 = self.fusion_weights
        return (*sides, w1 * sides[0] + w2 * sides[1] + w3 * sides[2])
