"""ACDC: the official NIfTI release (``RAW_DIR/{training,testing}/patientXXX/`` or ``RAW_DIR/patientXXX/``, each
with ``patientXXX_frameYY.nii.gz``, ``patientXXX_frameYY_gt.nii.gz`` and ``Info.cfg``) becomes the SSL4MIS layout:
``OUT/{train_slices,train,val,test}.list``, ``OUT/data/<patientXXX_frameYY>.h5`` and
``OUT/data/slices/<patientXXX_frameYY>_slice_<i>.h5``.

Conventions, chosen to reproduce the SSL4MIS files:
- Axes: SSL4MIS read the NIfTI with SimpleITK, whose array is (z, y, x), i.e. nibabel's (x, y, z) array
  transposed by (2, 1, 0). The in-plane shapes of the shipped volumes (e.g. (10, 256, 216)) agree. The
  ``spacing`` attribute is stored in the same (z, y, x) order as the array.
- Frames: the two annotated frames are renamed frame01 (ED) and frame02 (ES), as in the SSL4MIS lists; the
  official file names use the true frame index (patient001_frame12 is ES), and ED is not always frame 1.
- Slices are numbered from 1 (the SSL4MIS lists have no ``_slice_0``).
- Images are min-max normalised per volume (before slicing) to float32 [0, 1]; labels are uint8 {0, 1, 2, 3}.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.readers import read_list
from datamodules.writers import minmax, write_h5, write_list
from lemis.errors import PrepareError

ACDC_CLASSES = (0, 1, 2, 3)
ACDC_INFO_KEYS = {"ED": int, "ES": int, "Group": str, "Height": float, "Weight": float}
_FRAME_RE = re.compile(r"^(patient\d+)_frame(\d+)\.nii(?:\.gz)?$")


@dataclass
class _Patient:
    pid: str
    folder: Path
    frames: list[int]  # true frame indices, ordered ED then ES
    info: dict = field(default_factory=dict)


def prepare_acdc(raw: str | os.PathLike, out: str | os.PathLike, split_from: str | os.PathLike | None = None
                 ) -> dict[str, int]:
    """Convert the official ACDC release in ``raw`` to the SSL4MIS layout in ``out``.

    Every annotated frame becomes a volume file (image (D, H, W) float32 [0, 1], label (D, H, W) uint8, attributes
    ``spacing`` (z, y, x) mm, ``frame`` (the official frame index) and the Info.cfg fields); the frames of
    train.list patients are also written as slices (image (H, W), label (H, W)). With ``split_from``, its
    train/val/test lists are copied (every id must be found in ``raw``); otherwise every patient is in train.list.
    Returns the counts ``{"patients", "volumes", "slices"}``.
    """
    raw, out = Path(raw), Path(out)
    patients = _find_acdc_patients(raw)
    splits = _acdc_splits(patients, split_from, raw)
    train_patients = {name.split("_")[0] for name in splits["train"]}
    (out / "data" / "slices").mkdir(parents=True, exist_ok=True)
    slice_names: dict[str, list[str]] = {}  # volume id -> its slice ids
    for patient in patients.values():
        for name, depth in _convert_acdc_patient(patient, out / "data", patient.pid in train_patients):
            slice_names[name] = [f"{name}_slice_{i}" for i in range(1, depth + 1)]
    train_slices = [s for name in splits["train"] for s in slice_names[name]]
    for split, names in splits.items():
        write_list(out / f"{split}.list", names)
    write_list(out / "train_slices.list", train_slices)
    return {"patients": len(patients), "volumes": len(slice_names), "slices": len(train_slices)}


def _find_acdc_patients(raw: Path) -> dict[str, _Patient]:
    """Patient folders under raw/training, raw/testing or raw itself, sorted by id."""
    if not raw.is_dir():
        raise PrepareError(f"the raw ACDC folder {raw} does not exist")
    folders = [p for parent in (raw / "training", raw / "testing", raw) if parent.is_dir()
               for p in sorted(parent.glob("patient*")) if p.is_dir()]
    if not folders:
        raise PrepareError(f"no patientXXX folders found in {raw}, {raw / 'training'} or {raw / 'testing'}")
    patients: dict[str, _Patient] = {}
    for folder in folders:
        if folder.name in patients:
            raise PrepareError(f"patient {folder.name} appears twice, in {patients[folder.name].folder} and {folder}")
        patients[folder.name] = _read_acdc_patient(folder)
    return dict(sorted(patients.items()))


def _read_acdc_patient(folder: Path) -> _Patient:
    """The annotated frames of one patient folder, ordered ED then ES, checked against Info.cfg."""
    frames = sorted(int(m.group(2)) for p in folder.iterdir()
                    if (m := _FRAME_RE.match(p.name)) and m.group(1) == folder.name)
    for frame in frames:
        if not _frame_path(folder, frame, gt=True).exists():
            raise PrepareError(f"the frame {_frame_path(folder, frame)} has no ground truth "
                               f"{_frame_path(folder, frame, gt=True).name} next to it")
    if len(frames) != 2:
        raise PrepareError(f"{folder} holds {len(frames)} annotated frames, ACDC has 2 (ED and ES) per patient")
    info = _read_info_cfg(folder / "Info.cfg")
    # Without Info.cfg the earlier frame is taken as ED, which holds for every ACDC training patient.
    if "ED" in info and "ES" in info:
        if sorted((info["ED"], info["ES"])) != frames:
            raise PrepareError(f"{folder / 'Info.cfg'} gives ED {info['ED']} and ES {info['ES']}, "
                               f"but the annotated frames there are {frames}")
        frames = [info["ED"], info["ES"]]
    _check_group(folder, info)
    return _Patient(folder.name, folder, frames, info)


def _check_group(folder: Path, info: dict) -> None:
    """A training patient's Info.cfg Group must be its block's (001-020 DCM, ..., 081-100 RV): SEMISE's group table
    (``datamodules.severity.acdc_group``) stands on that rule, since the SSL4MIS h5 files lost Info.cfg."""
    from datamodules.severity import acdc_group

    match = re.fullmatch(r"patient(\d{3})", folder.name)
    if "Group" not in info or not match or not 1 <= int(match.group(1)) <= 100:
        return
    if info["Group"] != acdc_group(folder.name):
        raise PrepareError(f"{folder / 'Info.cfg'} gives Group {info['Group']}, but ACDC's training set puts "
                           f"{folder.name} in the {acdc_group(folder.name)} block (20 patients a group)")


def _read_info_cfg(path: Path) -> dict:
    """The ED, ES, Group, Height and Weight fields of an ACDC Info.cfg ("Key: value" lines); {} if absent."""
    if not path.exists():
        return {}
    info = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ACDC_INFO_KEYS and value:
            try:
                info[key] = ACDC_INFO_KEYS[key](value)
            except ValueError:
                raise PrepareError(f"{path} has an unreadable {key} value {value!r}") from None
    return info


def _frame_path(folder: Path, frame: int, gt: bool = False) -> Path:
    stem = f"{folder.name}_frame{frame:02d}" + ("_gt" if gt else "")
    plain = folder / f"{stem}.nii"
    return plain if plain.exists() else folder / f"{stem}.nii.gz"


def _acdc_splits(patients: dict[str, _Patient], split_from, raw: Path) -> dict[str, list[str]]:
    """train/val/test volume ids: copied from ``split_from``, or every patient in train."""
    volumes = [f"{pid}_frame{k:02d}" for pid in patients for k in (1, 2)]
    if split_from is None:
        return {"train": volumes, "val": [], "test": []}
    splits = {}
    for split in ("train", "val", "test"):
        path = Path(split_from) / f"{split}.list"
        if not path.exists():
            raise PrepareError(f"the split list {path} does not exist")
        splits[split] = read_list(path)
        missing = sorted(set(splits[split]) - set(volumes))
        if missing:
            raise PrepareError(f"{path} names {len(missing)} volumes that are not in {raw} (first: {missing[0]})")
    return splits


def _convert_acdc_patient(patient: _Patient, data_dir: Path, with_slices: bool) -> list[tuple[str, int]]:
    """Write both frames of a patient; returns (volume id, number of slices) per frame."""
    written = []
    for k, frame in enumerate(patient.frames, start=1):
        name = f"{patient.pid}_frame{k:02d}"
        image, label, spacing = _load_acdc_frame(patient.folder, frame)
        attrs = {"spacing": spacing, "frame": frame, **patient.info}
        write_h5(data_dir / f"{name}.h5", {"image": image, "label": label}, attrs)
        if with_slices:
            for i in range(image.shape[0]):
                write_h5(data_dir / "slices" / f"{name}_slice_{i + 1}.h5", {"image": image[i], "label": label[i]})
        written.append((name, image.shape[0]))
    return written


def _load_acdc_frame(folder: Path, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image (D, H, W) float32 [0, 1], label (D, H, W) uint8, spacing (3,) float64 (z, y, x) mm."""
    import nibabel as nib  # only the converter needs it; keeps `import datamodules` light

    img_path, gt_path = _frame_path(folder, frame), _frame_path(folder, frame, gt=True)
    img, gt = nib.load(img_path), nib.load(gt_path)
    if img.ndim != 3 or img.shape != gt.shape:
        raise PrepareError(f"{gt_path} has shape {gt.shape} and its image {img_path.name} {img.shape}, "
                           f"both must be the same 3D shape")
    label = np.rint(np.asarray(gt.dataobj, dtype=np.float64))
    if not np.isin(label, ACDC_CLASSES).all():
        raise PrepareError(f"{gt_path} holds labels {np.unique(label).tolist()}, ACDC has only {list(ACDC_CLASSES)}")
    image = np.asarray(img.dataobj, dtype=np.float64).transpose(2, 1, 0)
    spacing = np.asarray(img.header.get_zooms(), dtype=np.float64)[::-1].copy()
    return minmax(image), label.transpose(2, 1, 0).astype(np.uint8), spacing
