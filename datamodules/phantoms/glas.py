"""A GlaS phantom (datamodules.glas): H&E-like RGB images with elliptical "glands" (a dark purple rim around a
pale lumen) on pink stroma, their masks, and ``Grade.csv`` with CR line endings and leading spaces as in the
shipped copy. ``layout="png"``: ``images/<name>.png`` + ``labels/<name>.png`` (0/255, ../shared/data/GlaS-half);
``layout="bmp"``: the official flat ``<name>.bmp`` + ``<name>_anno.bmp`` (instance ids 1..n). One training image
in three has no gland, so negative crops exist.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.phantoms.common import ellipsoid, smooth_noise

TEST_SIZE = {"patch_size": [32, 32], "batch_size": 4, "data.init_args.crop_size": 32,
             "data.init_args.crop_stride": 16}
STROMA = np.array([0.93, 0.72, 0.82])
RIM = np.array([0.45, 0.25, 0.55])
LUMEN = np.array([0.97, 0.93, 0.95])


def phantom_image(rng: np.random.Generator, size: tuple[int, int], n_glands: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [H, W, 3], instance mask uint8 [H, W])."""
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in size], indexing="ij"))
    instances = np.zeros(size, dtype=np.uint8)
    for k in range(1, n_glands + 1):
        centre = [rng.uniform(0.15, 0.85) * s for s in size]
        axes = [rng.uniform(0.06, 0.14) * min(size) for _ in size]
        instances[ellipsoid(coords, centre, axes, rng.uniform(0, np.pi)) & (instances == 0)] = k
    gland = instances > 0
    inner = np.zeros_like(gland)
    for k in range(1, n_glands + 1):
        ys, xs = np.nonzero(instances == k)
        if len(ys):
            cy, cx = ys.mean(), xs.mean()
            inner |= (instances == k) & (((coords[0] - cy) ** 2 + (coords[1] - cx) ** 2) < 0.25 * len(ys) / np.pi)
    colour = np.where(gland[..., None], np.where(inner[..., None], LUMEN, RIM), STROMA)
    texture = 0.05 * np.stack([smooth_noise(rng, size, 1.5) for _ in range(3)], -1)
    rgb = np.clip(colour + texture, 0, 1)
    return (255 * rgb).astype(np.uint8), instances


def make_glas(root, layout: str = "png", n_train: int = 6, test_a: int = 3, test_b: int = 1,
              size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """Write the phantom under ``root``; returns ``root``. Patients: train images in pairs (1, 1, 2, 2, ...)."""
    if layout not in ("png", "bmp"):
        raise ValueError(f"layout must be 'png' or 'bmp', got {layout!r}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    folders = (root / "images", root / "labels") if layout == "png" else (root, root)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    rows = ["name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    names = ([f"train_{i}" for i in range(1, n_train + 1)] + [f"testA_{i}" for i in range(1, test_a + 1)]
             + [f"testB_{i}" for i in range(1, test_b + 1)])
    for index, name in enumerate(names):
        number = int(name.split("_")[1])
        glands = 0 if name.startswith("train") and number % 3 == 0 else int(rng.integers(2, 5))
        rgb, instances = phantom_image(rng, size, glands)
        mask = instances if layout == "bmp" else np.where(instances > 0, 255, 0).astype(np.uint8)
        suffix, anno = (".png", ".png") if layout == "png" else (".bmp", "_anno.bmp")
        Image.fromarray(rgb).save(folders[0] / f"{name}{suffix}")
        Image.fromarray(mask).save(folders[1] / f"{name}{anno}")
        grade = "malignant" if index % 2 else "benign"
        rows.append(f"{name},{(number + 1) // 2 + (100 if not name.startswith('train') else 0)}, {grade}, phantom")
    (root / "Grade.csv").write_bytes("\r".join(rows).encode())
    return root
