"""CLISC: unsupervised whole-tumour segmentation (Ma et al., ISBI 2025, arXiv 2501.16246; spec/methods/clisc.md;
the authors' code ``HiLab-git/CLISC``). No stage reads a label.

This file holds the label-free rules of the stages as functions on arrays (volumes (D, H, W) = (z, y, x)), each
checked by the spec's hand examples: stage 0's offline slice labeller, certainty and majority vote; stage 1's
binarised-CAM clean-up; stage 2's box prompts, the LiteMedSAM 256 frame and histogram equalisation; stage 3's
largest component and the S3F keep rule. The stage runner, the CAM classifier, LiteMedSAM and the 3D UNet
follow (issue "CLISC").
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

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

    lo, hi = float(image.min()), float(image.max())
    scaled = np.zeros(image.shape, np.uint8) if hi == lo else np.round(255 * (image - lo) / (hi - lo)).astype(np.uint8)
    return cv2.equalizeHist(scaled)


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
