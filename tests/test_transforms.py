"""The published augmentations (datamodules/transforms.py): order-0 zoom equals scipy's, rotations and flips and
the UA-MT crop do what the published code does, and a sample's draws depend on torch's generator only."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from datamodules.transforms import (
    acdc_train_transform,
    pad_for_crop,
    random_crop,
    random_rot_flip,
    random_rotate,
    zoom_nearest,
    zoom_nearest_torch,
)

# ACDC slice sizes of the 20 val volumes (154 and 232 are where scipy zeroes the last row/column from 128)
SIZES = [(128, 154), (128, 232), (154, 128), (232, 128), (256, 216), (128, 256), (208, 128), (64, 37), (7, 64)]


@pytest.mark.parametrize("n,m", SIZES + [(n, m) for n in range(2, 90, 11) for m in range(2, 90, 13)])
def test_zoom_nearest_equals_scipy_order0(n, m):
    a = np.arange(1, n * 5 + 1, dtype=np.float32).reshape(n, 5)
    b = np.arange(1, 5 * n + 1, dtype=np.float32).reshape(5, n)
    np.testing.assert_array_equal(zoom_nearest(a, (m, 5)), ndimage.zoom(a, (m / n, 1), order=0))
    np.testing.assert_array_equal(zoom_nearest(b, (5, m)), ndimage.zoom(b, (1, m / n), order=0))


@pytest.mark.parametrize("src,dst", [((128, 128), (154, 232)), ((97, 130), (128, 128)), ((128, 128), (128, 128))])
def test_zoom_2d_and_torch_twin_equal_scipy(src, dst):
    image = np.random.default_rng(0).random(src).astype(np.float32) + 1  # no zeros: a zeroed edge would show
    expected = ndimage.zoom(image, (dst[0] / src[0], dst[1] / src[1]), order=0)
    np.testing.assert_array_equal(zoom_nearest(image, dst), expected)
    stacked = torch.from_numpy(np.stack([image, 2 * image]))[None]  # [1, 2, H, W]: leading axes kept
    out = zoom_nearest_torch(stacked, dst).numpy()
    np.testing.assert_array_equal(out[0, 0], expected)
    np.testing.assert_array_equal(out[0, 1], 2 * expected)


def test_rot_flip_is_rot90_then_flip_for_image_and_label():
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    torch.manual_seed(3)
    k, axis = int(torch.randint(0, 4, (1,))), int(torch.randint(0, 2, (1,)))
    torch.manual_seed(3)
    out, label = random_rot_flip(image, image.astype(np.uint8))
    np.testing.assert_array_equal(out, np.flip(np.rot90(image, k), axis=axis))
    np.testing.assert_array_equal(label, out.astype(np.uint8))


def test_rotate_is_order0_reshape_false_with_an_integer_angle_in_range():
    image = np.zeros((33, 33), dtype=np.float32)
    image[10:20, 5:25] = 1
    torch.manual_seed(0)
    angle = int(torch.randint(-20, 20, (1,)))
    torch.manual_seed(0)
    out, label = random_rotate(image, image.astype(np.uint8))
    assert -20 <= angle < 20
    np.testing.assert_array_equal(out, ndimage.rotate(image, angle, order=0, reshape=False))
    assert out.shape == image.shape and set(np.unique(label)) <= {0, 1}


def test_crop_pads_every_axis_when_one_is_too_small_then_crops_inside():
    volume = np.ones((120, 100, 90), dtype=np.float32)
    padded = pad_for_crop(volume, (112, 112, 80))
    # y = 100 <= 112, so every axis gets max((p - s)//2 + 3, 0) a side: x max(-4 + 3, 0) = 0, y 6 + 3 = 9, z 0
    assert padded.shape == (120, 118, 90)
    torch.manual_seed(0)
    image, label = random_crop(volume, volume.astype(np.uint8), (112, 112, 80))
    assert image.shape == label.shape == (112, 112, 80)
    assert pad_for_crop(volume, (64, 64, 48)) is volume  # every axis larger: untouched


def test_acdc_transform_depends_on_torch_seed_only():
    image = np.random.default_rng(1).random((97, 130)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    runs = []
    for numpy_seed in (0, 1):
        np.random.seed(numpy_seed)
        torch.manual_seed(5)
        runs.append(acdc_train_transform(image, label, (64, 64)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert runs[0][0].shape == runs[0][1].shape == (64, 64)
