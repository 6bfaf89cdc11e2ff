"""Severity labels for SEMISE (spec/methods/semise.md secs. 2-3): ACDC's pathology groups, the left-ventricular
ejection fraction from the ED and ES label volumes, its ordinal grade, and the rule choosing the graded patients.

EF = (EDV - ESV) / EDV with V = LV-cavity voxels (label 3) x voxel volume; grade 0 if EF >= 0.50 (preserved),
1 if 0.40 <= EF < 0.50 (mildly reduced), 2 if EF < 0.40 (reduced). ACDC's training patients come in blocks of 20:
001-020 DCM, 021-040 HCM, 041-060 MINF, 061-080 NOR, 081-100 RV; healthy = NOR.

Also: a ``case,grade[,healthy,group]`` table reader, SimCLR-style views of a grey-level slice, and
``ACDCSeverityDataModule`` (streams ``unlabeled`` + ``graded`` for pre-training, ``labeled`` for the classifier;
a training item of a patient outside the graded list carries -1 for every severity key).
"""
from __future__ import annotations

import csv
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from datamodules.acdc import ACDCDataModule, patient_of
from datamodules.readers import read_h5, read_list
from datamodules.streams import Stream
from datamodules.transforms import acdc_train_transform
from lemis.errors import ConfigError, DataError

GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")
LV = 3


