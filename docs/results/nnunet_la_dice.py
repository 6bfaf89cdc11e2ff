"""Independent check of docs/results/nnunet_la.md: Dice of the NIfTI masks `lemis predict` wrote against the LA
labels, read from the original h5 files with h5py (not through lemis's readers, metrics or DataModules).

    .venv/bin/python docs/results/nnunet_la_dice.py RUN_DIR/predictions ../shared/data/LA
"""
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np


def main(predictions: str, la_root: str) -> None:
    scores = []
    for mask_path in sorted(Path(predictions).glob("*.nii.gz")):
        case = mask_path.name[: -len(".nii.gz")]
        mask = nib.load(str(mask_path))
        pred = np.asarray(mask.dataobj) == 1
        with h5py.File(Path(la_root) / "2018LA_Seg_Training Set" / case / "mri_norm2.h5") as f:
            gt = f["label"][()] == 1
        assert pred.shape == gt.shape, (case, pred.shape, gt.shape)
        dice = 2 * np.logical_and(pred, gt).sum() / (pred.sum() + gt.sum())
        scores.append(dice)
        print(f"{case}: Dice {100 * dice:.2f} %  (voxels predicted {pred.sum()}, labeled {gt.sum()}, "
              f"zooms {tuple(float(z) for z in mask.header.get_zooms())})")
    print(f"mean Dice over {len(scores)} cases: {100 * np.mean(scores):.2f} %")


if __name__ == "__main__":
    main(*sys.argv[1:3])
