"""ImageLogger: PNG panels of image / ground truth / predictions, written into the run directory."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw

from lemis.files import atomic_path, run_directory

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

    image: (N, H, W) slices; columns: title -> (N, H, W) label maps (integer: overlaid on the image) or
    images (floating point: drawn in grey). Titles are written above each column.
    """
    def tile(i: int, maps: np.ndarray) -> np.ndarray:
        if np.issubdtype(maps.dtype, np.floating):
            return overlay(maps[i], np.zeros(maps[i].shape, dtype=np.int64))
        return overlay(image[i], maps[i])

    tiles = [[tile(i, image)] + [tile(i, maps) for maps in columns.values()] for i in range(image.shape[0])]
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
    """Write atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def middle_slices(volume: np.ndarray, n: int = 3) -> np.ndarray:
    """Indices of n evenly spaced slices along the first axis, avoiding the ends."""
    return np.linspace(0, volume.shape[0] - 1, n + 2).round().astype(int)[1:-1]


class ImageLogger(L.Callback):
    """After each validation, a PNG of the module's first validation case (``pl_module.example``: image /
    ground truth / prediction, kept by SegmentationModule so nothing is predicted twice) in
    ``<run dir>/images/val_step<step>.png``: ``n_slices`` slices across spatial axis ``axis`` (0: ACDC's slice
    axis; -1: LA's depth axis).

    Every ``every_n_train_steps`` steps (0: never), methods that keep a ``pl_module.train_example`` (a callable
    returning one training sample: ``image`` [*S] then named maps [*S], e.g. SGRS's pseudo label and regions;
    called only here, so other steps pay nothing) get ``images/train_step<step>.png``; 2D samples are drawn as
    one slice.
    """

    def __init__(self, n_slices: int = 3, axis: int = 0, every_n_train_steps: int = 0):
        self.n_slices, self.axis, self.every_n_train_steps = n_slices, axis, every_n_train_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        example = getattr(pl_module, "train_example", None)
        k, step = self.every_n_train_steps, trainer.global_step
        if not k or step % k or example is None:
            return
        log_dir = run_directory(trainer)
        if not trainer.is_global_zero or not log_dir:
            return
        arrays = {name: value.detach().cpu().numpy() for name, value in example().items()}
        flat = arrays["image"].ndim == 2
        arrays = {name: a[None] if flat else np.moveaxis(a, self.axis, 0) for name, a in arrays.items()}
        image = arrays.pop("image")
        idx = [0] if flat else middle_slices(image, self.n_slices)
        picture = panel(image[idx], {name: a[idx] for name, a in arrays.items()})
        self._publish(trainer, log_dir, picture, f"train_step{step}", "train/overlay",
                      " | ".join(["image", *arrays]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        log_dir = run_directory(trainer)
        example = getattr(pl_module, "example", None)
        if not trainer.is_global_zero or trainer.sanity_checking or not log_dir or example is None:
            return
        volume, label, pred = (np.moveaxis(example[k], self.axis, 0) for k in ("image", "label", "prediction"))
        idx = middle_slices(volume, self.n_slices)
        picture = panel(volume[idx], {"ground truth": label[idx], "prediction": pred[idx]})
        self._publish(trainer, log_dir, picture, f"val_step{trainer.global_step}", "val/overlay",
                      f"{example['case']}: image | ground truth | prediction")

    @staticmethod
    def _publish(trainer, log_dir: Path, picture: Image.Image, name: str, key: str, caption: str) -> None:
        """PNG under ``log_dir`` (``run_directory``, asked by every rank before) and W&B."""
        save_png(picture, log_dir / "images" / f"{name}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[picture], step=trainer.global_step, caption=[caption])
