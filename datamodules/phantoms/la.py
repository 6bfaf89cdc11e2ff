"""LA phantom in the UA-MT layout (see datamodules.phantoms)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from datamodules.phantoms.common import acquire, ellipsoid, largest_component, smooth_noise
from datamodules.writers import write_h5, write_list

# What shrinks an LA experiment to seconds on this phantom (the VNet needs multiples of 16).
TEST_SIZE = {"patch_size": [32, 32, 32], "batch_size": 2, "labeled_batch_size": 1}

LA_FOLDER = "2018LA_Seg_Training Set"
_ID_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))


def make_la(root, n_train: int = 6, n_test: int = 2, shape: tuple[int, int, int] = (48, 48, 40), seed: int = 0,
            present: int | None = None) -> Path:
    """Write an LA phantom in the UA-MT layout under ``root`` and return it.

    ``root/train.list`` (sorted) and ``root/test.list`` (unsorted), as the real ones, name 20-character uppercase
    alphanumeric case ids; ``root/2018LA_Seg_Training Set/<id>/mri_norm2.h5`` holds image (H, W, D) float32
    (z-scored) and label (H, W, D) uint8 {0, 1}, with (H, W, D) = ``shape``. ``present``: write the files of only
    that many cases (train and test in proportion, at least one of each when possible), like the shared
    subset; ``root/present.list`` always names the cases whose files exist, train then test.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = _la_ids(rng, n_train + n_test)
    train, test = sorted(ids[:n_train]), ids[n_train:]
    written = _la_present(rng, train, test, present)
    for case in written:
        image, label = _la_case(np.random.default_rng([seed, ids.index(case)]), shape)
        (root / LA_FOLDER / case).mkdir(parents=True, exist_ok=True)
        write_h5(root / LA_FOLDER / case / "mri_norm2.h5", {"image": image, "label": label})
    write_list(root / "train.list", train)
    write_list(root / "test.list", test)
    write_list(root / "present.list", written)
    return root


def _la_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < n:
        case = "".join(rng.choice(_ID_CHARS, 20))
        if case not in ids:
            ids.append(case)
    return ids


def _la_present(rng: np.random.Generator, train: list[str], test: list[str], present: int | None) -> list[str]:
    """The case ids whose files are written, in list order (train, then test)."""
    if present is None:
        return train + test
    total = len(train) + len(test)
    if not 0 <= present <= total:
        raise ValueError(f"present must be in [0, {total}], got {present}")
    n_test = min(len(test), max(int(present > 1 and len(test) > 0), round(present * len(test) / total)))
    n_train = min(len(train), present - n_test)
    n_test = present - n_train
    keep = set(rng.choice(train, n_train, replace=False)) | set(rng.choice(test, n_test, replace=False))
    return [case for case in train + test if case in keep]


def _la_case(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    """image (H, W, D) float32 z-scored over a 1.5x wider field of view, label (H, W, D) uint8 {0, 1}."""
    canvas = (round(1.5 * shape[0]), round(1.5 * shape[1]), shape[2])
    coords = np.mgrid[tuple(slice(0, n) for n in canvas)].astype(np.float32)
    atrium = _atrium(rng, coords, np.array(shape, float))
    image = _la_image(rng, coords, atrium, np.array(shape, float))
    image = (image - image.mean()) / image.std()
    centre = np.argwhere(atrium)[:, :2].mean(0)  # UA-MT cropped in-plane around the atrium, kept every slice
    start = [int(np.clip(round(c - n / 2), 0, nc - n)) for c, n, nc in zip(centre, shape[:2], canvas[:2])]
    crop = (slice(start[0], start[0] + shape[0]), slice(start[1], start[1] + shape[1]))
    return image[crop].astype(np.float32), atrium[crop].astype(np.uint8)


def _atrium(rng: np.random.Generator, coords: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Left atrium mask on the grid coords (3, H, W, D): body + lobes + appendage + four vein stubs, smoothed
    and randomly deformed, one connected component. ``scale`` = the stored (H, W, D), which it fits in."""
    centre = np.array(coords.shape[1:], float) / 2 + scale * rng.uniform(-0.04, 0.04, 3)
    axes = scale * np.array([0.28, 0.22, 0.2]) * rng.uniform(0.85, 1.15, 3)
    angle = rng.uniform(-0.4, 0.4)
    shape = ellipsoid(coords, centre, axes, angle)
    for size in (0.55, 0.5, 0.3):  # two lobes and the appendage
        offset = axes * rng.uniform(-0.6, 0.6, 3)
        shape |= ellipsoid(coords, centre + offset, axes * size * rng.uniform(0.8, 1.2, 3), rng.uniform(0, np.pi))
    radius = max(1.5, 0.05 * min(scale[:2]))
    for side in (-1, -1, 1, 1):  # two left and two right pulmonary veins
        start = centre + axes * np.array([0.6 * side, rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.5)])
        direction = np.array([side, rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.4)])
        end = start + scale[0] * rng.uniform(0.1, 0.16) * direction / np.linalg.norm(direction)
        shape |= _tube(coords, start, end) <= radius
    field = ndi.gaussian_filter(shape.astype(float), 1.2) + 0.12 * smooth_noise(rng, shape.shape, 3)
    return largest_component(field > 0.5)


def _tube(coords: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance (*S) from each grid point of coords (3, *S) to the segment start-end."""
    v = (end - start).astype(coords.dtype)
    d = coords - start.astype(coords.dtype).reshape(-1, *[1] * (coords.ndim - 1))
    dv = sum(vi * di for vi, di in zip(v, d))
    t = np.clip(dv / (v @ v), 0, 1)
    return np.sqrt(np.maximum(sum(di * di for di in d) - 2 * t * dv + t * t * (v @ v), 0))


def _la_image(rng: np.random.Generator, coords: np.ndarray, atrium: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """LGE-MRI-like intensities (H', W', D) over the whole field of view: dark lungs around a textured
    mediastinum, other chambers and vessels as blobs, a bright aorta through the slices, the atrial blood pool."""
    extent = np.array(atrium.shape, float)
    body = ellipsoid(coords[:2], extent[:2] / 2, extent[:2] * rng.uniform(0.4, 0.48, 2))
    image = np.where(body, 0.25 + 0.05 * smooth_noise(rng, atrium.shape, 3), 0.04)
    for _ in range(rng.integers(4, 8)):
        axes = scale * rng.uniform(0.08, 0.25, 3)
        blob = ellipsoid(coords, extent * rng.uniform(0.2, 0.8, 3), axes, rng.uniform(0, np.pi))
        image[blob & body] = rng.uniform(0.1, 0.7)
    aorta = np.argwhere(atrium).mean(0) + scale * np.array([rng.uniform(-0.2, 0.2), rng.choice([-1, 1]) * 0.35, 0])
    image[_tube(coords, aorta - [0, 0, extent[2]], aorta + [0, 0, extent[2]]) <= 0.08 * scale[1]] = rng.uniform(0.7, 0.9)
    image[atrium] = rng.uniform(0.6, 0.9) + 0.04 * smooth_noise(rng, atrium.shape, 2)[atrium]
    return acquire(rng, image, 0.8, (1.0, 1.0, 0.7), rng.uniform(0.05, 0.1))
