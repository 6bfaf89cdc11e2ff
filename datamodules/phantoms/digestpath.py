"""A DigestPath task-2 phantom (datamodules.digestpath): JPEG H&E-like images with a tissue region on white, the
positives with malignant regions and grey JPEG masks (0/255 with JPEG's ringing, so the > 127 threshold matters)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.phantoms.common import ellipsoid, smooth_noise

TEST_SIZE = {"patch_size": [32, 32], "batch_size": 4, "data.init_args.crop_size": 64,
             "data.init_args.crop_stride": 64}
WHITE, TISSUE, MALIGNANT = (np.array(c) for c in ((0.97, 0.97, 0.97), (0.88, 0.62, 0.78), (0.48, 0.26, 0.56)))


def make_digestpath(root, n_pos: int = 5, n_neg: int = 5, size: tuple[int, int] = (256, 384), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root = Path(root)
    for folder in ("tissue-train-pos-v1", "tissue-train-neg"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    h, w = size
    coords = np.stack(np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij"))
    for i in range(n_pos + n_neg):
        positive = i < n_pos
        tissue = ellipsoid(coords, (0.5 * h, 0.5 * w), (0.42 * h, 0.4 * w), rng.uniform(0, 0.4))
        colour = np.where(tissue[..., None], TISSUE, WHITE)
        lesion = np.zeros((h, w), bool)
        if positive:
            lesion = tissue & ellipsoid(coords, (rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w),
                                        (0.22 * h, 0.2 * w), rng.uniform(0, np.pi))
            colour = np.where(lesion[..., None], MALIGNANT, colour)
        texture = 0.04 * np.stack([smooth_noise(rng, (h, w), 2.0) for _ in range(3)], -1)
        rgb = (255 * np.clip(colour + texture, 0, 1)).astype(np.uint8)
        name = f"{'pos' if positive else 'neg'}_{i:03d}"
        folder = root / ("tissue-train-pos-v1" if positive else "tissue-train-neg")
        Image.fromarray(rgb).save(folder / f"{name}.jpg", quality=90)
        if positive:
            Image.fromarray((lesion * 255).astype(np.uint8)).save(folder / f"{name}_mask.jpg", quality=90)
    return root
