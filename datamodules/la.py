"""Left atrium (2018 challenge) in the UA-MT layout (spec/datasets.md "LA").

``2018LA_Seg_Training Set/<id>/mri_norm2.h5`` holds image and label as (H, W, D). The budget counts cases
in ``train.list`` order; ``present`` filters lists to the cases whose files exist (../shared/data has 18 of 100).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datamodules.base import SegmentationDataModule
from datamodules.readers import read_list
from datamodules.transforms import la_train_transform
from lemis.errors import ConfigError


class LADataModule(SegmentationDataModule):
    """LA: binary; training patches 112x112x80 (published).

    Args (beyond SegmentationDataModule's): spacing: voxel size in mm for mm metrics (the h5 files carry
    none; the challenge's 0.625 mm isotropic by default). val_cases: carve the last N (present) train.list
    cases out of training as a validation split; 0 validates on ``val_list`` (the UA-MT protocol has no
    validation split: then keep checkpoint selection off, report the last checkpoint).
    """

    class_names = ("LA",)
    train_list = "train.list"
    folder = "2018LA_Seg_Training Set"

    def __init__(self, root: str, labeled: int | float = 16, num_classes: int = 2,
                 spacing: tuple[float, float, float] = (0.625, 0.625, 0.625), val_cases: int = 0, **kwargs):
        kwargs.setdefault("patch_size", (112, 112, 80))
        kwargs.setdefault("val_list", "test.list")
        super().__init__(root=root, num_classes=num_classes, labeled=labeled, **kwargs)
        self.spacing = tuple(spacing)
        self.val_cases = val_cases

    def _train_ids(self) -> tuple[list[str], list[str]]:
        ids = self._present_filter(read_list(self.root / self.train_list), self.train_list)
        if not 0 <= self.val_cases < len(ids):
            raise ConfigError(f"data.init_args.val_cases={self.val_cases} must leave training cases "
                              f"(train.list has {len(ids)}).")
        cut = len(ids) - self.val_cases
        return ids[:cut], ids[cut:]

    def train_units(self) -> list[tuple[str, str]]:
        return [(i, i) for i in self._train_ids()[0]]

    def eval_cases(self, stage: str) -> list[str]:
        if stage == "val" and self.val_cases:
            return self._train_ids()[1]
        return super().eval_cases(stage)

    def train_path(self, item: str) -> Path:
        return self.root / self.folder / item / "mri_norm2.h5"

    case_path = train_path

    def train_sample(self, data: dict, item: str) -> dict:
        image, label = la_train_transform(data["image"], data.get("label"), self.patch_size)
        sample = {"image": torch.from_numpy(image.astype(np.float32))[None], "case": item}
        if label is not None:
            sample["label"] = torch.from_numpy(label.astype(np.int64))
        return sample

    def eval_case(self, data: dict, case: str) -> dict:
        out = {"image": torch.from_numpy(data["image"].astype(np.float32))[None], "case": case,
               "spacing": self.spacing}
        if "label" in data:
            out["label"] = torch.from_numpy(data["label"].astype(np.int64))
        return out
