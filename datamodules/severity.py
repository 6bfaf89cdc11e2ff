"""Severity labels for SEMISE (spec/methods/semise.md secs. 2-3): ACDC's pathology groups, the left-ventricular
ejection fraction from the ED and ES label volumes, its ordinal grade, and the rule choosing the graded patients.

EF = (EDV - ESV) / EDV with V = LV-cavity voxels (label 3) x voxel volume; grade 0 if EF >= 0.50 (preserved),
1 if 0.40 <= EF < 0.50 (mildly reduced), 2 if EF < 0.40 (reduced). ACDC's training patients come in blocks of 20:
001-020 DCM, 021-040 HCM, 041-060 MINF, 061-080 NOR, 081-100 RV; healthy = NOR.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from datamodules.readers import read_h5, read_list
from lemis.errors import DataError

GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")
LV = 3


def acdc_group(case: str) -> str:
    """patient001 -> DCM, ..., patient100 -> RV (the training set's blocks of 20)."""
    match = re.fullmatch(r"patient(\d{3})", case)
    if not match or not 1 <= int(match.group(1)) <= 100:
        raise DataError(f"{case!r} is not an ACDC training patient (patient001..patient100): its group is not "
                        f"known without its Info.cfg.")
    return GROUPS[(int(match.group(1)) - 1) // 20]


def ejection_fraction(ed_label: np.ndarray, es_label: np.ndarray, voxel_volume: float = 1.0) -> float:
    """(EDV - ESV) / EDV of the LV cavity (label 3), float64; EDV = 0 is an error."""
    edv = float(np.count_nonzero(ed_label == LV)) * voxel_volume
    esv = float(np.count_nonzero(es_label == LV)) * voxel_volume
    if edv == 0:
        raise DataError("the ED label volume has no LV cavity (label 3): its ejection fraction is undefined.")
    return (edv - esv) / edv


def ef_grade(ef: float) -> int:
    """0 if EF >= 0.50, 1 if 0.40 <= EF < 0.50, 2 below."""
    return 0 if ef >= 0.5 else 1 if ef >= 0.4 else 2


def frame_label(root: Path, patient: str, frame: str) -> np.ndarray:
    """The label volume of ``patient_frameNN`` in the SSL4MIS layout: ``data/<id>.h5``, or its slices
    ``data/slices/<id>_slice_K.h5`` stacked by K (SSL4MIS ships training patients as slices)."""
    case = f"{patient}_{frame}"
    volume = root / "data" / f"{case}.h5"
    if volume.is_file():
        return read_h5(volume, ("label",))["label"]
    slices = sorted((root / "data" / "slices").glob(f"{case}_slice_*.h5"),
                    key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not slices:
        raise DataError(f"no volume {volume} and no slice file {root / 'data' / 'slices' / (case + '_slice_*.h5')}.")
    return np.stack([read_h5(p, ("label",))["label"] for p in slices])


def acdc_ejection_fraction(root: Path, patient: str) -> float:
    """EF of an ACDC patient from ``frame01`` (ED) and ``frame02`` (ES)."""
    return ejection_fraction(frame_label(root, patient, "frame01"), frame_label(root, patient, "frame02"))


def graded_patients(root: Path, grades: dict[str, int], n: int = 7, list_name: str = "train.list") -> list[str]:
    """``ssl4mis_stratified``: walk ``train.list`` (patients, first appearance), take each patient whose group is
    not yet present, then the first NOR not yet taken, then the first grade-1 patient not yet taken."""
    order = list(dict.fromkeys(name.split("_")[0] for name in read_list(root / list_name)))
    chosen: list[str] = []
    for patient in order:
        if acdc_group(patient) not in {acdc_group(c) for c in chosen}:
            chosen.append(patient)
    chosen.append(next(p for p in order if acdc_group(p) == "NOR" and p not in chosen))
    chosen.append(next(p for p in order if grades.get(p) == 1 and p not in chosen))
    return chosen[:n]
