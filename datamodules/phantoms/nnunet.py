"""A phantom in the nnU-Net v2 raw layout or the MSD layout (datamodules.nnunet), generated in tests.

Each case: an ellipsoid lesion (label 1) with a core (label 2) in a noisy field, two channels that differ on
purpose (channel 0 bright in the whole lesion, channel 1 only in its core, so a swapped channel order changes
what a net sees), anisotropic voxels and an affine with a flip and an offset, so a prediction written with the
wrong geometry does not overlay its scan. Labeled cases, unlabeled ones (``imagesUnlabeled``) and test scans with
labels (``imagesTs`` + ``labelsTs``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from datamodules.phantoms.common import ellipsoid, smooth_noise

TEST_SIZE = {"patch_size": [32, 32, 16], "batch_size": 2, "labeled_batch_size": 1,
             "model.init_args.num_classes": 3, "model.init_args.net.init_args.num_classes": 3,
             "model.init_args.net.init_args.in_channels": 2}
SPACING = (0.8, 0.9, 2.5)
LABELS = {"background": 0, "lesion": 1, "core": 2}


def phantom_affine(spacing=SPACING) -> np.ndarray:
    """x flipped (a radiological orientation), anisotropic voxels, an offset."""
    return np.array([[-spacing[0], 0, 0, 40.0], [0, spacing[1], 0, -12.0], [0, 0, spacing[2], 7.5], [0, 0, 0, 1]])


def phantom_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(image [2, *shape] float32, label [*shape] uint8)."""
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = [rng.uniform(0.35, 0.65) * s for s in shape]
    axes = [rng.uniform(0.18, 0.28) * s for s in shape]
    lesion = ellipsoid(coords, centre, axes, rng.uniform(0, np.pi))
    core = ellipsoid(coords, centre, [0.5 * a for a in axes])
    label = lesion.astype(np.uint8) + core.astype(np.uint8)
    noise = [0.3 * smooth_noise(rng, shape, 1.0) for _ in range(2)]
    image = np.stack([100 + 80 * lesion + 20 * noise[0], 50 + 60 * core + 15 * noise[1]]).astype(np.float32)
    return image, label


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, affine), str(path))


def make_nnunet(root, layout: str = "nnunet", n_labeled: int = 5, n_unlabeled: int = 2, n_test: int = 2,
                shape: tuple[int, int, int] = (24, 24, 10), seed: int = 0) -> Path:
    """Write a phantom dataset in ``layout`` ("nnunet" or "msd") under ``root``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    affine = phantom_affine()
    folders = ["imagesTr", "labelsTr", "imagesTs", "labelsTs"] + (["imagesUnlabeled"] if n_unlabeled else [])
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    groups = {"imagesTr": n_labeled, "imagesUnlabeled": n_unlabeled, "imagesTs": n_test}
    training = []
    for folder, n in groups.items():
        for i in range(n):
            case = f"case_{folder[6:9].lower()}{i:03d}"
            image, label = phantom_case(rng, shape)
            if layout == "nnunet":
                for c in range(image.shape[0]):
                    _save(root / folder / f"{case}_{c:04d}.nii.gz", image[c], affine)
            else:
                _save(root / folder / f"{case}.nii.gz", np.moveaxis(image, 0, -1), affine)
            labels = {"imagesTr": "labelsTr", "imagesTs": "labelsTs"}.get(folder)
            if labels:
                _save(root / labels / f"{case}.nii.gz", label, affine)
            if folder == "imagesTr":
                training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    if layout == "nnunet":
        meta = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": LABELS, "numTraining": n_labeled,
                "file_ending": ".nii.gz", "name": "phantom"}
    else:
        (root / "imagesTr" / "._case_tr000.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork
        meta = {"name": "phantom", "modality": {"0": "T2", "1": "ADC"},
                "labels": {str(v): k for k, v in LABELS.items()}, "numTraining": n_labeled,
                "training": training + [{"image": "./imagesTr/._case_tr000.nii.gz", "label": "./labelsTr/x"}],
                "test": [f"./imagesTs/case_ts{i:03d}.nii.gz" for i in range(n_test)]}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
