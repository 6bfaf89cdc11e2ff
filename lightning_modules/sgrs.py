"""SGRS-Net: synergy-guided regional supervision of pseudo labels (Wang et al., MICCAI 2025).

spec/methods/sgrs.md. A Mean Teacher whose unlabeled supervision is the teacher's hard pseudo label, enforced on
the unlabeled image and on a mix of it with a labeled image; where the student's two predictions agree (C) the
label is trusted, where they differ (D) it is softened, and where either is near the decision boundary (I) it is
ignored. The teacher is created and EMA-updated by callbacks.EMATeacher.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lemis.errors import ConfigError
from lightning_modules.mean_teacher import MeanTeacher

UNCERTAINTY_RULES = ("maxprob", "entropy")
CE_MASKS = ("c_prime", "c")
SUP_DICE = ("ssl4mis", "sgrs_code")
RAMP_STARTS = ("step", "teacher")


# ---- Mix Augmentation (sec. 3) ----------------------------------------------------------------------------------
def draw_mix(n_unlabeled: int, n_labeled: int, alpha: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw lambda_i ~ Beta(alpha, alpha) [B_u] and partners perm(B_u) mod B_l [B_u] (torch RNG: resumable)."""
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    lam_raw = beta.sample((n_unlabeled,)).to(device)
    partner = torch.randperm(n_unlabeled, device=device) % n_labeled
    return lam_raw, partner