def acdc_group(case: str) -> str:
    """patient001 -> DCM, ..., patient100 -> RV (the training set's blocks of 20)."""
    match = re.fullmatch(r"patient(\d{3})", case)
    if not match or not 1 <= int(match.group(1)) <= 100:
        raise DataError(f"{case!r} is not an ACDC training patient (patient001..patient100): its group is not "
                        f"known without its Info.cfg.")
    return GROUPS[(int(match.group(1)) - 1) // 20]


def ejection_fraction(ed_label: np.ndarray, es_label: np.ndarray, voxel_volume: float = 1.0) -> float:
    """(EDV - ESV) / EDV of the LV cavity (label 3), float64; EDV = 0 is an error."""
    edv = float(np.count_nonzero(ed_label == LV)) * voxel_volume
    esv = float(np.count_nonzero(es_label == LV)) * voxel_volume
    if edv == 0:
        raise DataError("the ED label volume has no LV cavity (label 3): its ejection fraction is undefined.")
    return (edv - esv) / edv


def ef_grade(ef: float) -> int:
    """0 if EF >= 0.50, 1 if 0.40 <= EF < 0.50, 2 below."""
    return 0 if ef >= 0.5 else 1 if ef >= 0.4 else 2


def frame_label(root: Path, patient: str, frame: str) -> np.ndarray:
    """The label volume of ``patient_frameNN`` in the SSL4MIS layout: ``data/<id>.h5``, or its slices
    ``data/slices/<id>_slice_K.h5`` stacked by K (SSL4MIS ships training patients as slices)."""
    case = f"{patient}_{frame}"
    volume = root / "data" / f"{case}.h5"
    if volume.is_file():
        return read_h5(volume, ("label",))["label"]
    slices = sorted((root / "data" / "slices").glob(f"{case}_slice_*.h5"),
                    key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not slices:
        raise DataError(f"no volume {volume} and no slice file {root / 'data' / 'slices' / (case + '_slice_*.h5')}.")
    return np.stack([read_h5(p, ("label",))["label"] for p in slices])


def acdc_ejection_fraction(root: Path, patient: str) -> float:
    """EF of an ACDC patient from ``frame01`` (ED) and ``frame02`` (ES)."""
    return ejection_fraction(frame_label(root, patient, "frame01"), frame_label(root, patient, "frame02"))


def graded_patients(root: Path, grades: dict[str, int], n: int = 7, list_name: str = "train.list") -> list[str]:
    """``ssl4mis_stratified``: walk ``train.list`` (patients, first appearance), take each patient whose group is
    not yet present, then the first NOR not yet taken, then the first grade-1 patient not yet taken (each skipped
    where the split has none: a phantom)."""
    order = list(dict.fromkeys(name.split("_")[0] for name in read_list(root / list_name)))
    chosen: list[str] = []
    for patient in order:
        if acdc_group(patient) not in {acdc_group(c) for c in chosen}:
            chosen.append(patient)
    chosen += next_not_taken(order, chosen, lambda p: acdc_group(p) == "NOR")
    chosen += next_not_taken(order, chosen, lambda p: grades.get(p) == 1)
    return chosen[:n]


def next_not_taken(order: list[str], chosen: list[str], wanted) -> list[str]:
    """The first patient of ``order`` not in ``chosen`` for which ``wanted(patient)`` holds, as a list ([] when
    there is none: a small split, a phantom)."""
    return [p for p in order if wanted(p) and p not in chosen][:1]


# ---- severity labels for a DataModule (spec sec. 2) ------------------------------------------------------------

@dataclass(frozen=True)
class Severity:
    """What a case carries: ordinal ``grade`` (0 = least severe), ``healthy`` (0/1), ``group`` (a class index);
    -1 = not known, or not visible to training (every case outside the graded list)."""

    grade: int = -1
    healthy: int = -1
    group: int = -1

    def as_tensors(self) -> dict[str, torch.Tensor]:
        return {key: torch.tensor(value) for key, value in asdict(self).items()}


UNKNOWN = Severity()


def _integer(text: str, path: Path, line: int, column: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise DataError(f"{path} line {line}: {column} {text!r} is not an integer.") from None


def read_severity_csv(path: str | Path, num_grades: int = 3) -> tuple[dict[str, Severity], tuple[str, ...]]:
    """A ``case,grade[,healthy][,group][,ef]`` table -> ({case: Severity}, the group names in class order).

    grade: an integer in 0..num_grades-1; healthy: 0/1 (absent: grade == 0); group: any name, the classes are the
    distinct names sorted (absent: -1); ef and other columns are not read. One sentence naming the file for a
    missing file or column, a duplicate case, a grade or flag that is not an integer in range."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"severity table {path} not found (data.init_args.severity_csv).")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        header = [name.strip() for name in (rows[0].keys() if rows else [])]
    missing = [column for column in ("case", "grade") if column not in header]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r} (expected a header case,grade[,healthy,group,ef]).")
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in rows]
    groups = tuple(sorted({row["group"] for row in rows if row.get("group")}))
    table: dict[str, Severity] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        case, grade = row["case"], _integer(row["grade"], path, line, "grade")
        if case in table:
            raise DataError(f"{path} line {line}: case {case!r} appears a second time.")
        if not 0 <= grade < num_grades:
            raise DataError(f"{path} line {line}: grade {grade} is outside 0..{num_grades - 1} "
                            f"(data.init_args.num_grades={num_grades}).")
        healthy = _integer(row["healthy"], path, line, "healthy") if row.get("healthy") else int(grade == 0)
        if healthy not in (0, 1):
            raise DataError(f"{path} line {line}: healthy must be 0 or 1, got {healthy}.")
        group = groups.index(row["group"]) if row.get("group") else -1
        table[case] = Severity(grade, healthy, group)
    return table, groups


def acdc_severity(root: Path, patient: str) -> Severity:
    """The ACDC rule: grade from the LV ejection fraction, healthy = NOR, group by the blocks of 20."""
    group = acdc_group(patient)
    return Severity(ef_grade(acdc_ejection_fraction(root, patient)), int(group == "NOR"), GROUPS.index(group))


def band(depth: int, low: float = 0.2, high: float = 0.8) -> list[int]:
    """Slice indices i with low * depth <= i < high * depth (the mid-ventricular band); the middle slice when the
    band is empty (a very short stack)."""
    inside = [i for i in range(depth) if low * depth <= i < high * depth]
    return inside or [depth // 2]


def balanced(items_by_case: dict[str, list[str]]) -> list[str]:
    """Every case's items repeated (cyclically) to the largest case's count, so a uniform draw over the list
    picks each case equally often, whatever its number of slices (the spec's patient cycling, on the shared
    item sampler)."""
    longest = max((len(items) for items in items_by_case.values()), default=0)
    return [items[i % len(items)] for items in items_by_case.values() if items for i in range(longest)]


# ---- two views of a slice (spec sec. 3 "Views") --------------------------------------------------------------

def _uniform(low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand(()))


def resized_crop(x: torch.Tensor, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """SimCLR's RandomResizedCrop of x [C, H, W]: area fraction ~ U(scale), aspect ratio log-uniform in ``ratio``,
    a uniform position, then resized back to (H, W) bilinearly."""
    h, w = x.shape[-2:]
    area, aspect = _uniform(*scale) * h * w, math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1])))
    ch, cw = min(h, max(1, round(math.sqrt(area / aspect)))), min(w, max(1, round(math.sqrt(area * aspect))))
    top, left = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
    crop = x[None, :, top:top + ch, left:left + cw]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x [C, H, W] with standard deviation ``sigma`` px (radius 3 sigma, reflect)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    c = x.shape[0]
    y = F.conv2d(y, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def intensity_view(x: torch.Tensor) -> torch.Tensor:
    """Grey-level stand-ins for SimCLR's colour distortion and blur, on x [C, H, W] in [0, 1]: gamma U(0.7, 1.5)
    (p 0.8); contrast (x - mean) c + mean, c ~ U(0.75, 1.25), plus brightness U(-0.1, 0.1) (p 0.8); blur sigma
    U(0.1, 1.5) (p 0.5); noise sigma U(0, 0.05) (p 0.5); clipped to [0, 1]."""
    if torch.rand(()) < 0.8:
        x = x.clamp(min=0) ** _uniform(0.7, 1.5)
    if torch.rand(()) < 0.8:
        x = (x - x.mean()) * _uniform(0.75, 1.25) + x.mean() + _uniform(-0.1, 0.1)
    if torch.rand(()) < 0.5:
        x = gaussian_blur(x, _uniform(0.1, 1.5))
    if torch.rand(()) < 0.5:
        x = x + _uniform(0.0, 0.05) * torch.randn_like(x)
    return x.clamp(0, 1)


def contrastive_view(image: np.ndarray, patch: tuple[int, int]) -> torch.Tensor:
    """One view [1, *patch] of a slice (H, W): the DataModule's SSL4MIS rot/flip or rotation and resize, a
    resized crop, then the intensity changes. Two calls give SimCLR's two independent views."""
    geometric, _ = acdc_train_transform(image, None, patch)
    x = torch.from_numpy(np.ascontiguousarray(geometric, dtype=np.float32))[None]
    return intensity_view(resized_crop(x))


# ---- the DataModule ---------------------------------------------------------------------------------------------

MODES = ("pretrain", "classify")
TARGETS = ("grade", "group")


class ACDCSeverityDataModule(ACDCDataModule):
    """ACDC for SEMISE: severity labels on a few graded patients (spec secs. 2-3).

    ``mode: pretrain``: streams ``unlabeled`` (every training slice, batch ``batch_size``) and ``graded`` (the
    band slices of the graded patients, each patient equally likely, batch ``graded_batch_size``); a sample is two
    views ``image``, ``view2`` [1, *patch_size] plus ``grade``, ``healthy``, ``group``. ``mode: classify``: one
    stream ``labeled`` of the graded patients' band slices (SSL4MIS augmentation, one view), plus ``target``.
    Only images are read for training; a slice of a patient outside the graded list carries -1 for every
    severity key, so no grade of another case reaches the model. Evaluation cases are the band slices of each
    volume of the split, ``image`` [1, n, H, W], with the case's true values (for metrics only).

    Args (beyond ACDCDataModule's): mode; severity_csv: a ``case,grade[,healthy,group]`` table (unset: the ACDC
    rule, datamodules.severity: grade from the LV ejection fraction, healthy = NOR, group by blocks of 20);
    graded_cases: the patients whose grades training sees, a list or a list file (unset: ``graded_rule``
    ``ssl4mis_stratified`` over ``train.list``, ``n_graded`` patients); severity_slice_band: [low, high) fraction
    of a frame's slices used for graded training and evaluation; graded_batch_size: B_g; target: ``grade`` or
    ``group`` (what ``classify`` trains); num_grades.
    """

    def __init__(self, root: str, mode: str = "pretrain", severity_csv: str | None = None,
                 graded_cases: list[str] | str | None = None, graded_rule: str = "ssl4mis_stratified",
                 n_graded: int = 7, severity_slice_band: tuple[float, float] = (0.2, 0.8),
                 graded_batch_size: int = 8, target: str = "grade", num_grades: int = 3, **kwargs):
        super().__init__(root=root, **kwargs)
        for name, value, allowed in (("mode", mode, MODES), ("target", target, TARGETS),
                                     ("graded_rule", graded_rule, ("ssl4mis_stratified",))):
            if value not in allowed:
                raise ConfigError(f"data.init_args.{name} must be one of {allowed}, got {value!r}.")
        low, high = severity_slice_band
        if not 0 <= low < high <= 1:
            raise ConfigError(f"data.init_args.severity_slice_band must satisfy 0 <= low < high <= 1, got "
                              f"{list(severity_slice_band)}.")
        self.mode, self.severity_csv, self.graded_cases = mode, severity_csv, graded_cases
        self.n_graded, self.band_fraction, self.graded_batch_size = n_graded, (low, high), graded_batch_size
        self.target, self.num_grades = target, num_grades
        self.graded: list[str] = []  # the patients whose severity training sees, set by streams()
        self._table: dict[str, Severity] | None = None
        self._group_names: tuple[str, ...] = GROUPS

    # ---- the severity table -------------------------------------------------------------------------------------
    @property
    def stream_names(self) -> tuple[str, ...]:
        return ("unlabeled", "graded") if self.mode == "pretrain" else ("labeled",)

    @property
    def table(self) -> dict[str, Severity]:
        """{patient: Severity}: the CSV's rows, or the ACDC rule's values computed so far."""
        if self._table is None:
            self._table = self._read_table()
        return self._table

    def severity_of(self, patient: str) -> Severity:
        """The true values of a patient (CSV or ACDC rule), for evaluation and the graded patients only."""
        if patient not in self.table:
            if self.severity_csv:
                raise DataError(f"case {patient!r} has no row in {self.severity_csv} "
                                f"(data.init_args.severity_csv).")
            self._table[patient] = acdc_severity(self.root, patient)
        return self._table[patient]

    def visible(self, item: str) -> Severity:
        """What a training item carries: its patient's severity if the patient is graded, else -1 throughout."""
        patient = patient_of(item)
        return self.severity_of(patient) if patient in self.graded else UNKNOWN

    def _read_table(self) -> dict[str, Severity]:
        """The CSV, its cases checked against the dataset's patients; {} for the ACDC rule (filled on demand)."""
        if not self.severity_csv:
            return {}
        table, self._group_names = read_severity_csv(self.severity_csv, self.num_grades)
        known = {p for p, _ in self.train_units()} | {patient_of(c) for stage in ("val", "test")
                                                       for c in read_list(self.root / self.lists[stage])}
        unknown = [case for case in table if case not in known]
        if unknown:
            raise DataError(f"{self.severity_csv} names case {unknown[0]!r}, which is not a patient of {self.root} "
                            f"({self.train_list}, {self.lists['val']}, {self.lists['test']}).")
        return table

    def num_targets(self) -> int:
        """Classes of ``target``: num_grades, or the number of groups."""
        if self.target == "grade":
            return self.num_grades
        _ = self.table  # reading the CSV sets its group names
        return len(self._group_names)

    def class_counts(self) -> list[int]:
        """Training items per ``target`` class (the classify stream; weights of a class-balanced loss)."""
        values = [getattr(self.visible(item), self.target) for item in self._streams[0].items]
        return np.bincount(values, minlength=self.num_targets()).tolist()

    # ---- the graded patients and the streams ---------------------------------------------------------------------
    def choose_graded(self, patients: list[str]) -> list[str]:
        """``graded_cases`` (a list or a list file), or the ``ssl4mis_stratified`` rule; each must be a training
        patient with a grade."""
        given = self.graded_cases
        if isinstance(given, str):
            given = read_list(Path(given))
        if given is None:  # the rule reads every training patient's grade to pick the graded ones, attaches none
            table = self.table if self.severity_csv else {p: self.severity_of(p) for p in patients}
            grades = {p: s.grade for p, s in table.items()}
            given = graded_patients(self.root, grades, self.n_graded, self.train_list_of_volumes())
        outside = [p for p in given if p not in patients]
        if outside:
            raise DataError(f"graded case {outside[0]!r} is not a training patient of {self.root / self.train_list} "
                            f"(data.init_args.graded_cases).")
        for patient in given:
            self.severity_of(patient)  # a graded case without a row in the CSV fails here
        return list(given)

    def train_list_of_volumes(self) -> str:
        """``train.list`` (the rule's patient order) when present, else the slice list."""
        return "train.list" if (self.root / "train.list").is_file() else self.train_list

    def in_band(self, item: str, depths: dict[str, int]) -> bool:
        """Whether slice ``<patient>_<frame>_slice_K`` (K from 1) lies in its frame's band."""
        frame, k = item.rsplit("_slice_", 1)
        return int(k) - 1 in band(depths[frame], *self.band_fraction)

    def streams(self) -> list[Stream]:
        units = self.train_units()
        patients = list(dict.fromkeys(p for p, _ in units))
        self.graded = self.choose_graded(patients)
        self.labeled_groups = self.graded
        depths = Counter(item.rsplit("_slice_", 1)[0] for _, item in units)
        by_patient = {p: [] for p in self.graded}
        for patient, item in units:
            if patient in by_patient and self.in_band(item, depths):
                by_patient[patient].append(item)
        rank_zero_info(f"lemis: SEMISE {len(units)} training slices, graded patients {self.graded} "
                       f"({sum(map(len, by_patient.values()))} band slices).")
        if self.mode == "classify":
            items = [item for items in by_patient.values() for item in items]
            return [Stream("labeled", items, ("image",), self.batch_size, drop_last=False)]
        return [Stream("unlabeled", [item for _, item in units], ("image",), self.batch_size),
                Stream("graded", balanced(by_patient), ("image",), self.graded_batch_size)]

    # ---- samples ------------------------------------------------------------------------------------------------
    def train_sample(self, data: dict, item: str) -> dict:
        """pretrain: {image, view2 [1, *P], case, grade, healthy, group}; classify: {image [1, *P], case, grade,
        healthy, group, target}. The severity keys are -1 unless the item's patient is graded."""
        severity = self.visible(item).as_tensors()
        if self.mode == "pretrain":
            return {"image": contrastive_view(data["image"], self.patch_size),
                    "view2": contrastive_view(data["image"], self.patch_size), "case": item, **severity}
        sample = super().train_sample({"image": data["image"]}, item)
        return {**sample, **severity, "target": severity[self.target]}

    def eval_case(self, data: dict, case: str) -> dict:
        """The case's band slices, image [1, n, H, W] and label [n, H, W], with its true severity and target."""
        keep = band(data["image"].shape[0], *self.band_fraction)
        data = {**data, "image": data["image"][keep], **({"label": data["label"][keep]} if "label" in data else {})}
        out = super().eval_case(data, case)
        severity = self.severity_of(patient_of(case))
        return {**out, **asdict(severity), "target": getattr(severity, self.target), "patient": patient_of(case)}
