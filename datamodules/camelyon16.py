"""Camelyon16 (lymph-node sections, pyramidal TIFF slides) as patches with image-level labels
(spec/methods/ikd_mil.md secs. 9 and 12).

Layout (the official release): ``training/normal/normal_NNN.tif``, ``training/tumor/tumor_NNN.tif``,
``training/lesion_annotations/tumor_NNN.xml`` (a folder or ``lesion_annotations.zip``),
``testing/images/test_NNN.tif``, ``testing/lesion_annotations/test_NNN.xml``, ``testing/reference.csv``
(col 0 the slide id, col 1 Tumor|Normal; read by position, with or without a header or a ``.tif`` suffix).

Per slide: tissue = Otsu on the HSV saturation of the level whose downsample is closest to 32; a grid of
``patch_size`` patches at ``level`` and ``stride``; a patch is kept when its tissue fraction reaches
``tissue_min``; its tumour fraction comes from the ASAP polygons (rasterised at the tissue level; lemis reads the
fraction there, not at full resolution, so the index of a 100k-pixel slide costs one thumbnail). Labels:
``patch_label: from_mask`` (the shared rule: fraction >= ``positive_fraction`` -> 1, 0 -> 0, otherwise dropped)
or ``from_slide``. At most ``max_patches`` per slide and class (train; ``max_eval_patches`` for val/test),
sampled with ``sample_seed``. The index can be cached (``index_cache``: a folder) as
``c16_L{level}_P{size}_S{stride}.csv`` keyed by the parameters and the slides' file sizes.

Training items: ``{image [3, P, P], bag_label, case}`` (no mask is read); val/test items: patches with their
pixel masks rasterised from the XML. Val = the PatchCamelyon validation slides present (``val_slides``); test =
``testing/images`` minus ``exclude_test`` (test_049, a duplicate; test_114, not exhaustively annotated).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import SegmentationDataModule
from datamodules.glas import normalise, weak_label
from datamodules.slides import Slide, SlideRegionReader, rasterise, read_asap, tissue_mask
from datamodules.streams import Stream
from lemis.errors import ConfigError, DataError
from lemis.files import atomic_path

PCAM_VAL = tuple([f"normal_{n:03d}" for n in (10, 13, 16, 17, 19, 20, 25, 30, 31, 32, 52, 56, 57, 67, 76, 79, 85, 95,
                                               98, 99, 101, 102, 105, 106, 109, 129, 132, 137, 142, 143, 148, 152)]
                 + [f"tumor_{n:03d}" for n in (1, 5, 11, 12, 13, 19, 31, 37, 43, 46, 57, 65, 69, 71, 73, 79, 80,
                                              81, 82, 85, 97, 109)])
PATCH_LABELS = ("from_mask", "from_slide")
INDEX_COLUMNS = ("slide", "x0", "y0", "tissue_frac", "tumour_frac", "label")


def read_reference(path: Path) -> dict[str, int]:
    """``reference.csv`` -> {slide id: 1 tumour / 0 normal}, by position, case-insensitive, ``.tif`` tolerated."""
    if not path.is_file():
        raise DataError(f"Camelyon16 reference table {path} not found (it gives each test slide's label).")
    labels = {}
    for row in csv.reader(path.read_text().splitlines()):
        if len(row) < 2 or row[1].strip().lower() not in ("tumor", "normal"):
            continue  # a header line
        labels[row[0].strip().removesuffix(".tif")] = int(row[1].strip().lower() == "tumor")
    if not labels:
        raise DataError(f"{path} has no 'slide,Tumor|Normal' row.")
    return labels


def slide_index(slide: Slide, polygons: dict | None, level: int, patch: int, stride: int) -> list[dict]:
    """Every grid patch of a slide at ``level`` with its tissue and tumour fractions (read at the level whose
    downsample is closest to 32). Rows: x0, y0 (level 0), tissue_frac, tumour_frac."""
    if level >= len(slide.downsamples):
        raise ConfigError(f"data.init_args.level={level}: {slide.path} has levels 0..{len(slide.downsamples) - 1}.")
    thumb_level = slide.best_level(32)
    tissue = tissue_mask(slide.thumbnail(thumb_level))
    d_thumb, d_level = slide.downsamples[thumb_level], slide.downsamples[level]
    tumour = rasterise(polygons, tissue.shape, d_thumb) if polygons else np.zeros_like(tissue)
    width, height = slide.dimensions[level]
    rows = []
    for y in range(0, height - patch + 1, stride):
        for x in range(0, width - patch + 1, stride):
            x0, y0 = int(round(x * d_level)), int(round(y * d_level))
            r0, c0 = int(y0 // d_thumb), int(x0 // d_thumb)
            extent = max(int(round(patch * d_level / d_thumb)), 1)
            window = (slice(r0, r0 + extent), slice(c0, c0 + extent))
            if tissue[window].size == 0:
                continue
            rows.append({"x0": x0, "y0": y0, "tissue_frac": float(tissue[window].mean()),
                         "tumour_frac": float(tumour[window].mean())})
    return rows


class Camelyon16DataModule(SegmentationDataModule):
    """Camelyon16 patches: 2 classes (background, tumour); image-level labels for training.

    Args (beyond SegmentationDataModule's): level (1, ~0.5 um/px), patch_size (256), stride (256), tissue_min
        (0.5), patch_label (``from_mask`` | ``from_slide``), positive_fraction (0.05), max_patches (200 a slide
        and class for training), max_eval_patches (50 for val/test), sample_seed (0), reader (``tifffile`` |
        ``openslide``), index_cache (a folder for the patch index, or null), val_slides (PatchCamelyon's 54),
        exclude_test (test_049, test_114).
    """

    class_names = ("tumour",)
    train_list = "training/"

    def __init__(self, root: str, num_classes: int = 2, level: int = 1, stride: int = 256, tissue_min: float = 0.5,
                 patch_label: str = "from_mask", positive_fraction: float = 0.05, max_patches: int = 200,
                 max_eval_patches: int = 50, sample_seed: int = 0, reader: str = "tifffile",
                 index_cache: str | None = None, val_slides: tuple[str, ...] = PCAM_VAL,
                 exclude_test: tuple[str, ...] = ("test_049", "test_114"), **kwargs):
        kwargs.setdefault("patch_size", (256, 256))
        kwargs.setdefault("batch_size", 16)
        kwargs.setdefault("cache", False)  # patches are many and cheap to re-read by region
        super().__init__(root=root, num_classes=num_classes, **kwargs)
        if patch_label not in PATCH_LABELS:
            raise ConfigError(f"data.init_args.patch_label must be one of {PATCH_LABELS}, got {patch_label!r}.")
        if len(set(self.patch_size)) != 1:
            raise ConfigError(f"data.init_args.patch_size must be square, got {list(self.patch_size)}.")
        self.level, self.stride, self.tissue_min = level, stride, tissue_min
        self.patch_label, self.positive_fraction = patch_label, positive_fraction
        self.max_patches, self.max_eval_patches, self.sample_seed = max_patches, max_eval_patches, sample_seed
        self.reader = SlideRegionReader(reader)
        self.index_cache = Path(index_cache) if index_cache else None
        self.val_slides, self.exclude_test = tuple(val_slides), tuple(exclude_test)
        self.patches: dict[str, dict] = {}
        self._slides: dict[str, dict] | None = None

    # ---- slides -------------------------------------------------------------------------------------------
    @property
    def slides(self) -> dict[str, dict]:
        """{slide id: {"path", "xml" (text source or None), "label", "split"}} of every slide present."""
        if self._slides is not None:
            return self._slides
        found = {}
        training, testing = self.root / "training", self.root / "testing"
        for kind, label in (("normal", 0), ("tumor", 1)):
            for path in sorted((training / kind).glob("*.tif")):
                split = "val" if path.stem in self.val_slides else "train"
                found[path.stem] = {"path": path, "label": label, "split": split,
                                    "xml": self._xml(training / "lesion_annotations", path.stem) if label else None}
        if (testing / "images").is_dir():
            reference = read_reference(testing / "reference.csv")
            for path in sorted((testing / "images").glob("*.tif")):
                if path.stem in self.exclude_test:
                    continue
                if path.stem not in reference:
                    raise DataError(f"{testing / 'reference.csv'} has no row for {path.stem}.")
                label = reference[path.stem]
                found[path.stem] = {"path": path, "label": label, "split": "test",
                                    "xml": self._xml(testing / "lesion_annotations", path.stem) if label else None}
        if not any(s["split"] == "train" for s in found.values()):
            raise DataError(f"no Camelyon16 training slide under {training} (expected normal/*.tif, tumor/*.tif).")
        missing = [k for k, s in found.items() if s["label"] and s["xml"] is None]
        if missing:
            raise DataError(f"tumour slide {missing[0]} has no lesion annotation XML under {self.root} "
                            f"({len(missing)} slides).")
        self._slides = found
        return found

    def _xml(self, folder: Path, slide: str) -> Path | None:
        """The slide's annotation file: in the folder, or extracted from ``lesion_annotations.zip`` beside it
        into the index cache (or the folder's parent) once."""
        if (folder / f"{slide}.xml").is_file():
            return folder / f"{slide}.xml"
        archive = folder.with_suffix(".zip")
        if not archive.is_file():
            return None
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if Path(n).name == f"{slide}.xml"]
            if not names:
                return None
            target = (self.index_cache or folder.parent / ".lemis") / "annotations" / f"{slide}.xml"
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    tmp.write_bytes(z.read(names[0]))
            return target

    # ---- the patch index ----------------------------------------------------------------------------------
    def _index_key(self) -> str:
        params = {"level": self.level, "patch": self.patch_size[0], "stride": self.stride,
                  "slides": {k: s["path"].stat().st_size for k, s in sorted(self.slides.items())}}
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]

    def index(self) -> list[dict]:
        """Every kept-or-not grid patch of every slide (rows of INDEX_COLUMNS before labelling), from the cache
        when its key matches."""
        name = f"c16_L{self.level}_P{self.patch_size[0]}_S{self.stride}.csv"
        key = self._index_key()
        cached = self.index_cache / name if self.index_cache else None
        if cached and cached.is_file():
            lines = cached.read_text().splitlines()
            if lines and lines[0] == f"# key={key}":
                return [{k: (v if k == "slide" else float(v)) for k, v in row.items()}
                        for row in csv.DictReader(lines[1:])]
        rows = []
        for slide_id, info in self.slides.items():
            polygons = read_asap(info["xml"]) if info["xml"] else None
            with Slide(info["path"], self.reader.backend) as slide:
                rows += [{"slide": slide_id, **r} for r in slide_index(slide, polygons, self.level,
                                                                        self.patch_size[0], self.stride)]
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=INDEX_COLUMNS[:-1])
            writer.writeheader()
            writer.writerows(rows)
            with atomic_path(cached) as tmp:
                tmp.write_text(f"# key={key}\n" + text.getvalue())
        return rows

    def _select(self) -> None:
        """Label the index (``patch_label``), drop by the tissue and fraction rules, sample per slide and class."""
        rng = np.random.default_rng(self.sample_seed)
        kept: dict[tuple[str, int], list[dict]] = {}
        for row in self.index():
            info = self.slides[row["slide"]]
            if row["tissue_frac"] < self.tissue_min:
                continue
            label = weak_label(row["tumour_frac"], self.positive_fraction) if self.patch_label == "from_mask" \
                else info["label"]
            if label is not None:
                kept.setdefault((row["slide"], label), []).append(row)
        for (slide_id, label), rows in kept.items():
            limit = self.max_patches if self.slides[slide_id]["split"] == "train" else self.max_eval_patches
            chosen = rng.permutation(len(rows))[:limit]
            for i in sorted(chosen):
                row = rows[i]
                case = f"{slide_id}@{int(row['x0'])}_{int(row['y0'])}"
                self.patches[case] = {"slide": slide_id, "x0": int(row["x0"]), "y0": int(row["y0"]), "label": label}
        counts = {s: sum(1 for p in self.patches.values() if self.slides[p["slide"]]["split"] == s)
                  for s in ("train", "val", "test")}
        rank_zero_info(f"lemis: Camelyon16 patches {counts} from {len(self.slides)} slides (level {self.level}, "
                       f"{self.patch_size[0]} px, stride {self.stride}).")

    def _split_cases(self, split: str) -> list[str]:
        if not self.patches:
            self._select()
        return [c for c, p in self.patches.items() if self.slides[p["slide"]]["split"] == split]

    # ---- what the base class asks -------------------------------------------------------------------------
    def train_units(self) -> list[tuple[str, str]]:
        return [(self.patches[c]["slide"], c) for c in self._split_cases("train")]

    def eval_cases(self, stage: str) -> list[str]:
        return self._split_cases("val" if stage == "val" else "test")

    def location(self, case: str) -> dict:
        patch = self.patches[case]
        info = self.slides[patch["slide"]]
        return {"slide": info["path"], "x0": patch["x0"], "y0": patch["y0"], "level": self.level,
                "size": self.patch_size[0], "xml": info["xml"]}

    def train_path(self, item: str) -> dict:
        return self.location(item)

    def case_path(self, case: str) -> dict:
        return self.location(case)

    def streams(self) -> list[Stream]:
        """One stream of patches with image-level labels; the mask is not read."""
        return self.image_label_stream(("image",))

    def check_items(self, stream: str, items: list[str], path_of: Callable, keys: tuple[str, ...]) -> None:
        """Each slide opened once (its patches are regions of it) and each annotation parsed once."""
        for slide_id in sorted({self.patches[i]["slide"] for i in items}):
            info = self.slides[slide_id]
            self.reader.slide(info["path"])
            if info["xml"]:
                self.reader.polygons(info["xml"])

    def train_sample(self, data: dict, item: str) -> dict:
        return {"image": normalise(torch.from_numpy(data["image"])),
                "bag_label": torch.tensor(self.patches[item]["label"]), "case": item}

    def eval_case(self, data: dict, case: str) -> dict:
        out = {"image": normalise(torch.from_numpy(data["image"])), "case": case, "spacing": None}
        if "label" in data:
            out["label"] = torch.from_numpy(data["label"].astype(np.int64))
        return out
