"""The published networks, and the registry the tests run over: a new net adds one entry to ``REGISTRY``."""
from .branched_unet import BranchedUNet
from .unet2d import UNet2D
from .unet3d import UNet3D
from .vgg_mil import VGGMIL
from .vnet import VNet

__all__ = ["REGISTRY", "BranchedUNet", "UNet2D", "UNet3D", "VGGMIL", "VNet"]

# name -> (a small instance, an input shape it takes [B, C, *S], K); tests/test_nets.py checks every entry's
# output shape (every tensor of a tuple/dict output) and that every parameter gets a finite gradient.
# Not here: lite_medsam.LiteMedSAM (CLISC stage 2), a pretrained box-prompted net, forward(images, boxes): it
# carries unused point/mask-prompt weights for its strict load, and a 256^2 backward takes ~40 s on one core;
# tests/test_lite_medsam.py checks it.
REGISTRY = {
    "UNet2D": (lambda: UNet2D(1, 4), (2, 1, 64, 64), 4),
    "UNet2D-deconv": (lambda: UNet2D(1, 4, upsample="deconv"), (2, 1, 64, 64), 4),
    "VNet": (lambda: VNet(1, 2, has_dropout=True), (2, 1, 32, 32, 32), 2),
    "BranchedUNet-2d-PC-SN": (lambda: BranchedUNet(1, prior_concatenation=True, separate_normalization=True),
                              (2, 1, 64, 64), 4),
    "UNet3D": (lambda: UNet3D(1, 2, channels=(4, 8, 16)), (2, 1, 16, 16, 16), 2),  # CLISC stage 3
    "VGGMIL": (lambda: VGGMIL(), (2, 3, 32, 32), 1),  # (s1, s2, s3, f) probabilities, one channel each
    "BranchedUNet-3d": (lambda: BranchedUNet(4, dims=3, channels=(4, 8, 16, 32, 64)), (2, 4, 32, 32, 32), 4),
}
