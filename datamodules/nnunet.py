"""Your own data: a folder in the nnU-Net v2 raw layout or the Medical Segmentation Decathlon (MSD) layout.

nnU-Net v2 (``Dataset001_Name/``): ``dataset.json`` with ``channel_names`` ({"0": "T2", ...}), ``labels``
(name -> int, background 0, consecutive) and ``file_ending`` (".nii.gz"); ``imagesTr/{case}_{CCCC}{ending}`` one
file per channel, ``labelsTr/{case}{ending}``, optional ``imagesTs/`` (and ``labelsTs/`` for ``lemis test``).
MSD (``Task02_Heart/``): ``dataset.json`` with ``modality`` ({"0": "MRI"}), ``labels`` (int -> name) and
``training`` ([{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]); one (4D when several
channels) file per case; macOS ``._*`` files are skipped. The layout is told apart by ``channel_names``.

Unlabeled scans go in ``imagesUnlabeled/`` (named as in ``imagesTr``). Not "cases of imagesTr without a label":
nnU-Net's own integrity check refuses those, so the folder would stop being a valid nnU-Net dataset, and a
label file that went missing by mistake would silently turn its case into unlabeled data. The ``labeled``
budget draws from the labeled cases (sorted by id, as nnU-Net orders them); the labels of the cases it leaves
out are never read (they join the unlabeled stream, images only).

Training and evaluation tensors, 2D or 3D: ``datamodules.volumes``.

Normalisation per channel as nnU-Net's defaults for ``channel_names``: ``CT``: clip to the 0.5 / 99.5
percentiles of the foreground voxels of the labeled training cases, minus their mean, over their std;
``noNorm``: none; ``rescale_to_0_1``: per-image min-max; ``rgb_to_0_1``: / 255; anything else: per-image
z-score. A label named ``ignore`` (nnU-Net's, the highest value) is left out of the loss and the metrics;
it is not a class (K counts the others). No resampling: the net sees the voxel grid of the files; the
header's spacing drives the mm metrics and the written predictions keep each input's affine.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from datamodules.readers import NiftiReader
from datamodules.volumes import VolumeDataModule
from lemis.errors import ConfigError, DataError

CT_PERCENTILES = (0.5, 99.5)


# ---- dataset.json --------------------------------------------------------------------------------------------
def read_dataset_json(root: Path) -> dict:
    """The dataset description: {"layout": "nnunet" | "msd", "channels": [names], "labels": {int: name},
    "ending": file ending, "training": [(case, image path(s), label path)] (MSD only)}; one sentence for a
    missing file, bad JSON or a missing key."""
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path} not found: an nnU-Net or MSD dataset folder has a dataset.json "
                        f"(set data.init_args.root).")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} holds no JSON object.")
    layout = "nnunet" if "channel_names" in raw else "msd"
    needed = ("channel_names", "labels", "file_ending") if layout == "nnunet" else ("modality", "labels", "training")
    missing = [key for key in needed if key not in raw]
    if missing:
        raise DataError(f"{path} has no {missing[0]!r} key (an {'nnU-Net v2' if layout == 'nnunet' else 'MSD'} "
                        f"dataset.json needs {', '.join(needed)}).")
    channels = raw["channel_names"] if layout == "nnunet" else raw["modality"]
    labels = _labels(raw["labels"], layout, path)
    out = {"layout": layout, "labels": labels, "path": path,
           "channels": [str(channels[k]) for k in sorted(channels, key=int)],
           "ending": raw.get("file_ending", ".nii.gz")}
    if layout == "msd":
        out["training"] = [_msd_entry(root, entry, path) for entry in raw["training"]
                           if not Path(str(entry.get("image", ""))).name.startswith("._")]
    return out


def _labels(labels: dict, layout: str, path: Path) -> dict[int, str]:
    """{value: name}, checked: integer values (no nnU-Net region lists), background 0, consecutive."""
    try:
        pairs = {int(v): str(k) for k, v in labels.items()} if layout == "nnunet" else \
            {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' must map names to integer values (region-based labels are not "
                        f"supported).") from None
    if sorted(pairs) != list(range(len(pairs))):
        raise DataError(f"{path}: 'labels' values {sorted(pairs)} must be 0, 1, ..., K-1 (background 0).")
    if "ignore" in [pairs[v] for v in sorted(pairs)][:-1]:
        raise DataError(f"{path}: the 'ignore' label must have the highest value, as nnU-Net requires.")
    return pairs


def _msd_entry(root: Path, entry: dict, path: Path) -> tuple[str, Path, Path]:
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise DataError(f"{path}: every 'training' entry needs 'image' and 'label', got {entry!r}.")
    image = root / entry["image"]
    return case_of(image.name), image, root / entry["label"]


def case_of(file_name: str) -> str:
    """la_003.nii.gz -> la_003 (any NIfTI ending)."""
    return re.sub(r"\.nii(\.gz)?$", "", file_name)


def channel_files(folder: Path, ending: str, n_channels: int) -> dict[str, list[Path]]:
    """{case: [channel 0 file, ...]} of a folder in nnU-Net naming (``{case}_{CCCC}{ending}``); a single-channel
    dataset also takes plain ``{case}{ending}`` files (a folder of scans to predict). A case without every
    channel is an error naming the missing file."""
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(("._", ".")) or not path.name.endswith(ending):
            continue
        match = pattern.match(path.name)
        if match:
            found.setdefault(match.group(1), {})[int(match.group(2))] = path
        elif n_channels == 1:
            found.setdefault(path.name[: -len(ending)], {})[0] = path
    cases = {}
    for case, files in found.items():
        for c in range(n_channels):
            if c not in files:
                raise DataError(f"{folder / f'{case}_{c:04d}{ending}'} is missing: case {case} needs "
                                f"{n_channels} channel files (dataset.json channel_names).")
        extra = sorted(set(files) - set(range(n_channels)))
        if extra:
            raise DataError(f"{files[extra[0]]} is channel {extra[0]}, but dataset.json names only {n_channels} "
                            f"channels.")
        cases[case] = [files[c] for c in range(n_channels)]
    return cases


# ---- normalisation -----------------------------------------------------------------------------------------
def normalise(image: np.ndarray, schemes: list[str], ct_stats: dict[int, tuple] | None = None) -> np.ndarray:
    """image [C, *S] -> float32, channel c normalised by ``schemes[c]`` (see the module docstring)."""
    out = np.empty(image.shape, dtype=np.float32)
    for c, scheme in enumerate(schemes):
        x = image[c].astype(np.float32)
        if scheme == "CT":
            low, high, mean, std = ct_stats[c]
            x = (np.clip(x, low, high) - mean) / max(std, 1e-8)
        elif scheme == "rescale_to_0_1":
            x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
        elif scheme == "rgb_to_0_1":
            x = x / 255.0
        elif scheme != "noNorm":
            x = (x - x.mean()) / max(float(x.std()), 1e-8)
        out[c] = x
    return out


class NnUNetDataModule(VolumeDataModule):
    """A folder in the nnU-Net v2 raw or MSD layout (module docstring).

    Args (beyond SegmentationDataModule's; ``val_list``/``test_list``/``present`` are not used):
        num_classes: K; unset: the number of ``labels`` in dataset.json (a given K must equal it).
        dim: 3 (patches, sliding window) or 2 (axial slices).
        val_cases: the last N labeled cases (by sorted id) are held out of training for validation.
        predict_folder: the scans ``lemis predict`` reads (relative to ``root`` or absolute): nnU-Net naming or,
            for one channel, plain ``{case}.nii.gz`` files; unset: ``imagesTs``.
    """

    reader = NiftiReader()
    train_list = "imagesTr"

    def __init__(self, root: str, num_classes: int | None = None, labeled: int | float | None = None,
                 dim: int = 3, val_cases: int = 1, predict_folder: str | None = None, **kwargs):
        super().__init__(root=root, num_classes=num_classes or 0, labeled=labeled, dim=dim, **kwargs)
        self.given_classes, self.val_cases = num_classes, val_cases
        self.predict_folder = predict_folder
        self._info: dict | None = None
        self._ct_stats: dict[int, tuple] = {}

    # ---- the dataset description ------------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        """dataset.json, read once; K and the class names follow from its labels."""
        if self._info is None:
            info = read_dataset_json(self.root)
            k = len(info["labels"])
            if info["labels"][k - 1] == "ignore":  # nnU-Net's ignore label: in no loss, no metric, no class
                k -= 1
                self.ignore_index = k
            if self.given_classes is not None and self.given_classes != k:
                raise ConfigError(f"data.init_args.num_classes={self.given_classes} but {info['path']} names {k} "
                                  f"labels (background included).")
            self.num_classes = k
            self.class_names = tuple(info["labels"][v] for v in range(1, k))
            self._info = info
        return self._info

    def setup(self, stage: str | None = None) -> None:
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist (set data.init_args.root).")
        self.info  # noqa: B018  (reads and checks dataset.json before any image)
        if "CT" in self.info["channels"] and not self._ct_stats:
            self._ct_stats = self._foreground_statistics()
        super().setup(stage)

    def _location(self, images, label: Path | None) -> dict:
        return {"image": images, **({"label": label} if label is not None else {})}

    def _folder_cases(self, folder: str) -> dict[str, dict]:
        """{case: location} of one folder of the dataset (nnU-Net naming, or MSD's one file a case)."""
        path = Path(folder) if Path(folder).is_absolute() else self.root / folder
        if not path.is_dir():
            return {}
        info = self.info
        if info["layout"] == "msd":
            return {case_of(p.name): {"image": p} for p in sorted(path.glob("*.nii*")) if not p.name.startswith(".")}
        return {case: {"image": files}
                for case, files in channel_files(path, info["ending"], len(info["channels"])).items()}

    def labeled_cases(self) -> dict[str, dict]:
        """{case: location with label} of every labeled training case, sorted by id."""
        info = self.info
        if info["layout"] == "msd":
            cases = {case: self._location(image, label) for case, image, label in info["training"]}
        else:
            cases = {}
            for case, location in self._folder_cases("imagesTr").items():
                label = self.root / "labelsTr" / f"{case}{info['ending']}"
                if not label.is_file():
                    raise DataError(f"{label} not found for {location['image'][0]}: every imagesTr case needs its "
                                    f"label; put unlabeled scans in {self.root / 'imagesUnlabeled'}.")
                cases[case] = self._location(location["image"], label)
        if not cases:
            raise DataError(f"no labeled training case in {self.root / 'imagesTr'} (dataset.json "
                            f"{'training' if info['layout'] == 'msd' else 'file_ending ' + info['ending']}).")
        return dict(sorted(cases.items()))

    def _split_cases(self) -> tuple[dict, dict]:
        """(training cases, validation cases): the last ``val_cases`` labeled cases validate."""
        cases = self.labeled_cases()
        if not 0 <= self.val_cases < len(cases):
            raise ConfigError(f"data.init_args.val_cases={self.val_cases} must leave labeled training cases "
                              f"({len(cases)} in {self.root}).")
        names = list(cases)
        cut = len(names) - self.val_cases
        return {n: cases[n] for n in names[:cut]}, {n: cases[n] for n in names[cut:]}

    @property
    def locations(self) -> dict[str, dict]:
        """Every case this DataModule can name, by id: labeled, unlabeled and prediction scans."""
        if not hasattr(self, "_locations"):
            unlabeled = self._folder_cases("imagesUnlabeled")
            labeled = self.labeled_cases()
            clash = sorted(set(unlabeled) & set(labeled))
            if clash:
                raise DataError(f"case {clash[0]} is both in imagesTr and in {self.root / 'imagesUnlabeled'}.")
            self._locations = {**labeled, **unlabeled}
        return self._locations

    # ---- what SegmentationDataModule asks ----------------------------------------------------------------------
    def split(self) -> tuple[list[str], list[str], list[str]]:
        """(labeled cases, labeled items, unlabeled items): the budget draws from the training cases; the cases
        it leaves out and ``imagesUnlabeled`` are the unlabeled pool."""
        train, _ = self._split_cases()
        if self.labeled is None:
            groups = list(train)
        else:
            groups, _, _ = super().split()
        chosen = set(groups)
        pool = [c for c in train if c not in chosen] + list(self._folder_cases("imagesUnlabeled"))
        return groups, self._items([c for c in train if c in chosen]), self._items(pool)

    def train_units(self) -> list[tuple[str, str]]:
        return [(case, case) for case in self._split_cases()[0]]

    def _items(self, cases: list[str]) -> list[str]:
        return self.volume_items(cases, lambda case: self.locations[case]["image"])

    def train_path(self, item: str) -> dict:
        return self.locations[item.split("/")[0]]

    def eval_cases(self, stage: str) -> list[str]:
        if stage == "val":
            return list(self._split_cases()[1])
        folder = self.predict_folder or "imagesTs"
        cases = self._folder_cases(folder)
        if stage == "test":
            ending = self.info["ending"]
            cases = {c: loc for c, loc in cases.items() if (self.root / "labelsTs" / f"{c}{ending}").is_file()}
            if not cases:
                raise DataError(f"no case of {self.root / folder} has a label in {self.root / 'labelsTs'} "
                                f"(lemis test scores against labels; lemis predict needs none).")
        if not cases:
            raise DataError(f"no scan to predict in {self.root / folder} (data.init_args.predict_folder).")
        self._eval_locations = cases
        return list(cases)

    def _eval_dataset(self, stage: str):
        cases = self.eval_cases(stage)
        if not cases:
            raise ConfigError("data.init_args.val_cases=0 leaves nothing to validate on: hold out >= 1 case.")
        keys = ("image",) if stage == "predict" else ("image", "label")
        return self._dataset(stage, cases, lambda case: self.case_path(case, stage), keys,
                             lambda d: self.eval_case(d, d["case"]), "data.init_args.predict_folder",
                             "check the folder")

    def case_path(self, case: str, stage: str = "val") -> dict:
        if stage == "val":
            return self.locations[case]
        location = self._eval_locations[case]
        if stage == "test":
            return self._location(location["image"], self.root / "labelsTs" / f"{case}{self.info['ending']}")
        return location

    def targets(self, stream: str, data: dict, location) -> dict:
        """The image as [C, *S] float32, normalised per channel (once per file read: the cache keeps it); the
        label checked against dataset.json's labels (a sentence naming the file and dataset.json)."""
        image = data["image"]
        if image.ndim == 3:
            image = image[None]
        channels = self.info["channels"]
        if image.shape[0] != len(channels):
            raise DataError(f"{NiftiReader().files(location)[0]} has {image.shape[0]} channels but "
                            f"{self.info['path']} names {len(channels)}.")
        data = {**data, "image": normalise(image, channels, self._ct_stats)}
        if "label" in data:
            label = np.asarray(data["label"])
            values = np.unique(label)
            bad = [int(v) for v in values if v not in self.info["labels"]]
            if bad:
                raise DataError(f"{location['label']} has label values {bad} that {self.info['path']} does not "
                                f"name (labels {sorted(self.info['labels'])}).")
            data["label"] = label.astype(np.uint8 if self.num_classes <= 256 else np.int64)
        return data

    def _foreground_statistics(self) -> dict[int, tuple]:
        """nnU-Net's CT statistics per CT channel over the labeled training cases' foreground voxels:
        (0.5th percentile, 99.5th percentile, mean, std)."""
        train, _ = self._split_cases()
        voxels: dict[int, list] = {c: [] for c, s in enumerate(self.info["channels"]) if s == "CT"}
        for location in train.values():
            data = self.reader.read(location, ("image", "label"))
            image = data["image"] if data["image"].ndim == 4 else data["image"][None]
            for c in voxels:
                voxels[c].append(image[c][data["label"] > 0].astype(np.float64))
        stats = {}
        for c, parts in voxels.items():
            values = np.concatenate(parts)
            if not values.size:
                raise DataError(f"no foreground voxel in the labeled training cases of {self.root}: CT "
                                f"normalisation needs some (dataset.json channel {c}).")
            low, high = np.percentile(values, CT_PERCENTILES)
            stats[c] = (float(low), float(high), float(values.mean()), float(values.std()))
        rank_zero_info(f"lemis: CT normalisation (clip, mean, std) per channel: {stats}.")
        return stats
