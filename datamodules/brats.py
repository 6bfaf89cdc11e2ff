"""BraTS brain-tumour MRI (spec/datasets.md "BraTS", spec/methods/subclass.md sec. 11).

Layouts, found per case folder anywhere under ``root`` (so ``MICCAI_BraTS2020_TrainingData/`` or its parent):
- 2017-2021: ``<case>/<case>_{t1,t1ce,t2,flair}.nii.gz`` and ``<case>_seg.nii.gz``, labels {0, 1 NCR, 2 ED,
  4 ET} (``Brats18_*``, ``BraTS20_Training_*``, ``BraTS2021_*``);
- 2013/2015 as the DeepMedic release ships it (../shared/data/BraTS2015-subset):
  ``<case>/{Flair,T1c,T1,T2}_subtrMeanDivStd.nii.gz``, ``OTMultiClass.nii.gz`` (labels 0-4: 1 necrosis, 2 edema,
  3 non-enhancing, 4 enhancing) and ``brainmask.nii.gz``. (The official 2013/2015 ``.mha`` layout needs
  SimpleITK: convert it to NIfTI first.)

Labels are stored contiguous before the range check: 4 -> 3 (ET), and for 2013/2015 3 -> 1 (non-enhancing joins
necrosis as NCR/NET, the 2017+ convention; spec lemis choice): K = 4 (background, NCR, ED, ET). ``target`` picks
a region instead, as a binary task: ``wt`` = {NCR, ED, ET}, ``tc`` = {NCR, ET}, ``et`` = {ET}.
Each modality is z-scored over the brain (the brain mask, or the voxels non-zero in any modality) and set to 0
outside it; the volume is cropped to the brain's bounding box (in 2D in-plane only: the slices stay the file's),
and written predictions are pasted back at full size. Cases without labels (the official validation data) go
in ``unlabeled_root``; a case of ``root`` without its label file is an error naming the file.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from datamodules.readers import H5Reader, NiftiReader
from datamodules.volumes import VolumeDataModule
from lemis.errors import ConfigError, DataError

MODALITIES = ("t1", "t1ce", "t2", "flair")  # lemis default order (spec subclass.md sec. 11)
DEEPMEDIC_NAMES = {"flair": "Flair", "t1ce": "T1c", "t1": "T1", "t2": "T2"}
REMAP = {"2017": {0: 0, 1: 1, 2: 2, 4: 3}, "2015": {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}}
REGIONS = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}  # of the remapped labels
TARGETS = ("classes", *REGIONS)
CACHE_MARKER = "brats_cache.json"  # written last by ``python -m datamodules.prepare brats``


def _has_label(path: Path) -> bool:
    with h5py.File(path) as f:
        return "label" in f


def find_cases(root: Path) -> dict[str, dict]:
    """{case: {"layout": "2017" | "2015", "folder": path}} of every case folder under ``root``, sorted by id."""
    cases = {}
    if not root.is_dir():
        return cases
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        names = {p.name for p in folder.iterdir()}
        if any(f"{folder.name}_{m}.nii.gz" in names for m in MODALITIES):
            cases[folder.name] = {"layout": "2017", "folder": folder}
        elif any(f"{n}_subtrMeanDivStd.nii.gz" in names for n in DEEPMEDIC_NAMES.values()):
            cases[folder.name] = {"layout": "2015", "folder": folder}
    return dict(sorted(cases.items()))


def modality_file(case: str, found: dict, modality: str) -> Path:
    folder = found["folder"]
    if found["layout"] == "2017":
        return folder / f"{case}_{modality}.nii.gz"
    return folder / f"{DEEPMEDIC_NAMES[modality]}_subtrMeanDivStd.nii.gz"


def label_file(case: str, found: dict) -> Path:
    return found["folder"] / (f"{case}_seg.nii.gz" if found["layout"] == "2017" else "OTMultiClass.nii.gz")


def case_location(case: str, found: dict, modalities: tuple[str, ...], labeled: bool) -> dict:
    """The NiftiReader location of a case: its modality files in ``modalities`` order, its label (and for
    2013/2015 its brain mask); a missing file is an error naming it."""
    images = [modality_file(case, found, m) for m in modalities]
    label = label_file(case, found)
    extra = {"mask": found["folder"] / "brainmask.nii.gz"} if found["layout"] == "2015" else {}
    for path in images + list(extra.values()) + ([label] if labeled else []):
        if not path.is_file():
            hint = "set data.init_args.modalities" if path in images else \
                "put unlabeled cases in data.init_args.unlabeled_root" if path == label else "the case is incomplete"
            raise DataError(f"{path} not found ({hint}).")
    return {"image": images, **({"label": label} if labeled else {}), **extra}


def remap_labels(label: np.ndarray, layout: str, path) -> np.ndarray:
    """Raw BraTS labels -> 0 background, 1 NCR(/NET), 2 ED, 3 ET; a value outside the layout's set is an error."""
    values = np.rint(label).astype(np.int64)
    table = REMAP[layout]
    bad = sorted(int(v) for v in np.unique(values) if int(v) not in table)
    if bad:
        raise DataError(f"{path} has label values {bad}; BraTS {layout} labels are {sorted(table)}.")
    lookup = np.zeros(max(table) + 1, dtype=np.uint8)
    for raw, new in table.items():
        lookup[raw] = new
    return lookup[values]


