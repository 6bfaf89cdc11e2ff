"""ACDC phantom in the SSL4MIS layout (see datamodules.phantoms)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from datamodules.phantoms.common import acquire, ellipsoid, largest_component, smooth_noise
from datamodules.writers import minmax, write_h5, write_list

# What shrinks an ACDC experiment to seconds on this phantom (tests: DESIGN.md "Tests"); labeled_batch_size only
# where the experiment has two streams.
TEST_SIZE = {"patch_size": [32, 32], "batch_size": 4, "labeled_batch_size": 2}

@dataclass(frozen=True)
class _Heart:
    """One patient's cardiac geometry in pixels: ED frame, basal slice; depths are relative (0 base, 1 last slice)."""
    centre: np.ndarray   # (2,) y, x of the LV at the base
    drift: np.ndarray    # (2,) LV centre shift from base to last slice
    tilt: float          # LV major-axis direction
    ellipse: float       # LV minor/major axis ratio
    r_lv: float          # ED cavity radius (major axis)
    wall: float          # ED myocardial thickness
    contraction: float   # ES / ED cavity radius
    apex: float          # depth where the ventricle closes (> 1: below the stack)
    rv_angle: float      # direction from the LV to the RV
    rv_depth: float      # depth where the RV ends
    rv_shape: tuple      # RV half-length along the septum, half-width, bulge; in units of the LV outer radius


def make_acdc(root, n_train: int = 6, n_val: int = 2, n_test: int = 2, size: tuple[int, int] = (64, 64),
              n_slices: tuple[int, int] = (6, 9), seed: int = 0) -> Path:
    """Write an ACDC phantom in the SSL4MIS layout under ``root`` and return it.

    ``root/{train,val,test}.list`` name volumes patientXXX_frame0{1,2} (distinct patients, unsorted);
    ``root/train_slices.list`` names every slice of the train patients, grouped by patient in train.list order,
    the slices of a frame shuffled, numbered from 1 (as the real file). Train patients get slice files
    ``data/slices/<id>_slice_<i>.h5`` (image (H, W) float32 [0, 1], label (H, W) uint8); val and test patients
    get volumes ``data/<id>.h5`` (image (D, H, W), label (D, H, W)). No training volumes, as in the shipped data.
    A patient has D slices, D drawn in the inclusive range ``n_slices``; H, W = ``size``.
    """
    root = Path(root)
    (root / "data" / "slices").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_total = n_train + n_val + n_test
    if n_total > 999:
        raise ValueError(f"ACDC ids have 3 digits: at most 999 patients, asked for {n_total}")
    ids = [f"patient{i + 1:03d}" for i in rng.permutation(max(100, n_total))[:n_total]]
    splits = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
    train_slices = []
    for pid in ids:
        frames = _acdc_patient(np.random.default_rng([seed, int(pid[7:])]), size, n_slices)
        for k, (image, label) in enumerate(frames, start=1):
            name = f"{pid}_frame{k:02d}"
            if pid in splits["train"]:
                order = rng.permutation(image.shape[0])
                train_slices += [f"{name}_slice_{i + 1}" for i in order]
                for i in order:
                    write_h5(root / "data" / "slices" / f"{name}_slice_{i + 1}.h5", {"image": image[i], "label": label[i]})
            else:
                write_h5(root / "data" / f"{name}.h5", {"image": image, "label": label})
    for split, pids in splits.items():
        write_list(root / f"{split}.list", [f"{pid}_frame{k:02d}" for pid in pids for k in (1, 2)])
    write_list(root / "train_slices.list", train_slices)
    return root


