"""ACDC cine MRI in the SSL4MIS layout (spec/datasets.md "ACDC").

Training reads 2D slices ``data/slices/<slice>.h5`` named by ``train_slices.list``; the budget counts patients
in order of first appearance in that file. Evaluation reads whole volumes ``data/<volume>.h5`` (D, H, W).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datamodules.base import SegmentationDataModule
from datamodules.readers import read_list
from datamodules.transforms import acdc_train_transform, crop
from lemis.errors import ConfigError

AUGMENTS = ("ssl4mis", "crop")


def patient_of(slice_name: str) -> str:
    """patient099_frame01_slice_15 -> patient099."""
    return slice_name.split("_", 1)[0]


class ACDCDataModule(SegmentationDataModule):
    """ACDC: 4 classes (background, RV, Myo, LV); ``labeled`` counts patients (70 = fully supervised).

    Args (beyond SegmentationDataModule's): augment: ``ssl4mis`` (rot/flip or rotate, then the slice resized
    to the patch: transforms.acdc_train_transform) or ``crop`` (a random patch, zero-padded where the slice is
    smaller: the subclass-learning code's only augmentation); aug_legacy: the ``ssl4mis`` probabilities of the
    code that produced SSL4MIS's published numbers.
    """

    class_names = ("RV", "Myo", "LV")
    train_list = "train_slices.list"

    def __init__(self, root: str, labeled: int | float = 7, num_classes: int = 4, augment: str = "ssl4mis",
                 aug_legacy: bool = False, **kwargs):
        kwargs.setdefault("patch_size", (256, 256))
        super().__init__(root=root, num_classes=num_classes, labeled=labeled, **kwargs)
        if augment not in AUGMENTS:
            raise ConfigError(f"data.init_args.augment must be one of {AUGMENTS}, got {augment!r}.")
        self.augment, self.aug_legacy = augment, aug_legacy

    def train_units(self) -> list[tuple[str, str]]:
        slices = self._present_filter(read_list(self.root / self.train_list), self.train_list)
        return [(patient_of(s), s) for s in slices]

    def train_path(self, item: str) -> Path:
        return self.root / "data" / "slices" / f"{item}.h5"

    def case_path(self, case: str) -> Path:
        return self.root / "data" / f"{case}.h5"

    def train_sample(self, data: dict, item: str) -> dict:
        if self.augment == "crop":
            image, label = crop(data["image"][None], data.get("label"), self.patch_size)
        else:
            image, label = acdc_train_transform(data["image"], data.get("label"), self.patch_size, self.aug_legacy)
            image = image[None]
        sample = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), "case": item}
        if label is not None:
            sample["label"] = torch.from_numpy(label.astype(np.int64))
        return sample

    def eval_case(self, data: dict, case: str) -> dict:
        spacing = data["attrs"].get("spacing")
        out = {"image": torch.from_numpy(data["image"].astype(np.float32))[None], "case": case,
               "spacing": None if spacing is None else tuple(float(s) for s in spacing)}
        if "label" in data:
            out["label"] = torch.from_numpy(data["label"].astype(np.int64))
        return out