def brain_box(mask: np.ndarray, axes: int = 3) -> tuple[slice, ...]:
    """The inclusive bounding box of a mask in its first ``axes`` axes (the others whole)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    where = np.nonzero(mask)
    box = [slice(int(w.min()), int(w.max()) + 1) for w in where[:axes]]
    return tuple(box + [slice(0, n) for n in mask.shape[axes:]])


def zscore_in_brain(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """image [C, *S]: each channel minus its mean over ``brain``, over its std there; 0 outside the brain."""
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        inside = image[c][brain].astype(np.float64)
        if inside.size:
            out[c][brain] = (inside - inside.mean()) / max(float(inside.std()), 1e-8)
    return out


def prepare_case(data: dict, location: dict, reader, box_axes: int = 3) -> dict:
    """A read case, normalised: labels remapped to the classes, each modality z-scored in the brain (the brain
    mask, or the voxels non-zero in any modality) and 0 outside, then (``box_axes`` > 0) cropped to the brain's
    box in its first ``box_axes`` axes; ``attrs["crop"]`` = (offset, full shape)."""
    image = data["image"]
    layout = "2015" if "mask" in location else "2017"
    brain = reader.read({"mask": location["mask"]}, ("mask",))["mask"] > 0.5 if layout == "2015" else \
        (image != 0).any(0)
    out = {**data, "image": zscore_in_brain(image, brain)}
    if "label" in data:
        out["label"] = remap_labels(data["label"], layout, location["label"])
    if box_axes:
        box = brain_box(brain, axes=box_axes)
        out["image"] = out["image"][(slice(None), *box)]
        if "label" in out:
            out["label"] = out["label"][box]
        out["attrs"] = {**data["attrs"], "crop": ([s.start for s in box], list(brain.shape))}
    return out


class BraTSDataModule(VolumeDataModule):
    """BraTS 2013/2015 (DeepMedic NIfTI) and 2017-2021 case folders (module docstring).

    Args (beyond SegmentationDataModule's; ``val_list``/``test_list``/``present`` are not used):
        modalities: channels in this order (e.g. ``[flair]`` for CLISC; ../shared/data/BraTS2015-subset has
            only ``flair`` and ``t1ce``).
        target: ``classes`` (K = 4: NCR, ED, ET) or a region ``wt``/``tc``/``et`` (K = 2).
        num_classes: unset: what ``target`` implies (a given K must equal it).
        val_cases: the last N cases (by id) validate; 0 validates on the training cases themselves (in-sample,
            said in the log: for a dataset of one case).
        unlabeled_root: a folder of cases without labels (e.g. the official validation data), the unlabeled pool.
        crop_to_brain: crop every volume to the brain's bounding box.
        dim: 3 (patches) or 2 (axial slices), see ``datamodules.volumes``.
    """

    reader = NiftiReader()
    train_list = "case folders"

    def __init__(self, root: str, modalities: tuple[str, ...] = MODALITIES, target: str = "classes",
                 num_classes: int | None = None, labeled: int | float | None = None, val_cases: int = 1,
                 unlabeled_root: str | None = None, crop_to_brain: bool = True, dim: int = 3, **kwargs):
        k = 4 if target == "classes" else 2
        if target not in TARGETS:
            raise ConfigError(f"data.init_args.target must be one of {TARGETS}, got {target!r}.")
        if num_classes is not None and num_classes != k:
            raise ConfigError(f"data.init_args.num_classes={num_classes} but target {target!r} has {k} classes.")
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ConfigError(f"data.init_args.modalities={list(modalities)}: each must be one of {MODALITIES}.")
        super().__init__(root=root, num_classes=k, labeled=labeled, dim=dim, **kwargs)
        self.modalities, self.target, self.val_cases = tuple(modalities), target, val_cases
        self.unlabeled_root, self.crop_to_brain = unlabeled_root, crop_to_brain
        self.class_names = ("NCR", "ED", "ET") if target == "classes" else (target.upper(),)
        self._found: dict | None = None
        if self.cached:
            self.reader = H5Reader()

    # ---- cases --------------------------------------------------------------------------------------------
    @property
    def found(self) -> dict[str, dict]:
        """Every case by id: labeled ones under ``root``, unlabeled ones under ``unlabeled_root``."""
        if self._found is None and self.cached:
            self._found = {p.stem: {"layout": "cache", "folder": p, "labeled": _has_label(p)}
                           for p in sorted(self.root.glob("*.h5"))}
        if self._found is None:
            labeled = find_cases(self.root)
            if not labeled:
                raise DataError(f"no BraTS case folder under {self.root} (expected <case>/<case>_flair.nii.gz "
                                f"or <case>/Flair_subtrMeanDivStd.nii.gz).")
            unlabeled = find_cases(Path(self.unlabeled_root)) if self.unlabeled_root else {}
            if self.unlabeled_root and not unlabeled:
                raise DataError(f"no BraTS case folder under {self.unlabeled_root} (data.init_args.unlabeled_root).")
            clash = sorted(set(labeled) & set(unlabeled))
            if clash:
                raise DataError(f"case {clash[0]} is both under {self.root} and under {self.unlabeled_root}.")
            self._found = {**{c: {**f, "labeled": True} for c, f in labeled.items()},
                           **{c: {**f, "labeled": False} for c, f in unlabeled.items()}}
        return self._found

    @property
    def cached(self) -> bool:
        """Whether ``root`` is a cache written by ``python -m datamodules.prepare brats``."""
        return (self.root / CACHE_MARKER).is_file()

    def location(self, case: str):
        found = self.found[case]
        if found["layout"] == "cache":
            return found["folder"]
        return case_location(case, found, self.modalities, found["labeled"])

    def _split_cases(self) -> tuple[list[str], list[str]]:
        cases = [c for c, f in self.found.items() if f["labeled"]]
        if self.val_cases < 0 or 0 < len(cases) <= self.val_cases:
            raise ConfigError(f"data.init_args.val_cases={self.val_cases} must leave training cases ({len(cases)} "
                              f"labeled cases under {self.root}).")
        if self.val_cases == 0:
            return cases, cases
        return cases[:-self.val_cases], cases[-self.val_cases:]

    def split(self) -> tuple[list[str], list[str], list[str]]:
        train, _ = self._split_cases()
        groups = train if self.labeled is None else super().split()[0]
        chosen = set(groups)
        pool = [c for c in train if c not in chosen] + [c for c, f in self.found.items() if not f["labeled"]]
        return groups, self._items([c for c in train if c in chosen]), self._items(pool)

    def _items(self, cases: list[str]) -> list[str]:
        if self.dim == 3 or not self.cached:
            return self.volume_items(cases, lambda case: self.location(case)["image"])
        depth = {}
        for case in cases:
            with h5py.File(self.location(case)) as f:
                depth[case] = f["image"].shape[-1]
        return [f"{case}/{z}" for case in cases for z in range(depth[case])]

    def train_units(self) -> list[tuple[str, str]]:
        return [(case, case) for case in self._split_cases()[0]]

    def train_path(self, item: str) -> dict:
        return self.location(item.split("/")[0])

    case_path = train_path

    def eval_cases(self, stage: str) -> list[str]:
        """val and test: the held-out cases (``val_cases``); predict: the unlabeled cases, else the held-out."""
        train, held_out = self._split_cases()
        if stage == "predict":
            return [c for c, f in self.found.items() if not f["labeled"]] or held_out
        if self.val_cases == 0:
            rank_zero_info("lemis: data.init_args.val_cases=0: evaluating on the training cases (in-sample).")
        return held_out

    # ---- reading ----------------------------------------------------------------------------------------------
    def targets(self, stream: str, data: dict, location) -> dict:
        """Labels remapped (and reduced to ``target``), the image z-scored in the brain and cropped to it (a
        cache of ``prepare brats`` holds both done: its modalities are picked)."""
        if self.cached:
            out = self._from_cache(data, location)
        else:
            out = prepare_case(data, location, self.reader, (3 if self.dim == 3 else 2) if self.crop_to_brain else 0)
        if "label" in out and self.target != "classes":
            out["label"] = np.isin(out["label"], REGIONS[self.target]).astype(np.uint8)
        return out

    def _from_cache(self, data: dict, path) -> dict:
        attrs = data["attrs"]
        have = [m.decode() if isinstance(m, bytes) else str(m) for m in attrs["modalities"]]
        missing = [m for m in self.modalities if m not in have]
        if missing:
            raise DataError(f"{path} caches the modalities {have}, not {missing[0]!r} (data.init_args.modalities).")
        image = data["image"][[have.index(m) for m in self.modalities]]
        crop = ([int(o) for o in attrs["crop"]], [int(n) for n in attrs["full_shape"]])
        return {**data, "image": image, "attrs": {"affine": attrs["affine"], "spacing": tuple(attrs["spacing"]),
                                                  "crop": crop}}
