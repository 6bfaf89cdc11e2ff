"""Writing the community layouts: h5 files, list files, per-volume min-max (shared by prepare and phantoms)."""
from __future__ import annotations

import os

import h5py
import numpy as np

from lemis.files import atomic_path

_GZIP_LEVEL = 4


def write_h5(path: str | os.PathLike, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> None:
    """Write ``arrays`` (name -> array, any shape) as gzip datasets, plus file attributes, atomically.

    An interrupted run never leaves a half-written file under the final name (``atomic_path``).
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value, compression="gzip", compression_opts=_GZIP_LEVEL)
        f.attrs.update(attrs or {})


def write_list(path: str | os.PathLike, names: list[str]) -> None:
    """Write one name a line (with a final newline, as the community files have), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{n}\n" for n in names))


def minmax(image: np.ndarray) -> np.ndarray:
    """Per-volume min-max to float32 [0, 1] (any shape); a constant image becomes all zeros."""
    lo, hi = float(image.min()), float(image.max())
    return ((image - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` as a gzipped NIfTI with ``affine`` (sform and qform code 1), atomically. nibabel picks the
    format by file name, and the temporary name is not ``.nii.gz``: the bytes are gzipped here."""
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(array), np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), compresslevel=_GZIP_LEVEL))