def _acdc_patient(rng: np.random.Generator, size, n_slices) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(image, label)] for ED then ES; image (D, H, W) float32 [0, 1], label (D, H, W) uint8 {0, 1, 2, 3}."""
    depth = int(rng.integers(n_slices[0], n_slices[1] + 1))
    heart = _sample_heart(rng, size)
    thorax = _thorax(rng, depth, size)
    levels = {3: rng.uniform(0.34, 0.42), 1: rng.uniform(0.30, 0.38), 2: rng.uniform(0.11, 0.15)}
    frames = []
    for systole in (False, True):
        label = _heart_labels(heart, depth, size, systole)
        frames.append((_cardiac_image(rng, label, thorax, levels), label))
    return frames


def _sample_heart(rng: np.random.Generator, size) -> _Heart:
    m = min(size)
    ellipse = rng.uniform(0.85, 1.0)
    return _Heart(
        centre=np.array(size, float) / 2 + m * rng.uniform(-0.06, 0.06, 2),
        drift=m * rng.uniform(-0.04, 0.04, 2),
        tilt=rng.uniform(0, np.pi),
        ellipse=ellipse,
        r_lv=m * rng.uniform(0.10, 0.13),
        # >= 2.2 px along the minor axis, so that the LV dilated by one pixel stays inside LV + myocardium
        wall=max(m * rng.uniform(0.04, 0.055), 2.2 / ellipse),
        contraction=rng.uniform(0.6, 0.75),
        apex=rng.uniform(0.93, 1.15),
        rv_angle=rng.uniform(0, 2 * np.pi),
        rv_depth=rng.uniform(0.6, 0.85),
        rv_shape=(rng.uniform(1.3, 1.7), rng.uniform(0.8, 1.0), rng.uniform(0.5, 0.8)),
    )


def _heart_labels(heart: _Heart, depth: int, size, systole: bool) -> np.ndarray:
    """Label volume (D, H, W) uint8: 1 RV, 2 myocardium, 3 LV cavity; slice 0 is the base."""
    r_lv, outer, apex, rv_scale = heart.r_lv, heart.r_lv + heart.wall, heart.apex, 1.0
    if systole:
        r_lv = heart.r_lv * heart.contraction
        outer = np.sqrt(outer ** 2 - heart.r_lv ** 2 + r_lv ** 2)  # same myocardial area: the wall thickens
        apex, rv_scale = 0.93 * apex, 0.7  # long-axis shortening; the RV empties too
    wall = outer - r_lv
    yy, xx = np.mgrid[:size[0], :size[1]].astype(float)
    label = np.zeros((depth, *size), np.uint8)
    for z in range(depth):
        f = z / max(depth - 1, 1)
        dy, dx = yy - heart.centre[0] - f * heart.drift[0], xx - heart.centre[1] - f * heart.drift[1]
        rho = _lv_metric(dy, dx, heart)
        radius = outer * np.sqrt(max(0.0, 1 - (f / apex) ** 2.5))
        if f < heart.rv_depth:
            label[z][_rv_mask(dy, dx, rho, radius, heart, rv_scale * np.sqrt(1 - (f / heart.rv_depth) ** 2))] = 1
        label[z][rho <= radius] = 2
        label[z][rho <= radius - wall] = 3
    return label


def _lv_metric(dy, dx, heart: _Heart):
    """Elliptic radius about the LV centre: the iso-line rho = r has half-axes r and r * ellipse."""
    cos, sin = np.cos(heart.tilt), np.sin(heart.tilt)
    return np.hypot(cos * dy + sin * dx, (cos * dx - sin * dy) / heart.ellipse)


def _rv_mask(dy, dx, rho, radius: float, heart: _Heart, scale: float) -> np.ndarray:
    """RV crescent (H, W): an ellipse overlapping the ventricle's septal side, minus the ventricle."""
    sin, cos = np.sin(heart.rv_angle), np.cos(heart.rv_angle)
    along, across = dy * sin + dx * cos, dy * cos - dx * sin
    # Distance from the LV centre to the epicardium towards the RV, so the crescent always touches the septum.
    reach = radius / float(_lv_metric(sin, cos, heart))
    half_len, half_width, bulge = (k * radius * scale for k in heart.rv_shape)
    centre = reach + bulge - half_width
    crescent = ((along - centre) / half_width) ** 2 + (across / half_len) ** 2 <= 1
    crescent = largest_component(crescent & (rho > radius))
    return crescent if crescent.sum() >= 3 else np.zeros_like(crescent)


def _thorax(rng: np.random.Generator, depth: int, size) -> np.ndarray:
    """Background intensities (D, H, W): air, a textured body ellipse, fat and organ blobs spanning some slices."""
    m = min(size)
    coords = np.mgrid[:depth, :size[0], :size[1]].astype(float)
    body = ellipsoid(coords[1:], np.array(size) / 2, np.array(size) * rng.uniform(0.44, 0.52, 2))
    image = np.where(body, 0.08 + 0.02 * smooth_noise(rng, (depth, *size), (1, 2, 2)), 0.015)
    for _ in range(rng.integers(3, 7)):
        level = rng.uniform(0.5, 0.9) if rng.random() < 0.4 else rng.uniform(0.16, 0.26)
        centre = (rng.uniform(0, depth), *(np.array(size) * rng.uniform(0.15, 0.85, 2)))
        axes = (rng.uniform(0.3, 1.0) * depth, *(m * rng.uniform(0.03, 0.12, 2)))
        image[ellipsoid(coords, centre, axes) & body] = level
    return image


def _cardiac_image(rng: np.random.Generator, label: np.ndarray, thorax: np.ndarray, levels: dict) -> np.ndarray:
    """MR-like image (D, H, W) float32 in [0, 1] for a label volume (D, H, W)."""
    image = thorax.copy()
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = True
    free_wall = ndi.binary_dilation(label == 1, in_plane) & (label == 0)  # the thin RV wall is muscle, too
    image[free_wall] = levels[2]
    for cls, level in levels.items():
        image[label == cls] = level * rng.uniform(0.95, 1.05)
    image = image * rng.uniform(0.9, 1.1, (label.shape[0], 1, 1))  # slice-to-slice gain as in cine stacks
    return minmax(acquire(rng, image, (0, 0.6, 0.6), (0.3, 1.0, 1.0), rng.uniform(0.04, 0.1)))
