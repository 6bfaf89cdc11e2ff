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


# ---- MIL / distillation (spec/methods/ikd_mil.md secs. 2-3) -------------------------------------------------------

def image_dice_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """D(o, t) = 1 - (2 sum o t + 1) / (sum o + sum t + 1 + 1e-7) per image, sums over its pixels (IKD-MIL's Dice,
    smooth 1). output, target: [B, 1, H, W] (target may be soft: the teacher's map) -> [B]."""
    dims = tuple(range(1, output.ndim))
    return 1 - (2 * (output * target).sum(dims) + 1) / (output.sum(dims) + target.sum(dims) + 1 + 1e-7)


def mil_dice_loss(outputs, bag_label: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1 (target None): sum over images and outputs k of D(s_k, 1) for positive bags, D(1 - s_k, 1) for
    negative ones (a smooth mean-pooling MIL loss); stage 2: positive bags against the teacher's map target
    instead of 1. outputs: the net's (s1, s2, s3, f), each [B, 1, H, W]; bag_label [B] in {0, 1}."""
    positive = bag_label.bool()
    total = outputs[0].new_zeros(())
    for s in outputs:
        ones = torch.ones_like(s)
        pos = image_dice_loss(s, ones if target is None else target)
        neg = image_dice_loss(1 - s, ones)
        total = total + torch.where(positive, pos, neg).sum()
    return total


def oeem_weights(pixel_loss: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """OEEM's per-pixel weights w_p = |P_i| softmax_{p in P_i}(-l_p) within each image (mean 1: easy pixels above 1),
    and 1 over an image whose pseudo label has a single value. pixel_loss, pseudo: [B, 1, H, W] (loss detached
    here) -> [B, 1, H, W]."""
    flat = pixel_loss.detach().flatten(1)
    n = flat.shape[1]
    weights = n * torch.softmax(-flat, dim=1)
    labels = pseudo.flatten(1)
    single = (labels == labels[:, :1]).all(1, keepdim=True)
    return torch.where(single, torch.ones_like(weights), weights).view_as(pixel_loss)


def bce_map(prob: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """l_p = -y log f - (1 - y) log(1 - f), f clamped to [1e-6, 1 - 1e-6]; prob, pseudo [B, 1, H, W]."""
    f = prob.clamp(1e-6, 1 - 1e-6)
    return -(pseudo * f.log() + (1 - pseudo) * (1 - f).log())


def prob_logit_ce_map(prob: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """The IKD-MIL code's CE (quirk Q2): cross-entropy with the probabilities [1 - f, f] taken as logits, i.e.
    softplus(2f - 1) where y = 0 and softplus(1 - 2f) where y = 1."""
    return F.softplus((1 - 2 * pseudo) * (2 * prob - 1))


def oeem_weighted_mean(pixel_loss: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """WCE = mean over all pixels of w_p l_p with w from ``oeem_weights``."""
    return (oeem_weights(pixel_loss, pseudo) * pixel_loss).mean()


def generalised_mean_bce(outputs, bag_label: torch.Tensor, r: float = 4.0) -> torch.Tensor:
    """DWS-MIL's stage-1 loss: BCE of each image's generalised mean (mean p^r)^(1/r) against its bag label, summed
    over images and the outputs (s1, s2, s3, f)."""
    target = bag_label.to(outputs[0].dtype)
    total = outputs[0].new_zeros(())
    for s in outputs:
        pooled = s.flatten(1).clamp_min(1e-6).pow(r).mean(1).pow(1 / r).clamp(1e-6, 1 - 1e-6)
        total = total + F.binary_cross_entropy(pooled, target, reduction="sum")
    return total
