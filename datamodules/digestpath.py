"""DigestPath 2019 task 2 (colonoscopy tissue segmentation) as crops with image-level labels
(spec/methods/ikd_mil.md secs. 9 and 12).

Layout: ``tissue-train-pos-v1/<name>.jpg`` + ``<name>_mask.jpg`` (malignant, grey JPEG masks, > 127) and
``tissue-train-neg/<name>.jpg`` (benign, no mask), under ``root`` or ``root/Colonoscopy_tissue_segment_dataset``.
Crops of ``crop_size`` at ``crop_stride`` at native resolution are kept where tissue (Otsu on the HSV saturation)
covers ``tissue_min``; each is resized to ``patch_size``. Crops of negative images are 0; crops of positive ones
follow the shared rule on the mask's fraction (>= ``positive_fraction`` -> 1, 0 -> 0, otherwise dropped). Split by
image, stratified by class, ``split`` fractions with ``split_seed``, kept in ``splits/digestpath_seed{seed}.json``
beside the images when it can be written (and read from there next time). An image is decoded once and only its
kept crops (uint8, at ``patch_size``) are held (``cache: true``). Training items carry no mask; val/test crops
carry their mask resized to the patch (bilinear on 0/255, antialiased, then > 128, as the published code).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import SegmentationDataModule
from datamodules.glas import crop_origins, normalise, weak_label
from datamodules.readers import ImageReader
from datamodules.slides import tissue_mask
from datamodules.streams import Stream
from lemis.errors import ConfigError, DataError
from lemis.files import atomic_path

POSITIVE, NEGATIVE = "tissue-train-pos-v1", "tissue-train-neg"


def resize_crop(image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]):
    """image [3, h, w] float in [0, 1] -> uint8 [3, *size] (bilinear); mask {0, 1} -> bilinear + antialias on
    0/255, then > 128 (uint8 [*size])."""
    x = F.interpolate(torch.from_numpy(image)[None], size=size, mode="bilinear", align_corners=False)[0]
    out = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if mask is None:
        return out, None
    m = torch.from_numpy(mask.astype(np.float32) * 255)[None, None]
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0]
    return out, (m > 128).numpy().astype(np.uint8)


class DigestPathDataModule(SegmentationDataModule):
    """DigestPath crops: 2 classes (background, malignant tissue).

    Args (beyond SegmentationDataModule's): crop_size (512), crop_stride (512), patch_size (256), tissue_min (0.5),
        positive_fraction (0.05), split (train, val, test fractions: 0.6, 0.2, 0.2), split_seed (0).
    """

    class_names = ("malignant",)
    train_list = POSITIVE
    reader = ImageReader()

    def __init__(self, root: str, num_classes: int = 2, crop_size: int = 512, crop_stride: int = 512,
                 tissue_min: float = 0.5, positive_fraction: float = 0.05,
                 split: tuple[float, float, float] = (0.6, 0.2, 0.2), split_seed: int = 0, **kwargs):
        kwargs.setdefault("patch_size", (256, 256))
        kwargs.setdefault("batch_size", 16)
        super().__init__(root=root, num_classes=num_classes, **kwargs)
        if len(split) != 3 or abs(sum(split) - 1) > 1e-6 or min(split) < 0:
            raise ConfigError(f"data.init_args.split must be three fractions summing to 1, got {list(split)}.")
        if (self.root / "Colonoscopy_tissue_segment_dataset").is_dir():
            self.root = self.root / "Colonoscopy_tissue_segment_dataset"
        self.crop_size, self.crop_stride, self.tissue_min = crop_size, crop_stride, tissue_min
        self.positive_fraction, self.split_fractions, self.split_seed = positive_fraction, tuple(split), split_seed
        self.crops: dict[str, dict] = {}
        self._splits: dict[str, list[str]] | None = None

    # ---- images and splits ------------------------------------------------------------------------------------
    def location(self, name: str) -> dict[str, Path]:
        folder, stem = name.split("/", 1)
        if folder == POSITIVE:
            return {"image": self.root / folder / f"{stem}.jpg", "label": self.root / folder / f"{stem}_mask.jpg"}
        return {"image": self.root / folder / f"{stem}.jpg"}

    @property
    def splits(self) -> dict[str, list[str]]:
        """Image names (``folder/stem``) per split, stratified by class; stored in ``splits/`` when writable."""
        if self._splits is not None:
            return self._splits
        positives = sorted(f"{POSITIVE}/{p.stem}" for p in (self.root / POSITIVE).glob("*.jpg")
                           if not p.stem.endswith("_mask"))
        negatives = sorted(f"{NEGATIVE}/{p.stem}" for p in (self.root / NEGATIVE).glob("*.jpg"))
        if not positives and not negatives:
            raise DataError(f"no DigestPath image under {self.root} (expected {POSITIVE}/*.jpg, {NEGATIVE}/*.jpg).")
        stored = self.root / "splits" / f"digestpath_seed{self.split_seed}.json"
        if stored.is_file():
            splits = json.loads(stored.read_text())
            if sorted(n for s in splits.values() for n in s) == sorted(positives + negatives):
                self._splits = splits
                return splits
        rng = np.random.default_rng(self.split_seed)
        splits = {"train": [], "val": [], "test": []}
        for names in (positives, negatives):
            order = [names[i] for i in rng.permutation(len(names))]
            n_train = int(round(self.split_fractions[0] * len(order)))
            n_val = int(round(self.split_fractions[1] * len(order)))
            splits["train"] += sorted(order[:n_train])
            splits["val"] += sorted(order[n_train:n_train + n_val])
            splits["test"] += sorted(order[n_train + n_val:])
        try:
            stored.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(stored) as tmp:
                tmp.write_text(json.dumps(splits, indent=1))
        except OSError:
            rank_zero_info(f"lemis: DigestPath split not stored ({stored} is not writable).")
        rank_zero_info(f"lemis: DigestPath {len(positives)} positive, {len(negatives)} negative images; split "
                       f"{ {k: len(v) for k, v in splits.items()} }.")
        self._splits = splits
        return splits

    # ---- crops -----------------------------------------------------------------------------------------------
    def targets(self, stream: str, data: dict, location) -> dict:
        """One image -> its kept crops at ``patch_size``: ``image`` uint8 [N, 3, *P], ``crop_masks`` [N, *P]
        (positives; zeros for negatives), ``fraction`` [N] (the mask's fraction at native resolution), ``origin``
        [N, 2]. The full-size mask is not kept."""
        image = data["image"]
        mask = (data["label"] > 127).astype(np.uint8) if "label" in data else None
        small = image[:, ::16, ::16]  # tissue is judged on a 16x smaller copy (the slide rule's thumbnail)
        tissue = tissue_mask(np.moveaxis((small * 255).astype(np.uint8), 0, -1))
        crops, labels, fractions, origins = [], [], [], []
        c = self.crop_size
        for y in crop_origins(image.shape[1], c, self.crop_stride):
            for x in crop_origins(image.shape[2], c, self.crop_stride):
                if tissue[y // 16:(y + c) // 16 + 1, x // 16:(x + c) // 16 + 1].mean() < self.tissue_min:
                    continue
                window = mask[y:y + c, x:x + c] if mask is not None else None
                crop, crop_mask = resize_crop(image[:, y:y + c, x:x + c], window, self.patch_size)
                crops.append(crop)
                labels.append(crop_mask if crop_mask is not None else np.zeros(self.patch_size, np.uint8))
                fractions.append(float(window.mean()) if window is not None else 0.0)
                origins.append((y, x))
        if not crops:
            return {"image": np.zeros((0, 3, *self.patch_size), np.uint8), "crop_masks": np.zeros(
                (0, *self.patch_size), np.uint8), "fraction": np.zeros(0), "origin": np.zeros((0, 2), int), "attrs": {}}
        return {"image": np.stack(crops), "crop_masks": np.stack(labels), "fraction": np.array(fractions),
                "origin": np.array(origins), "attrs": {}}

    def _crops_of(self, split: str) -> list[str]:
        names = []
        for name in self.splits[split]:
            location = self.location(name)
            data = self._read(location, tuple(location), "crops")
            positive = name.startswith(POSITIVE)
            for i, fraction in enumerate(data["fraction"]):
                label = weak_label(fraction, self.positive_fraction) if positive else 0
                if label is None:
                    continue
                crop = f"{name}#{i}"
                self.crops[crop] = {"image": name, "index": i, "label": label}
                names.append(crop)
        return names

    def train_units(self) -> list[tuple[str, str]]:
        return [(self.crops[c]["image"], c) for c in self._crops_of("train")]

    def eval_cases(self, stage: str) -> list[str]:
        return self._crops_of("val" if stage == "val" else "test")

    def train_path(self, item: str) -> dict:
        return self.location(item.split("#")[0])

    def case_path(self, case: str) -> dict:
        return self.location(case.split("#")[0])

    def _read(self, location, keys, stream):
        # every stream reads an image's crops the same way: one cache entry per image
        return super()._read(location, tuple(location), "crops")

    def streams(self) -> list[Stream]:
        """One stream of crops with image-level labels; no mask is read."""
        return self.image_label_stream(("image",))

    def _crop_tensor(self, data: dict, item: str) -> torch.Tensor:
        return normalise(torch.from_numpy(data["image"][self.crops[item]["index"]].astype(np.float32) / 255))

    def train_sample(self, data: dict, item: str) -> dict:
        return {"image": self._crop_tensor(data, item), "bag_label": torch.tensor(self.crops[item]["label"]),
                "case": item}

    def eval_case(self, data: dict, case: str) -> dict:
        return {"image": self._crop_tensor(data, case), "case": case, "spacing": None,
                "label": torch.from_numpy(data["crop_masks"][self.crops[case]["index"]].astype(np.int64))}
