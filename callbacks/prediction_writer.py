"""PredictionWriter: `lemis predict` writes one label map per case into the run directory."""
from __future__ import annotations

from pathlib import Path

import h5py
from lightning.pytorch.callbacks import BasePredictionWriter

from lemis.files import atomic_path, run_directory


class PredictionWriter(BasePredictionWriter):
    """Writes ``<run dir>/predictions/<case>.h5`` (key ``prediction``, uint8, the case's own shape) for
    every predicted case, atomically (temp file, then rename), so an interrupted run leaves no half file."""

    def __init__(self, folder: str = "predictions"):
        super().__init__(write_interval="batch")
        self.folder = folder

    def on_predict_start(self, trainer, pl_module) -> None:
        self.out = (run_directory(trainer) or Path(".")) / self.folder
        self.out.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        with atomic_path(self.out / f"{prediction['case']}.h5") as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("prediction", data=prediction["prediction"].numpy(), compression="gzip")
