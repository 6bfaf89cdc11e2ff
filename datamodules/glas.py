"""GlaS (Warwick-QU gland segmentation, MICCAI 2015) with derived image-level labels (spec/methods/ikd_mil.md
secs. 9 and 12).

Layouts: the official flat folder (``train_N.bmp`` + ``train_N_anno.bmp`` instance masks, ``testA_N``,
``testB_N``) or the PNG copy of ../shared/data/GlaS-half (``images/<name>.png``, ``labels/<name>.png`` 0/255);
``Grade.csv`` (CR line endings, leading spaces) gives each image's patient. Masks are binarised (> 0).

Training items are crops of the training images (``crop_size`` at ``crop_stride``, the last crop flush with the
border), resized to ``patch_size`` for the net. Their weak labels are **derived** from the masks (GlaS has no
image-level tumour label; lemis's rule): gland fraction r >= ``positive_fraction`` -> 1, r == 0 -> 0, otherwise
the crop is dropped. The mask only produces that scalar: a training batch is ``{image [B, 3, *P], bag_label [B],
case}``, never a pixel mask. Validation: the training images of ``val_fraction`` of the patients (seed
``val_seed``); test: ``test_sets`` (testA). Evaluation cases are whole images at native size with their masks.
Images are ImageNet-normalised.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import SegmentationDataModule
from datamodules.readers import ImageReader
from datamodules.streams import Stream
from lemis.errors import ConfigError, DataError

NAME = re.compile(r"^(train|testA|testB)_(\d+)$")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SETS = ("train", "testA", "testB")


def read_grades(path: Path) -> dict[str, tuple[str, str]]:
    """``Grade.csv`` -> {name: (patient id, GlaS grade)}; any line ending (the shipped copy uses CR), fields
    stripped of their leading spaces."""
    if not path.is_file():
        raise DataError(f"GlaS grade table {path} not found (it names each image's patient).")
    rows = [[field.strip() for field in line.split(",")] for line in path.read_text().splitlines() if line.strip()]
    if not rows or rows[0][:2] != ["name", "patient ID"] or any(len(r) < 3 for r in rows[1:]):
        raise DataError(f"{path} is not GlaS's Grade.csv (expected a header 'name, patient ID, grade (GlaS), ...').")
    return {r[0]: (r[1], r[2]) for r in rows[1:]}


def crop_origins(size: int, crop: int, stride: int) -> list[int]:
    """0, stride, 2 stride, ... and a last origin flush with the border (size - crop); [0] when size <= crop."""
    if size <= crop:
        return [0]
    origins = list(range(0, size - crop + 1, stride))
    return origins if origins[-1] == size - crop else origins + [size - crop]


def weak_label(fraction: float, positive_fraction: float = 0.05) -> int | None:
    """1 if the gland fraction reaches ``positive_fraction``, 0 if it is 0, None (drop the crop) in between."""
    if fraction >= positive_fraction:
        return 1
    return 0 if fraction == 0 else None


def normalise(image: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std over RGB [3, *S] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    return (image - mean) / std


class GlaSDataModule(SegmentationDataModule):
    """GlaS: 2 classes (background, gland); training on derived crop-level labels.

    Args (beyond SegmentationDataModule's): crop_size, crop_stride: training crops at native resolution (128,
        64); patch_size: what the net sees, each crop resized to it bilinearly (256); positive_fraction: the weak
        label rule (0.05); val_fraction, val_seed: the patients whose training images validate (0.2, seed 0);
        test_sets: evaluated by ``test`` and ``predict`` (testA; testB optional). ``labeled`` counts training
        images (unset: all).
    """

    class_names = ("gland",)
    train_list = "Grade.csv"
    reader = ImageReader()

    def __init__(self, root: str, num_classes: int = 2, crop_size: int = 128, crop_stride: int = 64,
                 positive_fraction: float = 0.05, val_fraction: float = 0.2, val_seed: int = 0,
                 test_sets: tuple[str, ...] = ("testA",), **kwargs):
        kwargs.setdefault("patch_size", (256, 256))
        kwargs.setdefault("batch_size", 16)
        super().__init__(root=root, num_classes=num_classes, **kwargs)
        if num_classes != 2:
            raise ConfigError(f"data.init_args.num_classes must be 2 for GlaS (background, gland), got {num_classes}.")
        if crop_size < 1 or crop_stride < 1:
            raise ConfigError(f"data.init_args.crop_size and crop_stride must be >= 1, got {crop_size}, {crop_stride}.")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"data.init_args.val_fraction must be in [0, 1), got {val_fraction}.")
        unknown = [s for s in test_sets if s not in SETS[1:]]
        if unknown or not test_sets:
            raise ConfigError(f"data.init_args.test_sets={list(test_sets)}: each must be one of {list(SETS[1:])}.")
        self.crop_size, self.crop_stride, self.positive_fraction = crop_size, crop_stride, positive_fraction
        self.val_fraction, self.val_seed, self.test_sets = val_fraction, val_seed, tuple(test_sets)
        self.bag_labels: dict[str, int] = {}
        self._names: dict[str, list[str]] | None = None

    # ---- files and splits -------------------------------------------------------------------------------------
    def location(self, name: str) -> dict[str, Path]:
        if (self.root / "images").is_dir():
            return {"image": self.root / "images" / f"{name}.png", "label": self.root / "labels" / f"{name}.png"}
        return {"image": self.root / f"{name}.bmp", "label": self.root / f"{name}_anno.bmp"}

    @property
    def names(self) -> dict[str, list[str]]:
        """Present image names per split (train, val, testA, testB), in GlaS order (by number)."""
        if self._names is None:
            folder = self.root / "images" if (self.root / "images").is_dir() else self.root
            found = sorted((m.group(1), int(m.group(2)), m.group(0)) for p in folder.glob("*")
                           if (m := NAME.match(p.stem)) and p.suffix.lower() in (".png", ".bmp"))
            if not found:
                raise DataError(f"no GlaS image under {folder} (expected train_N.bmp or images/train_N.png).")
            by_set = {s: [name for kind, _, name in found if kind == s] for s in SETS}
            grades = read_grades(self.root / "Grade.csv")
            missing = [n for names in by_set.values() for n in names if n not in grades]
            if missing:
                raise DataError(f"{self.root / 'Grade.csv'} has no row for {missing[0]} ({len(missing)} images).")
            patients = sorted({grades[n][0] for n in by_set["train"]}, key=lambda p: (len(p), p))
            n_val = int(round(self.val_fraction * len(patients)))
            if n_val >= len(patients) and self.val_fraction > 0:
                raise ConfigError(f"data.init_args.val_fraction={self.val_fraction} leaves no training patient of "
                                  f"the {len(patients)} present.")
            order = np.random.default_rng(self.val_seed).permutation(len(patients))
            val_patients = {patients[i] for i in order[:n_val]}
            by_set["val"] = [n for n in by_set["train"] if grades[n][0] in val_patients]
            by_set["train"] = [n for n in by_set["train"] if grades[n][0] not in val_patients]
            tests = [len(by_set[s]) for s in self.test_sets]
            rank_zero_info(f"lemis: GlaS {len(by_set['train'])} training images, {len(by_set['val'])} validation "
                           f"images (patients {sorted(val_patients)}), test {tests}.")
            self._names = by_set
        return self._names

    def eval_cases(self, stage: str) -> list[str]:
        if stage == "val":
            return self.names["val"]
        return [n for s in self.test_sets for n in self.names[s]]

    def train_units(self) -> list[tuple[str, str]]:
        """(image, crop) pairs of the kept crops; the crop's weak label is derived here, once, from its mask."""
        units = []
        for name in self.names["train"]:
            mask = self._read(self.location(name), ("image", "label"), "labeled")["label"]
            for y in crop_origins(mask.shape[0], self.crop_size, self.crop_stride):
                for x in crop_origins(mask.shape[1], self.crop_size, self.crop_stride):
                    window = mask[y:y + self.crop_size, x:x + self.crop_size]
                    label = weak_label(float(window.mean()), self.positive_fraction)
                    if label is not None:
                        item = f"{name}:{y}:{x}"
                        self.bag_labels[item] = label
                        units.append((name, item))
        positives = sum(self.bag_labels[i] for _, i in units)
        rank_zero_info(f"lemis: GlaS {len(units)} training crops ({positives} positive, {len(units) - positives} "
                       f"negative; crops with 0 < gland fraction < {self.positive_fraction} dropped).")
        return units

    def train_path(self, item: str) -> dict[str, Path]:
        return self.location(item.split(":", 1)[0])

    def case_path(self, case: str) -> dict[str, Path]:
        return self.location(case)

    def streams(self) -> list[Stream]:
        """One stream of weakly labeled crops (its masks are read only to derive ``bag_label``)."""
        return self.image_label_stream(("image", "label"))

    # ---- samples --------------------------------------------------------------------------------------------
    def targets(self, stream: str, data: dict, location) -> dict:
        """Masks binarised: gland > 0 (instance ids in the official release, 255 in the PNG copy)."""
        if "label" in data:
            data = {**data, "label": (data["label"] > 0).astype(np.uint8)}
        return data

    def train_sample(self, data: dict, item: str) -> dict:
        """{image [3, *patch_size] (the crop resized bilinearly, normalised), bag_label, case}: no pixel mask."""
        _, y, x = item.split(":")
        y, x = int(y), int(x)
        crop = torch.from_numpy(data["image"][:, y:y + self.crop_size, x:x + self.crop_size].copy())
        crop = F.interpolate(crop[None], size=self.patch_size, mode="bilinear", align_corners=False)[0]
        return {"image": normalise(crop), "bag_label": torch.tensor(self.bag_labels[item]), "case": item}

    def eval_case(self, data: dict, case: str) -> dict:
        out = {"image": normalise(torch.from_numpy(data["image"])), "case": case, "spacing": None}
        if "label" in data:
            out["label"] = torch.from_numpy(data["label"].astype(np.int64))
        return out
