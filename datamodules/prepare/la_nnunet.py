"""LA (the UA-MT h5 layout, ../shared/data/LA) as an nnU-Net v2 raw folder, for the end-to-end check of the
nnunet DataModule and NIfTI predictions (docs/results/nnunet_la.md).

``train.list`` cases whose files exist become ``imagesTr/{id}_0000.nii.gz`` + ``labelsTr/{id}.nii.gz`` (the
``labeled`` budget of the nnunet DataModule then decides which are labeled in a run), ``test.list`` cases
``imagesTs/`` (+ ``labelsTs/`` for ``lemis test``). The h5 files carry no spacing: the challenge's 0.625 mm
isotropic goes into the affine. Arrays keep the h5 axis order (H, W, D) as (x, y, z).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from datamodules.readers import read_h5, read_list
from datamodules.writers import write_nifti
from lemis.errors import DataError, PrepareError
from lemis.files import atomic_path

SPACING = 0.625
AFFINE = np.diag([SPACING, SPACING, SPACING, 1.0])
FOLDER = "2018LA_Seg_Training Set"


def prepare_la_nnunet(raw, out, split_from=None) -> dict:
    """Write ``out`` (a ``DatasetXXX_Name`` folder) from the LA root ``raw``; returns counts."""
    raw, out = Path(raw), Path(out)
    if not (raw / FOLDER).is_dir():
        raise PrepareError(f"{raw / FOLDER} not found: RAW_DIR must be an LA root in the UA-MT layout.")
    counts = {}
    for split, images, labels in (("train.list", "imagesTr", "labelsTr"), ("test.list", "imagesTs", "labelsTs")):
        try:
            ids = read_list(raw / split)
        except DataError as err:
            raise PrepareError(str(err)) from None
        present = [i for i in ids if (raw / FOLDER / i / "mri_norm2.h5").is_file()]
        for case in present:
            try:
                data = read_h5(raw / FOLDER / case / "mri_norm2.h5", ("image", "label"))
            except DataError as err:
                raise PrepareError(str(err)) from None
            write_nifti(out / images / f"{case}_0000.nii.gz", data["image"].astype(np.float32), AFFINE)
            write_nifti(out / labels / f"{case}.nii.gz", data["label"].astype(np.uint8), AFFINE)
        counts[f"{images} cases"] = len(present)
    meta = {"name": "LA", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "left_atrium": 1},
            "numTraining": counts["imagesTr cases"], "file_ending": ".nii.gz"}
    with atomic_path(out / "dataset.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return counts