def mix(x_u: torch.Tensor, x_l: torch.Tensor, lam_raw: torch.Tensor,
        partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_m[i] = lam_i x_u[i] + (1 - lam_i) x_l[partner_i], lam = max(lam_raw, 1 - lam_raw) (the unlabeled
    image dominates). x_u [B_u, C, *S], x_l [B_l, C, *S] (both noisy), lam_raw/partner [B_u] ->
    (x_m [B_u, C, *S], lam [B_u]). The target of x_m[i] stays the pseudo label of x_u[i]."""
    lam = torch.maximum(lam_raw, 1 - lam_raw)
    shape = (-1,) + (1,) * (x_u.ndim - 1)
    return lam.view(shape) * x_u + (1 - lam.view(shape)) * x_l[partner], lam


# ---- Synergy regions (sec. 4) -----------------------------------------------------------------------------------
def binary_entropy_bits(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def uncertain(probs: torch.Tensor, tau: float, rule: str = "maxprob") -> torch.Tensor:
    """U(p) [B, *S] bool from probs [B, K, *S]. ``maxprob``: max_k p_k < 1 - tau; ``entropy``: normalised
    entropy -(sum p ln p)/ln K > H_2(tau). For K = 2 both equal the code's tau < p_0 < 1 - tau."""
    if rule == "maxprob":
        return probs.amax(1) < 1 - tau
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(probs.shape[1])
    return entropy > binary_entropy_bits(tau)


def synergy_regions(p_u: torch.Tensor, p_m: torch.Tensor, tau: float, rule: str = "maxprob") -> dict:
    """Masks [B_u, *S] bool from the student's probs on x_u and x_m [B_u, K, *S]: C (argmaxes agree),
    D (differ), I (either view uncertain), C' = C \\ I, D' = D \\ I. C', D', I partition the voxels."""
    consistent = p_u.argmax(1) == p_m.argmax(1)
    unsure = uncertain(p_u, tau, rule) | uncertain(p_m, tau, rule)
    return {"C": consistent, "D": ~consistent, "I": unsure, "C'": consistent & ~unsure,
            "D'": ~consistent & ~unsure}


# ---- Regional losses (sec. 5) -----------------------------------------------------------------------------------
def masked_soft_dice(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smooth: float) -> torch.Tensor:
    """nnU-Net SoftDiceLoss (per sample, background included) on the voxels of ``mask``.

    probs [B, K, *S], target [B, *S] long, mask [B, *S] bool. dc_bk = (2 tp + s) / (2 tp + fp + fn + s + 1e-8)
    with tp = sum M p_k g_k, fp = sum M p_k (1 - g_k), fn = sum M (1 - p_k) g_k; returns 1 - mean_{b,k} dc_bk.
    """
    onehot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    m = mask.unsqueeze(1).to(probs.dtype)
    dims = tuple(range(2, probs.ndim))
    tp = (m * probs * onehot).sum(dims)
    fp = (m * probs * (1 - onehot)).sum(dims)
    fn = (m * (1 - probs) * onehot).sum(dims)
    dc = (2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8)
    return 1 - dc.mean()


def regional_ce(logits: torch.Tensor, target: torch.Tensor, ce_mask: torch.Tensor, soft_mask: torch.Tensor,
                eps: float, broadcast_bug: bool = False) -> torch.Tensor:
    """mean over ALL voxels of M_C ce + D' ce_ls (sec. 5 terms 1 and 2) for one view.

    logits [B, K, *S], target [B, *S]; masks [B, *S] bool. ce_ls is PyTorch's label smoothing eps.
    ``broadcast_bug`` reproduces the code's [B, *S] x [B, 1, *S] broadcast: sample j's ce_ls weighted by
    every sample i's D' (mean over i, j, voxels).
    """
    ce = F.cross_entropy(logits, target, reduction="none")
    ce_ls = F.cross_entropy(logits, target, reduction="none", label_smoothing=eps)
    soft = soft_mask.to(ce.dtype)
    soft_term = (soft.unsqueeze(1) * ce_ls.unsqueeze(0)).mean() if broadcast_bug else (soft * ce_ls).mean()
    return (ce_mask.to(ce.dtype) * ce).mean() + soft_term


def sgrs_code_dice(probs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The authors' supervised DiceLoss (no factor 2; minimum 0.5): mean_k 1 - sum(p_k g_k) /
    (sum p_k^2 + sum g_k^2 + 1e-10), batch-level sums, background included (sec. 5, ``sup_dice: sgrs_code``)."""
    onehot = F.one_hot(label, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = [0] + list(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    return (1 - inter / (denom + 1e-10)).mean()


class SGRS(MeanTeacher):
    """SGRS-Net on a two-stream batch (labeled + unlabeled); student batch B_l + 2 B_u.

    Args (beyond MeanTeacher's, whose ``consistency``/``consistency_rampup``/``rampup_epoch_len`` give
    w(t) = 1.0 * sigmoid_rampup(t // 150, 40) here; the gate defaults to 0):
        tau: uncertainty band (0.425: 0.425 < p_0 < 0.575 for two classes).
        uncertainty_rule: ``maxprob`` or ``entropy`` (multi-class generalisations; equal for K = 2).
        ce_smoothing: eps of the label-smoothed CE on D' (code ``ce_w`` 0.2).
        dice_smooth_consistent, dice_smooth_different: soft-Dice smooth on C' (1) and D' (code ``dice_w`` 20).
        mix_alpha: Beta(alpha, alpha) of the Mix Augmentation (0.75).
        consistent_ce_mask: ``c_prime`` (default, inferred paper) or ``c`` (code: uncertain-but-agreeing voxels
            still get hard CE).
        (The teacher update of sec. 7 is the EMATeacher callback's: ``mode: single``, the default, or ``double``,
        the code's WeightEMA then EMA.)
        sup_dice: ``ssl4mis`` (default, factor 2) or ``sgrs_code`` (the code's DiceLoss).
        ce_mask_broadcast_bug: reproduce the code's D' broadcast in the CE term (default False).
        ramp_start: ``step`` (published: the ramp counts from step 0) or ``teacher``: the weight is 0 until the
            teacher is usable and the ramp counts from that step (t0). Usable = the running mean (decay
            ``teacher_dice_decay``) of the teacher's foreground Dice on the labeled half (its hard prediction
            on the noisy x_l against y_l, one extra teacher pass per step until t0) has reached
            ``teacher_dice``. A lemis option for short schedules (mean_teacher.md 3b): scaling the published
            ramp keeps its shape but not the teacher's quality at each point of it. (A foreground-fraction
            signal does not do: an untrained net may call most voxels foreground.)
    """

    SUPPORTS_IGNORE = False  # its pseudo-label regions and the teacher's ramp Dice read every labeled voxel

    def __init__(self, consistency: float = 1.0, consistency_rampup: float = 40.0, consistency_gate_steps: int = 0,
                 tau: float = 0.425, uncertainty_rule: str = "maxprob", ce_smoothing: float = 0.2,
                 dice_smooth_consistent: float = 1.0, dice_smooth_different: float = 20.0, mix_alpha: float = 0.75,
                 consistent_ce_mask: str = "c_prime", sup_dice: str = "ssl4mis",
                 ce_mask_broadcast_bug: bool = False, ramp_start: str = "step", teacher_dice: float = 0.5,
                 teacher_dice_decay: float = 0.9, **kwargs):
        for name, value, allowed in (("uncertainty_rule", uncertainty_rule, UNCERTAINTY_RULES),
                                     ("consistent_ce_mask", consistent_ce_mask, CE_MASKS),
                                     ("sup_dice", sup_dice, SUP_DICE),
                                     ("ramp_start", ramp_start, RAMP_STARTS)):
            if value not in allowed:
                raise ConfigError(f"model.init_args.{name} must be one of {allowed}, got {value!r}.")
        if not 0 < tau < 0.5:
            raise ConfigError(f"model.init_args.tau must be in (0, 0.5), got {tau}.")
        super().__init__(consistency=consistency, consistency_rampup=consistency_rampup,
                         consistency_gate_steps=consistency_gate_steps, **kwargs)
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.train_example: Callable[[], dict] | None = None
        self.ramp = {"origin": -1, "dice": 0.0}  # t0 (-1: not yet) and the running teacher Dice; in checkpoints

    def pseudo_weight(self, teacher_labeled: Callable[[], torch.Tensor], label: torch.Tensor) -> float:
        """w(t) of L_pseudo: MeanTeacher's gated ramp of t, or of t - t0 with ``ramp_start: teacher`` (0 before
        t0). ``teacher_labeled()`` gives the teacher's hard prediction [B_l, *S] on the noisy labeled half (asked
        only while t0 is not reached), ``label`` [B_l, *S] its labels."""
        step = self.global_step
        if self.hparams.ramp_start == "step":
            return self.consistency_weight(step)
        if self.ramp["origin"] < 0:
            dice = foreground_dice(teacher_labeled(), label, self.hparams.num_classes)
            if self._trainer is not None and self.trainer.world_size > 1:  # one t0 on every rank
                dice = self.trainer.strategy.reduce(dice, reduce_op="mean")
            decay = self.hparams.teacher_dice_decay
            self.ramp["dice"] = decay * self.ramp["dice"] + (1 - decay) * float(dice)
            if self.ramp["dice"] < self.hparams.teacher_dice:
                return 0.0
            self.ramp["origin"] = step
        return self.consistency_weight(step - self.ramp["origin"])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sgrs_ramp"] = dict(self.ramp)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.ramp = dict(checkpoint.get("sgrs_ramp", self.ramp))

    def supervised_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.hparams.sup_dice == "ssl4mis":
            return super().supervised_loss(logits, label)
        return 0.5 * (F.cross_entropy(logits, label) + sgrs_code_dice(torch.softmax(logits, 1), label))

    def pseudo_loss(self, z_u: torch.Tensor, z_m: torch.Tensor, p_u: torch.Tensor, p_m: torch.Tensor,
                    target: torch.Tensor, regions: dict) -> dict[str, torch.Tensor]:
        """L_pseudo = 0.5 (L_ce + L_dice) (sec. 5) with its terms, from the logits [B_u, K, *S] of x_u and x_m
        (for CE) and their softmax (for Dice; computed once by the caller, which also draws the regions from it)."""
        hp = self.hparams
        ce_mask = regions["C'"] if hp.consistent_ce_mask == "c_prime" else regions["C"]
        ce_u, ce_m = (regional_ce(z, target, ce_mask, regions["D'"], hp.ce_smoothing, hp.ce_mask_broadcast_bug)
                      for z in (z_u, z_m))
        dice_c = [masked_soft_dice(p, target, regions["C'"], hp.dice_smooth_consistent) for p in (p_u, p_m)]
        dice_d = [masked_soft_dice(p, target, regions["D'"], hp.dice_smooth_different) for p in (p_u, p_m)]
        terms = {"ce": 0.5 * (ce_u + ce_m), "dice": 0.25 * (sum(dice_c) + sum(dice_d))}
        terms.update(dice_consistent=0.5 * sum(dice_c), dice_different=0.5 * sum(dice_d))
        terms["pseudo"] = 0.5 * (terms["ce"] + terms["dice"])
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """batch: {"labeled": {image [B_l, C, *S], label [B_l, *S]}, "unlabeled": {image [B_u, C, *S]}}."""
        x_l, y_l, x_u = batch["labeled"]["image"], batch["labeled"]["label"], batch["unlabeled"]["image"]
        n_l, n_u = x_l.shape[0], x_u.shape[0]
        with torch.no_grad():
            x_u_noisy, x_l_noisy = self.teacher_input(x_u), self.teacher_input(x_l)      # 1.
            self.teacher.train(self.hparams.teacher_mode == "train")
            pseudo = self.logits(self.teacher(x_u_noisy)).argmax(1)                      # 2. yhat [B_u, *S]
            lam_raw, partner = draw_mix(n_u, n_l, self.hparams.mix_alpha, x_u.device)    # 3.
            x_m, lam = mix(x_u_noisy, x_l_noisy, lam_raw, partner)
        logits = self.logits(self.net(torch.cat([x_l, x_u, x_m])))                       # 4. one pass
        z_l, z_u, z_m = logits.split([n_l, n_u, n_u])
        loss_sup = self.supervised_loss(z_l, y_l)                                        # 5.
        p_u, p_m = torch.softmax(z_u, 1), torch.softmax(z_m, 1)
        with torch.no_grad():                                                            # 6.
            regions = synergy_regions(p_u, p_m, self.hparams.tau, self.hparams.uncertainty_rule)
        terms = self.pseudo_loss(z_u, z_m, p_u, p_m, pseudo, regions)                    # 7.
        weight = self.pseudo_weight(lambda: self.logits(self.teacher(x_l_noisy)).argmax(1), y_l)  # 8.
        loss = loss_sup + weight * terms["pseudo"]
        self.log_step({"loss/sup": loss_sup, "loss/total": loss, "cons_weight": weight,                # 11.
                       **{f"loss/{k}": v for k, v in terms.items()},
                       **{f"sgrs/frac_{name}": regions[key].float().mean() for name, key in
                          (("consistent", "C"), ("different", "D"), ("uncertain", "I"), ("c_prime", "C'"),
                           ("d_prime", "D'"))},
                       "sgrs/lambda_mean": lam.mean(), "sgrs/pseudo_fg_frac": (pseudo > 0).float().mean(),
                       "sgrs/teacher_dice": self.ramp["dice"], "sgrs/ramp_origin": float(self.ramp["origin"])})
        # Drawn only when the ImageLogger asks: nothing is computed for it on the other steps.
        self.train_example = lambda: {"image": x_u[0, 0], "mixed": x_m[0, 0], "pseudo label": pseudo[0],
                                      "student on x_u": z_u[0].detach().argmax(0),
                                      "student on x_m": z_m[0].detach().argmax(0),
                                      "regions": region_map({k: v[:1] for k, v in regions.items()})[0]}
        return loss


@torch.no_grad()
def foreground_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean over the foreground classes present in ``pred`` or ``label`` (both [B, *S], pooled over the batch) of
    2 |P_k & G_k| / (|P_k| + |G_k|); 0 when no foreground class is present in either."""
    scores = []
    for k in range(1, num_classes):
        p, g = pred == k, label == k
        total = p.sum() + g.sum()
        if total > 0:
            scores.append(2 * (p & g).sum() / total)
    return torch.stack(scores).mean().float() if scores else torch.zeros(())


def region_map(regions: dict) -> torch.Tensor:
    """[B, *S] long for drawing: C' -> 2 (green), D' -> 1 (red), I -> 4 (yellow) in ImageLogger's palette."""
    out = torch.zeros_like(regions["I"], dtype=torch.long)
    out[regions["C'"]] = 2
    out[regions["D'"]] = 1
    out[regions["I"]] = 4
    return out
