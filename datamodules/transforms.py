"""The published augmentations, written once (SSL4MIS 2D RandomGenerator; UA-MT 3D RandomRotFlip + RandomCrop).

Arrays are numpy, spatial axes only (no channel axis); ``label`` may be None for the unlabeled stream.
Random draws use torch's generator; the training datasets seed it per sample (``datamodules.streams.seeded``), so a
sample's augmentation depends only on the run seed and its place in the stream, whatever the worker count.
MONAI's RandRotate90/RandFlip/RandRotate/Resize draw and interpolate differently (linear resize, other
probabilities); the published protocol resizes images AND labels with order-0 ``scipy.ndimage.zoom``,
so those two operations are reproduced here exactly.
"""
from __future__ import annotations

from functools import reduce

import numpy as np
import torch
from scipy import ndimage


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high) from torch's RNG."""
    return int(torch.randint(low, high, (1,)).item())


def _rand() -> float:
    return float(torch.rand(()).item())


def zoom_nearest_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source index of every output index of ``scipy.ndimage.zoom(order=0)`` along one axis, and whether scipy
    takes it (False: scipy writes its fill value 0 there).

    scipy maps output o to input c = o * ((in - 1) / (out - 1)), rounds half up, and treats c > in - 1 as outside
    the image (mode ``constant``): float rounding puts the last output just past the edge for some sizes
    (128 -> 154 and 128 -> 232, two ACDC slice sizes), so SSL4MIS's zoomed-back predictions have a background
    last row or column there. tests/test_transforms.py checks equality with scipy over a grid of sizes.
    """
    if out_size == 1 or in_size == 1:
        return np.zeros(out_size, dtype=np.int64), np.ones(out_size, dtype=bool)
    coord = np.arange(out_size) * ((in_size - 1) / (out_size - 1))
    return np.minimum(np.floor(coord + 0.5), in_size - 1).astype(np.int64), coord <= in_size - 1


def zoom_nearest(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Order-0 zoom of the last len(size) axes of ``array`` to ``size`` (the result of scipy's zoom)."""
    lead = array.ndim - len(size)
    axes = [zoom_nearest_indices(n, m) for n, m in zip(array.shape[lead:], size)]
    out = array[(Ellipsis, *np.ix_(*[index for index, _ in axes]))]  # fancy indexing: a copy
    if not all(keep.all() for _, keep in axes):
        inside = reduce(np.logical_and, np.meshgrid(*[keep for _, keep in axes], indexing="ij", sparse=True))
        out[..., ~inside] = 0
    return out


def zoom_nearest_torch(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Order-0 zoom of the last len(size) dims of a tensor (device-agnostic twin of ``zoom_nearest``)."""
    for axis, (n, m) in enumerate(zip(x.shape[-len(size):], size), start=x.ndim - len(size)):
        if n != m:
            index, keep = zoom_nearest_indices(n, m)
            x = x.index_select(axis, torch.from_numpy(index).to(x.device))
            if not keep.all():
                shape = [1] * x.ndim
                shape[axis] = m
                x = x * torch.from_numpy(keep).to(x.device, x.dtype).view(shape)
    return x


def random_rot_flip(image: np.ndarray, label: np.ndarray | None):
    """np.rot90 by k in {0..3} in the first two axes, then flip along axis 0 or 1 (both codes)."""
    k, axis = _randint(0, 4), _randint(0, 2)
    image = np.flip(np.rot90(image, k), axis=axis).copy()
    if label is not None:
        label = np.flip(np.rot90(label, k), axis=axis).copy()
    return image, label


def random_rotate(image: np.ndarray, label: np.ndarray | None):
    """Rotation by an integer angle in [-20, 20) degrees, order 0, shape kept (SSL4MIS)."""
    angle = _randint(-20, 20)
    image = ndimage.rotate(image, angle, order=0, reshape=False)
    if label is not None:
        label = ndimage.rotate(label, angle, order=0, reshape=False)
    return image, label


def acdc_train_transform(image: np.ndarray, label: np.ndarray | None, patch_size: tuple[int, int],
                         legacy: bool = False):
    """SSL4MIS RandomGenerator on one slice (H, W) -> (patch_size) arrays.

    Current code: rot/flip with p 0.5, else rotate. ``legacy``: rot/flip p 0.5, else rotate p 0.5 of the
    rest (0.25), else nothing: the code that produced the published numbers.
    """
    if _rand() > 0.5:
        image, label = random_rot_flip(image, label)
    elif not legacy or _rand() > 0.5:
        image, label = random_rotate(image, label)
    image = zoom_nearest(image, patch_size)
    label = None if label is None else zoom_nearest(label, patch_size)
    return image, label


def pad_for_crop(array: np.ndarray, patch_size: tuple[int, ...]) -> np.ndarray:
    """UA-MT RandomCrop padding: if ANY axis is <= the patch, every axis gets max((p - s)//2 + 3, 0) zeros
    on both sides."""
    if all(s > p for s, p in zip(array.shape, patch_size)):
        return array
    pad = [(max((p - s) // 2 + 3, 0),) * 2 for s, p in zip(array.shape, patch_size)]
    return np.pad(array, pad, mode="constant", constant_values=0)


def random_crop(image: np.ndarray, label: np.ndarray | None, patch_size: tuple[int, ...]):
    """UA-MT RandomCrop: pad (``pad_for_crop``), then a crop whose origin is uniform in [0, size - patch)."""
    image = pad_for_crop(image, patch_size)
    label = None if label is None else pad_for_crop(label, patch_size)
    origin = [_randint(0, s - p) for s, p in zip(image.shape, patch_size)]
    window = tuple(slice(o, o + p) for o, p in zip(origin, patch_size))
    return image[window].copy(), None if label is None else label[window].copy()


def crop(image: np.ndarray, label: np.ndarray | None, patch: tuple[int, ...]):
    """A patch of image [C, *S] (and label [*S]) whose origin is uniform; axes shorter than the patch are
    zero-padded on both sides first."""
    pad = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(image.shape[1:], patch)]
    if any(sum(p) for p in pad):
        image = np.pad(image, [(0, 0), *pad])
        label = None if label is None else np.pad(label, pad)
    origin = [int(torch.randint(0, s - p + 1, (1,))) for s, p in zip(image.shape[1:], patch)]
    window = tuple(slice(o, o + p) for o, p in zip(origin, patch))
    return image[(slice(None), *window)].copy(), None if label is None else label[window].copy()


def la_train_transform(image: np.ndarray, label: np.ndarray | None, patch_size: tuple[int, int, int]):
    """UA-MT training transform of one volume (H, W, D): RandomRotFlip (always) then RandomCrop."""
    image, label = random_rot_flip(image, label)
    return random_crop(image, label, patch_size)
