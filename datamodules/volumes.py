"""VolumeDataModule: NIfTI volumes [C, x, y, z] trained as 3D patches or as 2D axial slices (nnU-Net, MSD, BraTS).

``dim: 3`` trains on random patches (random 90-degree rotation and flip in the first two axes, then a crop: the
UA-MT transform, one draw for every channel) and evaluates whole volumes by sliding window; ``dim: 2`` trains on
the axial slices (the file's last axis) resized to ``patch_size`` with the SSL4MIS rotations, and evaluates slice
by slice (``infer_mode: slices``: the slice axis goes first). An evaluation case carries what a written prediction
needs to lie on its scan: the input's ``affine``, ``axes`` (the file axis each axis came from) and ``crop``
(offset and full shape, when the DataModule cropped the volume).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from datamodules.base import SegmentationDataModule
from datamodules.transforms import crop, random_rotate, zoom_nearest
from lemis.errors import ConfigError, DataError

VOLUME_AUGMENTS = ("rot_flip_crop", "crop")


def rot_flip(image: np.ndarray, label: np.ndarray | None):
    """np.rot90 by k in {0..3} in the spatial axes 1, 2 of image [C, *S] (0, 1 of label [*S]), then a flip along
    one of them: one draw for every channel."""
    k, axis = int(torch.randint(0, 4, (1,))), int(torch.randint(0, 2, (1,)))
    image = np.flip(np.rot90(image, k, axes=(1, 2)), axis=axis + 1).copy()
    if label is not None:
        label = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis).copy()
    return image, label


def slice_transform(image: np.ndarray, label: np.ndarray | None, patch: tuple[int, int]):
    """SSL4MIS RandomGenerator for a multi-channel slice [C, H, W]: rot/flip with p 0.5, else a rotation in
    [-20, 20) degrees (order 0), then an order-0 resize to ``patch``."""
    if float(torch.rand(())) > 0.5:
        image, label = rot_flip(image, label)
    else:
        rotated, label = random_rotate(np.moveaxis(image, 0, -1), label)  # (H, W, C): rotates H, W only
        image = np.moveaxis(rotated, -1, 0)
    return zoom_nearest(image, patch), None if label is None else zoom_nearest(label, patch)


def header_depth(location_image) -> int:
    """Number of axial slices (the last spatial axis) of a NIfTI image, from its header."""
    import nibabel as nib

    first = location_image[0] if isinstance(location_image, list) else location_image
    try:
        return int(nib.load(str(first)).shape[2])
    except Exception as err:  # nibabel raises several types for damaged files
        raise DataError(f"cannot read {first} as NIfTI ({type(err).__name__}).") from None


class VolumeDataModule(SegmentationDataModule):
    """Training items and tensors of NIfTI volumes (module docstring); a subclass finds the cases and reads them
    (its ``targets`` returns image [C, x, y, z] float32, label [x, y, z]).

    Args (beyond SegmentationDataModule's): dim: 3 (patches, sliding window) or 2 (axial slices); augment (3D):
        ``rot_flip_crop`` (UA-MT: rot90/flip, then a random patch) or ``crop`` (a random patch only).
    """

    def __init__(self, root: str, num_classes: int, dim: int = 3, augment: str = "rot_flip_crop", **kwargs):
        kwargs.setdefault("patch_size", (128, 128, 128) if dim == 3 else (256, 256))
        super().__init__(root=root, num_classes=num_classes, **kwargs)
        if dim not in (2, 3):
            raise ConfigError(f"data.init_args.dim must be 2 or 3, got {dim}.")
        if len(self.patch_size) != dim:
            raise ConfigError(f"data.init_args.patch_size={list(self.patch_size)} has {len(self.patch_size)} axes "
                              f"but data.init_args.dim={dim}.")
        if augment not in VOLUME_AUGMENTS:
            raise ConfigError(f"data.init_args.augment must be one of {VOLUME_AUGMENTS}, got {augment!r}.")
        self.dim, self.augment = dim, augment

    def volume_items(self, cases: list[str], image_of: Callable[[str], object]) -> list[str]:
        """Training items: whole cases (3D) or ``case/z`` for every axial slice (2D; the depth from the header of
        ``image_of(case)``, the case's image location)."""
        if self.dim == 3:
            return cases
        return [f"{case}/{z}" for case in cases for z in range(header_depth(image_of(case)))]

    def train_sample(self, data: dict, item: str) -> dict:
        image, label = data["image"], data.get("label")
        if self.dim == 2:
            z = int(item.split("/")[1])
            image, label = slice_transform(image[..., z], None if label is None else label[..., z], self.patch_size)
        else:
            if self.augment == "rot_flip_crop":
                image, label = rot_flip(image, label)
            image, label = crop(image, label, self.patch_size)
        sample = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), "case": item}
        if label is not None:
            sample["label"] = torch.from_numpy(label.astype(np.int64))
        return sample

    def eval_case(self, data: dict, case: str) -> dict:
        """3D: image [C, x, y, z]; 2D: the slice axis first, [C, z, x, y]; plus ``spacing`` (in the same axis
        order), ``affine``, ``axes`` and, for a cropped volume, ``crop``."""
        attrs = data["attrs"]
        spacing = tuple(float(s) for s in attrs["spacing"])
        image, label, axes = data["image"], data.get("label"), (0, 1, 2)
        if self.dim == 2:
            axes = (2, 0, 1)
            image, spacing = np.moveaxis(image, -1, 1), tuple(spacing[a] for a in axes)
            label = None if label is None else np.moveaxis(label, -1, 0)
        out = {"image": torch.from_numpy(np.ascontiguousarray(image)), "case": case, "spacing": spacing,
               "affine": np.asarray(attrs["affine"], dtype=np.float64), "axes": axes}
        if "crop" in attrs:
            out["crop"] = attrs["crop"]
        if label is not None:
            out["label"] = torch.from_numpy(label.astype(np.int64))
        return out
