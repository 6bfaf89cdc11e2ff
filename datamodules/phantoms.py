"""Small generated datasets in exactly the community layouts (`spec/datasets.md`), for tests and the demo.

- ``make_acdc``: the SSL4MIS ACDC layout. Each patient has an ED (frame01) and an ES (frame02) frame of a
  short-axis stack (slice 0 = base, last slice = apex): LV cavity (3) = filled ellipse, myocardium (2) = ring
  around it, RV (1) = crescent against the septum that ends before the apex. At ES the cavity shrinks and the
  wall thickens (myocardial area is kept). Images: bright blood, dark myocardium, thorax with fat/organ blobs,
  partial volume blur, smooth bias field, Rician noise, then per-volume min-max to [0, 1] as SSL4MIS.
- ``make_la``: the UA-MT LA layout. A left atrium = smooth union of ellipsoids with pulmonary-vein stubs,
  bright in a textured thorax with a bright aorta, bias and noise; z-scored over a larger field of view and
  cropped around the atrium as UA-MT did, so the stored crop has a positive mean like the real files.

Every file is written atomically; ``ensure_phantoms`` caches a generated root behind a ``.complete`` marker.
"""
from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from lemis.files import atomic_path
from datamodules.prepare import minmax, write_h5, write_list

LA_FOLDER = "2018LA_Seg_Training Set"
MARKER = ".complete"
_ID_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))


# ---------------------------------------------------------------- shared image model

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma) -> np.ndarray:
    """Gaussian-filtered white noise of ``shape`` with unit standard deviation (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], cycles, strength: float = 0.25) -> np.ndarray:
    """Smooth multiplicative field of ``shape`` (float32, geometric mean about 1): exp of a sum of three
    separable cosine products with at most ``cycles`` (one per axis) periods across the field of view."""
    grids = np.ix_(*(np.linspace(0, 2 * np.pi, n, dtype=np.float32) for n in shape))
    field = sum(math.prod([np.cos(rng.uniform(0, c) * g + rng.uniform(0, 2 * np.pi)) for g, c in zip(grids, cycles)])
                for _ in range(3))
    return np.exp(strength * field / (field.std() + 1e-12))


def _acquire(rng: np.random.Generator, image: np.ndarray, blur, cycles, noise: float) -> np.ndarray:
    """Scanner effects on an ideal intensity map (any shape): partial volume blur, a random gamma, a bias
    field and Rician noise of std ``noise`` x the mean (magnitude images keep a positive noise floor)."""
    image = np.clip(ndi.gaussian_filter(image, blur), 1e-3, None) ** rng.uniform(0.8, 1.25)
    image = image * _bias_field(rng, image.shape, cycles)
    scale = noise * image.mean()
    real = image + scale * rng.standard_normal(image.shape, dtype=np.float32)
    return np.hypot(real, scale * rng.standard_normal(image.shape, dtype=np.float32))


def _ellipsoid(coords: np.ndarray, centre, axes, angle: float = 0.0) -> np.ndarray:
    """Mask of an ellipsoid on the grid ``coords`` (n, *S), rotated by ``angle`` in the first two axes."""
    d = [c - float(m) for c, m in zip(coords, centre)]
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    d[0], d[1] = cos * d[0] + sin * d[1], -sin * d[0] + cos * d[1]
    return sum((di / float(a)) ** 2 for di, a in zip(d, axes)) <= 1.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (any ndim); all False if the mask is empty."""
    components, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes))


# ---------------------------------------------------------------- ACDC

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
    crescent = _largest_component(crescent & (rho > radius))
    return crescent if crescent.sum() >= 3 else np.zeros_like(crescent)


