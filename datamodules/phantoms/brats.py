"""A BraTS phantom in the 2017-2021 layout (``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``, labels {0,1,2,4}) or the
DeepMedic 2013/2015 layout (``{Flair,T1c,T1,T2}_subtrMeanDivStd.nii.gz``, ``OTMultiClass.nii.gz`` labels 0-4,
``brainmask.nii.gz``), generated in tests.

Each case: an ellipsoidal brain (zero outside, as skull-stripped BraTS volumes are) holding a tumour of nested
shells (edema 2 outside, enhancing 4 as a rim, necrosis 1 inside; for 2015 a non-enhancing 3 patch as well); every
modality has its own contrast for each label, so the channels differ; 1 mm voxels and BraTS's affine.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.phantoms.common import ellipsoid, smooth_noise

TEST_SIZE = {"patch_size": [32, 32, 32], "batch_size": 2, "labeled_batch_size": 1, "data.init_args.val_cases": 1}
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
# intensity of background brain, edema, enhancing, necrosis, non-enhancing per modality
CONTRAST = {"t1": (1.0, 0.8, 0.9, 0.5, 0.7), "t1ce": (1.0, 0.9, 2.0, 0.4, 0.8), "t2": (1.0, 1.8, 1.2, 2.0, 1.4),
            "flair": (1.0, 2.0, 1.3, 1.1, 1.6)}


def phantom_brain(rng: np.random.Generator, shape, layout: str):
    """({modality: image}, raw label, brain mask) of one case."""
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array(shape) / 2
    brain = ellipsoid(coords, centre, [0.42 * s for s in shape])
    t = centre + rng.uniform(-0.1, 0.1, 3) * np.array(shape)
    r = rng.uniform(0.12, 0.18) * min(shape)
    label = np.zeros(shape, np.uint8)
    label[ellipsoid(coords, t, [r * 1.6] * 3) & brain] = 2
    label[ellipsoid(coords, t, [r] * 3)] = 4
    label[ellipsoid(coords, t, [r * 0.6] * 3)] = 1
    if layout == "2015":
        label[ellipsoid(coords, t + [r * 0.5, 0, 0], [r * 0.3] * 3)] = 3
    index = np.select([label == 2, label == 4, label == 1, label == 3], [1, 2, 3, 4], 0)
    images = {}
    for modality, contrast in CONTRAST.items():
        image = np.asarray(contrast, np.float32)[index] * 300 + 30 * smooth_noise(rng, shape, 1.0)
        images[modality] = np.where(brain, image, 0).astype(np.float32 if layout == "2015" else np.int16)
    return images, label, brain


def make_brats(root, layout: str = "2020", n_cases: int = 4, shape: tuple[int, int, int] = (36, 36, 24),
               seed: int = 0) -> Path:
    """Write ``n_cases`` case folders of ``layout`` ("2020" or "2015") under ``root``; returns ``root``."""
    import nibabel as nib

    root = Path(root)
    rng = np.random.default_rng(seed)
    names = {"flair": "Flair", "t1ce": "T1c", "t1": "T1", "t2": "T2"}
    for i in range(n_cases):
        case = f"BraTS20_Training_{i + 1:03d}" if layout == "2020" else f"brats_2013_pat{i + 1:04d}_1"
        folder = root / case
        folder.mkdir(parents=True, exist_ok=True)
        images, label, brain = phantom_brain(rng, shape, layout)
        save = lambda array, name: nib.save(nib.Nifti1Image(array, AFFINE), str(folder / name))  # noqa: E731
        if layout == "2020":
            for modality, image in images.items():
                save(image, f"{case}_{modality}.nii.gz")
            save(label, f"{case}_seg.nii.gz")
        else:
            for modality, image in images.items():
                inside = image[brain]
                save(np.where(brain, (image - inside.mean()) / inside.std(), 0).astype(np.float32),
                     f"{names[modality]}_subtrMeanDivStd.nii.gz")
            save(label.astype(np.float32), "OTMultiClass.nii.gz")
            save(brain.astype(np.int32), "brainmask.nii.gz")
    return root
