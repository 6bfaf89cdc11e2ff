"""ImageLogger: PNG panels of image / ground truth / predictions, written into the run directory."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw

# RGB per class index (0 = background is transparent); enough for the 4-class cardiac and binary tasks.
PALETTE = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 80], [60, 120, 240], [240, 200, 40]], dtype=np.float32)


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Grey image (H, W) in any range + label map (H, W) -> RGB uint8 (H, W, 3) with coloured classes."""
    lo, hi = float(image.min()), float(image.max())
    grey = (image - lo) / (hi - lo + 1e-8) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    mask = label > 0
    colours = PALETTE[np.clip(label, 0, len(PALETTE) - 1)]
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colours[mask]
    return rgb.astype(np.uint8)


def panel(image: np.ndarray, columns: dict[str, np.ndarray], scale: int = 3) -> Image.Image:
    """One row per slice: the image, then one overlay per named label map.

    image: (N, H, W) slices; columns: title -> (N, H, W) label maps. Titles are written above each column.
    """
    tiles = [[overlay(image[i], np.zeros_like(image[i], dtype=np.int64))] +
             [overlay(image[i], maps[i]) for maps in columns.values()] for i in range(image.shape[0])]
    rows = [np.concatenate(row, axis=1) for row in tiles]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (grid.width, grid.height + 14), "white")
    canvas.paste(grid, (0, 14))
    draw = ImageDraw.Draw(canvas)
    width = grid.width // (len(columns) + 1)
    for j, title in enumerate(["image", *columns]):
        draw.text((j * width + 4, 1), title, fill="black")
    return canvas


def save_png(picture: Image.Image, path: Path) -> None:
    """Write atomically: a temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def middle_slices(volume: np.ndarray, n: int = 3) -> np.ndarray:
    """Indices of n evenly spaced slices along the first axis, avoiding the ends."""
    return np.linspace(0, volume.shape[0] - 1, n + 2).round().astype(int)[1:-1]


class ImageLogger(L.Callback):
    """After each validation, a PNG of the module's first validation case (``pl_module.example``: image /
    ground truth / prediction, kept by SegmentationModule so nothing is predicted twice) in
    ``<run dir>/images/val_step<step>.png``: ``n_slices`` slices across spatial axis ``axis`` (0: ACDC's slice
    axis; -1: LA's depth axis)."""

    def __init__(self, n_slices: int = 3, axis: int = 0):
        self.n_slices, self.axis = n_slices, axis

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        example = getattr(pl_module, "example", None)
        if not trainer.is_global_zero or trainer.sanity_checking or not log_dir or example is None:
            return
        volume, label, pred = (np.moveaxis(example[k], self.axis, 0) for k in ("image", "label", "prediction"))
        idx = middle_slices(volume, self.n_slices)
        picture = panel(volume[idx], {"ground truth": label[idx], "prediction": pred[idx]})
        save_png(picture, Path(log_dir) / "images" / f"val_step{trainer.global_step}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/overlay", images=[picture], step=trainer.global_step,
                                 caption=[f"{example['case']}: image | ground truth | prediction"])
