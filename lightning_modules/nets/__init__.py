"""The published networks, and the registry the tests run over: a new net adds one entry to ``REGISTRY``."""
from .unet2d import UNet2D
from .vnet import VNet

__all__ = ["REGISTRY", "UNet2D", "VNet"]

# name -> (a small instance, an input shape it takes [B, C, *S], K); tests/test_nets.py checks every entry's
# output shape (every tensor of a tuple/dict output) and that every parameter gets a finite gradient.
REGISTRY = {
    "UNet2D": (lambda: UNet2D(1, 4), (2, 1, 64, 64), 4),
    "UNet2D-deconv": (lambda: UNet2D(1, 4, upsample="deconv"), (2, 1, 64, 64), 4),
    "VNet": (lambda: VNet(1, 2, has_dropout=True), (2, 1, 32, 32, 32), 2),
}
