"""Readers: the files of one item or case, read into arrays, with one-sentence errors; the checks every item gets.

A reader maps a *location* (what a DataModule's ``train_path``/``case_path`` returns) to the files it names and
to arrays by key plus ``"attrs"`` (file attributes: ``spacing`` in the arrays' axis order, ``affine``):
``H5Reader`` (one h5 file, one dataset a key: the ACDC and LA layouts) and ``NiftiReader`` (one NIfTI file a key,
or a list of files stacked as channels: nnU-Net / MSD / BraTS). A DataModule names its reader as a class
attribute (``reader = NiftiReader()``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from lemis.errors import DataError


class Reader(Protocol):
    def files(self, location) -> list[Path]: ...

    def read(self, location, keys: tuple[str, ...]) -> dict: ...


def read_list(path: Path) -> list[str]:
    """Non-empty stripped lines of a split list file."""
    if not path.is_file():
        raise DataError(f"split list {path} not found.")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_h5(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named datasets of an h5 file (plus its attributes under ``"attrs"``), with one-sentence errors."""
    if not path.is_file():
        raise DataError(f"missing file {path}.")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataError(f"{path} has no key {missing[0]!r} (it has {sorted(f.keys())}).")
            out = {k: f[k][()] for k in keys}
            out["attrs"] = dict(f.attrs)
            return out
    except DataError:
        raise
    except Exception as err:  # h5py raises OSError/KeyError/RuntimeError variants for damaged files
        raise DataError(f"cannot read {path} as HDF5 (corrupt or truncated file: {type(err).__name__}).") from None


def check_label(label: np.ndarray, num_classes: int, path: Path, ignore_index: int | None = None) -> None:
    """Labels must be integers in [0, num_classes), or the dataset's ignore label."""
    low, high = int(label.min()), int(label.max())
    if low < 0 or high >= num_classes:
        bad = sorted(int(v) for v in np.unique(label) if (v < 0 or v >= num_classes) and v != ignore_index)
        if bad:
            raise DataError(f"{path} has label values {bad} outside 0..{num_classes - 1} "
                            f"(data.init_args.num_classes={num_classes}).")


def check_image(data: dict, path: Path) -> None:
    """Image values must be finite, and a label must cover the image's spatial axes (its last label.ndim axes):
    a NaN volume would otherwise score Dice 0 without a word, a NaN slice stop training without a file name."""
    image = data["image"]
    if not np.isfinite(image).all():
        bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise DataError(f"{path} has {bad} NaN/inf values in 'image'.")
    label = data.get("label")
    if label is not None and image.shape[image.ndim - label.ndim:] != label.shape:
        raise DataError(f"{path} has image shape {image.shape} but label shape {label.shape}.")


class H5Reader:
    """One h5 file an item; ``keys`` are its datasets; ``attrs`` its file attributes (ACDC's ``spacing``)."""

    def files(self, location: Path) -> list[Path]:
        return [Path(location)]

    def read(self, location: Path, keys: tuple[str, ...]) -> dict:
        return read_h5(Path(location), keys)


class NiftiReader:
    """NIfTI files: a location is ``{key: path}`` or ``{key: [paths]}`` (one file a channel, stacked first:
    [C, *S]). Arrays keep nibabel's axis order (x, y, z); a 4D file (MSD images) has its last axis moved first;
    ``attrs``: ``spacing`` (the header's voxel sizes of the spatial axes, mm) and ``affine`` of the first file.
    Channel files must share shape and affine, a label the image's."""

    def files(self, location: dict) -> list[Path]:
        return [Path(p) for value in location.values() for p in (value if isinstance(value, list) else [value])]

    def read(self, location: dict, keys: tuple[str, ...]) -> dict:
        import nibabel as nib

        out, reference = {}, None
        for key in keys:
            if key not in location:
                raise DataError(f"no {key!r} file for this item (it has {sorted(location)}).")
            paths = location[key] if isinstance(location[key], list) else [location[key]]
            arrays = []
            for path in map(Path, paths):
                if not path.is_file():
                    raise DataError(f"missing file {path}.")
                try:
                    image = nib.load(str(path))
                    array = np.asarray(image.dataobj)
                except Exception as err:  # nibabel raises several types for damaged files
                    raise DataError(f"cannot read {path} as NIfTI (corrupt or truncated file: "
                                    f"{type(err).__name__}).") from None
                geometry = (array.shape[:3], np.round(image.affine, 4))
                if reference is None:
                    reference = (path, geometry, tuple(float(z) for z in image.header.get_zooms()[:3]), image.affine)
                elif geometry[0] != reference[1][0] or not np.array_equal(geometry[1], reference[1][1]):
                    raise DataError(f"{path} has shape {geometry[0]} and an affine other than {reference[0]} "
                                    f"(shape {reference[1][0]}): its geometry does not match.")
                arrays.append(np.moveaxis(array, -1, 0) if array.ndim == 4 else array)
            out[key] = np.stack(arrays) if isinstance(location[key], list) else arrays[0]
        out["attrs"] = {"spacing": reference[2], "affine": reference[3]} if reference else {}
        return out


class ImageReader:
    """2D image files (PNG, BMP, JPEG; Pillow): a location is ``{key: path}``. ``image`` becomes RGB [3, H, W]
    float32 in [0, 1]; any other key (a mask) is read as stored, [H, W] (a mask with colour channels: its first).
    Image and mask must share their size."""

    def files(self, location: dict) -> list[Path]:
        return [Path(p) for p in location.values()]

    def read(self, location: dict, keys: tuple[str, ...]) -> dict:
        from PIL import Image, UnidentifiedImageError

        out = {}
        for key in keys:
            if key not in location:
                raise DataError(f"no {key!r} file for this item (it has {sorted(location)}).")
            path = Path(location[key])
            if not path.is_file():
                raise DataError(f"missing file {path}.")
            try:
                with Image.open(path) as image:
                    if key == "image":
                        array = np.moveaxis(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0, -1, 0)
                    else:
                        array = np.asarray(image)
                        array = array[..., 0] if array.ndim == 3 else array
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                raise DataError(f"cannot read {path} as an image (corrupt or truncated file: "
                                f"{type(err).__name__}).") from None
            out[key] = np.ascontiguousarray(array)
        if "image" in out and "label" in out and out["image"].shape[1:] != out["label"].shape:
            raise DataError(f"{location['label']} has size {out['label'].shape} but its image "
                            f"{location['image']} has {out['image'].shape[1:]}.")
        out["attrs"] = {}
        return out