def _thorax(rng: np.random.Generator, depth: int, size) -> np.ndarray:
    """Background intensities (D, H, W): air, a textured body ellipse, fat and organ blobs spanning some slices."""
    m = min(size)
    coords = np.mgrid[:depth, :size[0], :size[1]].astype(float)
    body = _ellipsoid(coords[1:], np.array(size) / 2, np.array(size) * rng.uniform(0.44, 0.52, 2))
    image = np.where(body, 0.08 + 0.02 * _smooth_noise(rng, (depth, *size), (1, 2, 2)), 0.015)
    for _ in range(rng.integers(3, 7)):
        level = rng.uniform(0.5, 0.9) if rng.random() < 0.4 else rng.uniform(0.16, 0.26)
        centre = (rng.uniform(0, depth), *(np.array(size) * rng.uniform(0.15, 0.85, 2)))
        axes = (rng.uniform(0.3, 1.0) * depth, *(m * rng.uniform(0.03, 0.12, 2)))
        image[_ellipsoid(coords, centre, axes) & body] = level
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
    return minmax(_acquire(rng, image, (0, 0.6, 0.6), (0.3, 1.0, 1.0), rng.uniform(0.04, 0.1)))


# ---------------------------------------------------------------- LA

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
    shape = _ellipsoid(coords, centre, axes, angle)
    for size in (0.55, 0.5, 0.3):  # two lobes and the appendage
        offset = axes * rng.uniform(-0.6, 0.6, 3)
        shape |= _ellipsoid(coords, centre + offset, axes * size * rng.uniform(0.8, 1.2, 3), rng.uniform(0, np.pi))
    radius = max(1.5, 0.05 * min(scale[:2]))
    for side in (-1, -1, 1, 1):  # two left and two right pulmonary veins
        start = centre + axes * np.array([0.6 * side, rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.5)])
        direction = np.array([side, rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.4)])
        end = start + scale[0] * rng.uniform(0.1, 0.16) * direction / np.linalg.norm(direction)
        shape |= _tube(coords, start, end) <= radius
    field = ndi.gaussian_filter(shape.astype(float), 1.2) + 0.12 * _smooth_noise(rng, shape.shape, 3)
    return _largest_component(field > 0.5)


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
    body = _ellipsoid(coords[:2], extent[:2] / 2, extent[:2] * rng.uniform(0.4, 0.48, 2))
    image = np.where(body, 0.25 + 0.05 * _smooth_noise(rng, atrium.shape, 3), 0.04)
    for _ in range(rng.integers(4, 8)):
        axes = scale * rng.uniform(0.08, 0.25, 3)
        blob = _ellipsoid(coords, extent * rng.uniform(0.2, 0.8, 3), axes, rng.uniform(0, np.pi))
        image[blob & body] = rng.uniform(0.1, 0.7)
    aorta = np.argwhere(atrium).mean(0) + scale * np.array([rng.uniform(-0.2, 0.2), rng.choice([-1, 1]) * 0.35, 0])
    image[_tube(coords, aorta - [0, 0, extent[2]], aorta + [0, 0, extent[2]]) <= 0.08 * scale[1]] = rng.uniform(0.7, 0.9)
    image[atrium] = rng.uniform(0.6, 0.9) + 0.04 * _smooth_noise(rng, atrium.shape, 2)[atrium]
    return _acquire(rng, image, 0.8, (1.0, 1.0, 0.7), rng.uniform(0.05, 0.1))


# ---------------------------------------------------------------- caching

_MAKERS = {"acdc": make_acdc, "la": make_la}


def ensure_phantoms(kind: str, root, **kw) -> Path:
    """Generate the ``kind`` ("acdc" or "la") phantom in ``root`` unless ``root/.complete`` is there.

    The marker is written last and records the parameters, so an interrupted generation is redone on the next
    call, and a root made with other parameters is refused rather than silently reused.
    """
    if kind not in _MAKERS:
        raise ValueError(f"unknown phantom kind {kind!r}: expected one of {sorted(_MAKERS)}")
    root = Path(root)
    bound = inspect.signature(_MAKERS[kind]).bind(root, **kw)
    bound.apply_defaults()
    params = json.dumps({"kind": kind, **{k: v for k, v in bound.arguments.items() if k != "root"}}, sort_keys=True)
    marker = root / MARKER
    if marker.exists():
        if marker.read_text() != params:
            raise ValueError(f"{root} holds a phantom made with {marker.read_text()}, not {params}: "
                             f"delete the folder or choose another root")
        return root
    _MAKERS[kind](root, **kw)
    with atomic_path(marker) as tmp:
        tmp.write_text(params)
    return root
