"""Losses and schedules shared by the methods.

Definitions follow `spec/methods/mean_teacher.md` sec. 4 (SSL4MIS / UA-MT code):
the Dice loss is batch-level (sums over the whole batch and every voxel, not per image) with
smooth 1e-5 on numerator and denominator, and squared probabilities in the denominator.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5


def dice_loss(probs: torch.Tensor, label: torch.Tensor, include_background: bool = True,
              ignore_index: int | None = None) -> torch.Tensor:
    """SSL4MIS Dice loss.

    probs: [B, K, *S] softmax probabilities; label: [B, *S] long class indices.
    d_k = 1 - (2 sum(p_k g_k) + eps) / (sum(p_k^2) + sum(g_k^2) + eps), averaged over the classes used
    (all K, or 1..K-1 when ``include_background`` is False: UA-MT's Dice_fg for K = 2). Voxels labeled
    ``ignore_index`` (nnU-Net's ignore label) are left out of every sum.
    """
    valid = None
    if ignore_index is not None:
        valid = (label != ignore_index).unsqueeze(1).to(probs.dtype)
        label = torch.where(label == ignore_index, torch.zeros_like(label), label)
    onehot = F.one_hot(label, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    if valid is not None:
        probs, onehot = probs * valid, onehot * valid
    dims = [0] + list(range(2, probs.ndim))
    intersect = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    per_class = 1 - (2 * intersect + DICE_SMOOTH) / (denom + DICE_SMOOTH)
    return per_class.mean() if include_background else per_class[1:].mean()


def supervised_loss(logits: torch.Tensor, label: torch.Tensor, include_background: bool = True,
                    ignore_index: int | None = None) -> torch.Tensor:
    """0.5 * (CE + Dice) of logits [B, K, *S] against label [B, *S] (both codes' supervised term); voxels labeled
    ``ignore_index`` count in neither term (CE is then the mean over the other voxels)."""
    ce = F.cross_entropy(logits, label) if ignore_index is None else \
        F.cross_entropy(logits, label, ignore_index=ignore_index)
    dice = dice_loss(torch.softmax(logits, dim=1), label, include_background, ignore_index)
    return 0.5 * (ce + dice)


def softmax_mse(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over every element (batch, classes, voxels) of (p - q)^2: Mean Teacher's consistency (step 4)."""
    return F.mse_loss(student_probs, teacher_probs)


def sigmoid_rampup(epoch: float, length: float) -> float:
    """exp(-5 (1 - clip(epoch, 0, length)/length)^2); 1 when length == 0 (Laine & Aila, as in both codes)."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def consistency_weight(step: int, weight: float, rampup: float, epoch_len: int, gate_steps: int = 0) -> float:
    """w(t) = c * sigmoid_rampup(t // epoch_len, R), and 0 while t < gate_steps (SSL4MIS's 1000-step gate).

    The ramp's "epoch" is always ``t // epoch_len`` (150 in both codes), never a data-loader epoch.
    """
    if step < gate_steps:
        return 0.0
    return weight * sigmoid_rampup(step // epoch_len, rampup)


def ema_alpha(step: int, decay: float) -> float:
    """alpha_t = min(1 - 1/(t + 1), decay): alpha_0 = 0, so the teacher equals the student after step 0."""
    return min(1.0 - 1.0 / (step + 1), decay)
