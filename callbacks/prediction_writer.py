"""PredictionWriter: `lemis predict` writes one label map per case into the run directory."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from callbacks.image_logger import middle_slices, panel, save_png
from datamodules.writers import write_nifti
from lemis.files import atomic_path, run_directory


class PredictionWriter(BasePredictionWriter):
    """Writes every predicted case into ``<run dir>/predictions/``, atomically (temp file, then rename), so an
    interrupted run leaves no half file:

    - a case read from NIfTI (its prediction carries the input's ``affine``): ``<case>.nii.gz``, uint8, in the
      input's voxel order, with its affine, so a viewer lays it over the scan;
    - otherwise ``<case>.h5``, key ``prediction``, uint8, the case's own shape;
    - for the first ``overview`` cases a rank predicts, ``overview/<case>.png``: three axial slices (the file's
      last axis; ACDC's first) of the image's first channel with the prediction laid over it.
    """

    def __init__(self, folder: str = "predictions", overview: int = 4):
        super().__init__(write_interval="batch")
        self.folder, self.overview = folder, overview

    def on_predict_start(self, trainer, pl_module) -> None:
        self.out = (run_directory(trainer) or Path(".")) / self.folder
        self.out.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        label = prediction["prediction"].numpy()
        if batch_idx < self.overview:
            self.draw(batch["image"][0, 0].cpu().numpy(), label, prediction)
        if prediction.get("affine") is not None:
            write_nifti_label(self.out / f"{prediction['case']}.nii.gz", label, prediction["affine"],
                              prediction.get("axes"), prediction.get("crop"))
            return
        with atomic_path(self.out / f"{prediction['case']}.h5") as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("prediction", data=label, compression="gzip")

    def draw(self, image: np.ndarray, label: np.ndarray, prediction: dict) -> None:
        """The overview PNG of one case; image and label [*S] in the evaluation's axis order."""
        if image.ndim == 3 and prediction.get("affine") is not None:  # NIfTI: axial = the file's last axis
            axial = list(prediction.get("axes") or (0, 1, 2)).index(2)
            image, label = np.moveaxis(image, axial, 0), np.moveaxis(label, axial, 0)
        elif image.ndim == 2:
            image, label = image[None], label[None]
        index = middle_slices(image) if image.shape[0] > 1 else [0]
        picture = panel(image[index], {"prediction": label[index].astype(np.int64)})
        save_png(picture, self.out / "overview" / f"{prediction['case']}.png")


def write_nifti_label(path: Path, label: np.ndarray, affine: np.ndarray, axes=None, crop=None) -> None:
    """A uint8 label map as NIfTI with ``affine``; ``axes``: the file axis each axis of ``label`` came from
    (a 2D DataModule puts the slice axis first), undone before writing; ``crop``: (offset, full shape) of a
    cropped volume in the file's axes, pasted back into a background volume of the input's shape."""
    if axes is not None:
        label = np.transpose(label, np.argsort(axes))
    if crop is not None:
        offset, shape = crop
        full = np.zeros(tuple(shape), dtype=np.uint8)
        full[tuple(slice(o, o + n) for o, n in zip(offset, label.shape))] = label
        label = full
    write_nifti(path, label.astype(np.uint8), affine)
