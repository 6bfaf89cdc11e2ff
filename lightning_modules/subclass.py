"""Subclass segmentation from a few fine (subclass) and many coarse (superclass) labels: Prior Concatenation,
Separate Normalization (both in ``nets.branched_unet``), two-view pseudo labels and HierarchicalMix
(Dai, Lei, Zhang, MICCAI 2023; spec/methods/subclass.md, the authors' code ``OvO1111/EfficientSubclassLearning``).

The data gives fine cases in the ``labeled`` stream (image, label, coarse_label) and coarse cases in the
``unlabeled`` stream (image, coarse_label: never a fine label), from ``data.init_args.coarse_mapping``.
Tensor functions below take batches ``[B, C, *S]`` / ``[B, *S]`` in 2D or 3D and are what the tests check.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from monai.inferers import sliding_window_inference

from datamodules.hierarchy import Hierarchy
from lemis.errors import ConfigError
from lightning_modules import losses
from lightning_modules.metrics import case_metrics
from lightning_modules.segmentation import INFER_MODES, SegmentationModule, overlap_for_stride

MIX_TARGETS = ("all", "region")
SMOOTH = 1e-5


# ---- schedules (sec. 3.4, sec. 5) -----------------------------------------------------------------------------

def tau(step: int, base: float = 0.999, every: int = 10, minimum: float = 0.4) -> float:
    """Acceptance threshold tau(t) = max(base^(t // every), minimum): 1.0 for t < 10, 0.4 from t = 9160."""
    return max(base ** (step // every), minimum)


def unsup_ramp(step: int, every: int = 1000) -> float:
    """w(t) = sigma(ceil(t / every)): the code's ``1/(1 + exp(-t//1000))``, which Python reads as floor(-t/1000)
    (quirk Q3): w(0) = 0.5, w(1) = w(1000) = 0.731, w(1001) = 0.881."""
    return 1.0 / (1.0 + math.exp(-(-(-step // every))))


# ---- pseudo labels (sec. 3) -----------------------------------------------------------------------------------

def second_view(x: torch.Tensor, k: int, axis: int) -> torch.Tensor:
    """flip(rot90(x, k)) in the last two (in-plane) axes; ``axis`` -2 or -1 is the flipped one."""
    return torch.flip(torch.rot90(x, k, dims=(-2, -1)), dims=(axis,))


def undo_view(y: torch.Tensor, k: int, axis: int) -> torch.Tensor:
    """The inverse of ``second_view``: flip back, then rot90 by -k."""
    return torch.rot90(torch.flip(y, dims=(axis,)), -k, dims=(-2, -1))


def accept(q: torch.Tensor, r: torch.Tensor, coarse: torch.Tensor, parent: tuple[int, ...],
           threshold: float) -> torch.Tensor:
    """P[b, k, s] = 1 iff q > tau and r > tau (strict) and coarse[b, s] == parent[k], else 0 (sec. 3.3).

    q, r: fine probabilities of the two views [B, K_f, *S]; coarse: [B, *S]. Returns float [B, K_f, *S]; a voxel
    may accept no class, or two when tau < 0.5 (quirk Q5).
    """
    table = torch.tensor(parent, device=coarse.device).view(1, -1, *([1] * (coarse.ndim - 1)))
    inside = coarse.unsqueeze(1) == table
    return ((q > threshold) & (r > threshold) & inside).to(q.dtype)


# ---- HierarchicalMix (sec. 4) ---------------------------------------------------------------------------------

def bounding_box(mask: torch.Tensor) -> tuple[slice, ...] | None:
    """Per-axis [min, max + 1) of a boolean mask [*S]; None when it is empty."""
    if not bool(mask.any()):
        return None
    coords = mask.nonzero()
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(coords.min(0).values, coords.max(0).values))


def mix_pair(x_u: torch.Tensor, coarse_u: torch.Tensor, x_l: torch.Tensor, label_l: torch.Tensor,
             alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """HierarchicalMix of one coarse case with one fine case (sec. 4.2-4.6).

    x_u, x_l: [C, *S]; coarse_u (superclass mask of u), label_l (fine mask of l): [*S]. The fine case's crop at
    the box of its superclass region is resized to the box of u's superclass region (image bilinear/trilinear,
    label nearest) and blended where the pasted subclass lies on u's superclass:
        y_r = resize(label_l[B_l]) * [coarse_u[B_u] > 0],   M = [y_r > 0] inside B_u,
        x_mix = x_u (1 - alpha M) + alpha M x~_l,            y_mix = y_r inside B_u, 0 elsewhere.
    Returns (x_mix [C, *S], y_mix [*S] long, alpha); an empty mask returns (x_u, 0, 0.0).
    """
    box_l, box_u = bounding_box(label_l > 0), bounding_box(coarse_u > 0)
    y_mix = torch.zeros_like(coarse_u, dtype=torch.long)
    if box_l is None or box_u is None:
        return x_u.clone(), y_mix, 0.0
    size = [s.stop - s.start for s in box_u]
    mode = "bilinear" if x_u.ndim == 3 else "trilinear"
    pasted = F.interpolate(x_l[(slice(None), *box_l)][None].float(), size=size, mode=mode, align_corners=False)[0]
    fine = F.interpolate(label_l[box_l][None, None].float(), size=size, mode="nearest")[0, 0].long()
    y_r = fine * (coarse_u[box_u] > 0)
    blend = (y_r > 0).to(x_u.dtype) * alpha
    x_mix = x_u.clone()
    region = x_mix[(slice(None), *box_u)]
    x_mix[(slice(None), *box_u)] = region * (1 - blend) + blend * pasted.to(x_u.dtype)
    y_mix[box_u] = y_r
    return x_mix, y_mix, alpha


def draw_alpha(dims: int) -> float:
    """alpha: 2D uniform on {0.5, 0.6, ..., 1.0}, 3D uniform on [0, 1) (the code's ``randint(5, 10)/10`` vs
    ``random()``); torch's generator, so a resumed run draws the same."""
    if dims == 2:
        return int(torch.randint(5, 11, ()).item()) / 10
    return float(torch.rand(()).item())


def hierarchical_mix(x_u: torch.Tensor, coarse_u: torch.Tensor, x_l: torch.Tensor, label_l: torch.Tensor):
    """Each coarse case paired with a fine case of the same batch drawn uniformly with replacement (D1).

    x_u [B_u, C, *S], coarse_u [B_u, *S], x_l [B_l, C, *S], label_l [B_l, *S] ->
    (x_mix [B_u, C, *S], y_mix [B_u, *S], alpha [B_u])."""
    dims = x_u.ndim - 2
    partners = torch.randint(x_l.shape[0], (x_u.shape[0],)).tolist()
    mixed = [mix_pair(x_u[i], coarse_u[i], x_l[j], label_l[j], draw_alpha(dims)) for i, j in enumerate(partners)]
    x_mix, y_mix, alpha = zip(*mixed)
    return torch.stack(x_mix), torch.stack(y_mix), torch.tensor(alpha, dtype=x_u.dtype, device=x_u.device)


def mixed_target(pseudo: torch.Tensor | None, y_mix: torch.Tensor, alpha: torch.Tensor, num_fine: int,
                 mix_target: str = "all") -> torch.Tensor:
    """T = (1 - alpha) P + alpha onehot(y_mix) at every voxel (sec. 4.7; without pseudo labels T = alpha onehot).
    ``region`` (lemis variant, quirk Q6): T = P outside the pasted region y_mix > 0.

    pseudo: [B, K_f, *S] or None; y_mix: [B, *S]; alpha: [B] -> T [B, K_f, *S]."""
    a = alpha.view(-1, *([1] * (y_mix.ndim)))
    onehot = F.one_hot(y_mix, num_fine).movedim(-1, 1).to(a.dtype)
    base = torch.zeros_like(onehot) if pseudo is None else pseudo
    target = (1 - a) * base + a * onehot
    if mix_target == "region":
        target = torch.where((y_mix > 0).unsqueeze(1), target, base)
    return target


# ---- losses (sec. 5) ------------------------------------------------------------------------------------------

def masked_dice_loss(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dice_K(p, y, m): per class over the batch, 1 - (2 sum p y m + eps) / (sum p^2 m + sum y^2 m + eps), mean
    over all K classes (SSL4MIS form with a weight). probs, target, mask: [B, K, *S]."""
    dims = [0] + list(range(2, probs.ndim))
    intersect = (probs * target * mask).sum(dims)
    denom = (probs * probs * mask).sum(dims) + (target * target * mask).sum(dims)
    return (1 - (2 * intersect + SMOOTH) / (denom + SMOOTH)).mean()


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 (CE(z, T) + Dice(softmax z, T, m = T)): CE = -mean_voxels sum_k T_k log p_k (an all-zero T column
    counts in the mean with loss 0). logits, target: [B, K, *S]."""
    return 0.5 * (F.cross_entropy(logits, target) + masked_dice_loss(torch.softmax(logits, 1), target, target))


def precision_recall(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """|P & G| / |P| and |P & G| / |G| of binary masks; both empty: 1, 1; one empty: the undefined one 0."""
    inter, n_pred, n_gt = int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0
    return (inter / n_pred if n_pred else 0.0), (inter / n_gt if n_gt else 0.0)


class Subclass(SegmentationModule):
    """Coarse + fine supervision, pseudo labels and HierarchicalMix on the coarse cases (sec. 6).

    The net (``nets.branched_unet.BranchedUNet``) returns {"fine", "coarse"} logits and holds the head options
    (``prior_concatenation``, ``separate_normalization``) and the mapping; evaluated logits are the fine ones.

    Args (beyond SegmentationModule's; the ablation rows of sec. 8 switch these and the net's two options):
        coarse_loss: L_c over every case (fine and coarse). With it, pseudo_label and hierarchical_mix all off
            the coarse stream is not used at all: the fine-only baseline on the same data order.
        pseudo_label: two-view agreement pseudo labels P on the coarse cases (sec. 3).
        hierarchical_mix: the mixed loss of sec. 4 (with P in its target when pseudo_label is on).
        mix_grad: the mixed forward carries gradient (lemis default); false reproduces the code, where it runs
            under no_grad and trains nothing (quirk Q1; only BatchNorm statistics change).
        mix_target: ``all`` (both codes, Q6) or ``region``.
        tau_base, tau_every, tau_min: tau(t) = max(tau_base^(t // tau_every), tau_min).
        ramp_every: w(t) = sigma(ceil(t / ramp_every)).
    """

    INFER_MODES = INFER_MODES + ("slice_windows",)
    SUPPORTS_IGNORE = False

    def __init__(self, coarse_loss: bool = True, pseudo_label: bool = False, hierarchical_mix: bool = False,
                 mix_grad: bool = True, mix_target: str = "all", tau_base: float = 0.999, tau_every: int = 10,
                 tau_min: float = 0.4, ramp_every: int = 1000, **kwargs):
        super().__init__(**kwargs)
        if mix_target not in MIX_TARGETS:
            raise ConfigError(f"model.init_args.mix_target must be one of {MIX_TARGETS}, got {mix_target!r}.")
        for name, value in (("tau_every", tau_every), ("ramp_every", ramp_every)):
            if value < 1:
                raise ConfigError(f"model.init_args.{name} must be >= 1, got {value}.")
        mapping = getattr(self.net, "mapping", None)
        if mapping is None:
            raise ConfigError(f"{type(self).__name__} needs a net with coarse and fine heads and a mapping "
                              f"(model.init_args.net: lightning_modules.nets.branched_unet.BranchedUNet).")
        self.hierarchy = Hierarchy.from_mapping(mapping, "model.init_args.net.init_args.mapping")
        if self.hierarchy.num_fine != self.hparams.num_classes:
            raise ConfigError(f"the net's mapping has {self.hierarchy.num_fine} fine classes but "
                              f"model.init_args.num_classes={self.hparams.num_classes}.")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.train_example = None

    @property
    def uses_coarse_cases(self) -> bool:
        hp = self.hparams
        return hp.coarse_loss or hp.pseudo_label or hp.hierarchical_mix

    def check_setup(self, trainer, datamodule, stage: str) -> None:
        super().check_setup(trainer, datamodule, stage)
        data_hierarchy = getattr(datamodule, "hierarchy", None)
        if data_hierarchy != self.hierarchy:
            theirs = None if data_hierarchy is None else data_hierarchy.mapping
            raise ConfigError(f"data.init_args.coarse_mapping={theirs} must equal the net's mapping "
                              f"{self.hierarchy.mapping} (model.init_args.net.init_args.mapping).")
        if stage == "fit":
            rank_zero_info(f"lemis subclass: coarse_loss={self.hparams.coarse_loss} pseudo_label="
                           f"{self.hparams.pseudo_label} hierarchical_mix={self.hparams.hierarchical_mix} "
                           f"mix_grad={self.hparams.mix_grad} (false: the authors' code, no gradient).")

    # ---- training ------------------------------------------------------------------------------------------
    def logits(self, output) -> torch.Tensor:
        return output["fine"]

    def tau(self, step: int) -> float:
        hp = self.hparams
        return tau(step, hp.tau_base, hp.tau_every, hp.tau_min)

    def pseudo_labels(self, fine_logits: torch.Tensor, coarse: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """P of the coarse cases (sec. 3): q from the main forward (detached), r from a rot90/flip view under
        no_grad in train mode. fine_logits [B_u, K_f, *S], coarse [B_u, *S], image [B_u, C, *S]."""
        q = torch.softmax(fine_logits.detach(), 1)
        k, axis = int(torch.randint(4, ()).item()), (-2, -1)[int(torch.randint(2, ()).item())]
        with torch.no_grad():
            r = undo_view(torch.softmax(self.logits(self.net(second_view(image, k, axis))), 1), k, axis)
        return accept(q, r, coarse, self.hierarchy.parent, self.tau(self.global_step))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """batch: {"labeled": {image [B_l, C, *S], label, coarse_label [B_l, *S]}, "unlabeled": {image [B_u, C,
        *S], coarse_label [B_u, *S]}} (or the labeled stream alone: every case fine)."""
        hp = self.hparams
        lab, unl = batch.get("labeled", batch), batch.get("unlabeled")
        coarse_cases = unl is not None and self.uses_coarse_cases
        n_lab = lab["image"].shape[0]
        image = torch.cat([lab["image"], unl["image"]]) if coarse_cases else lab["image"]
        output = self.net(image)                                                  # 1. one pass, joint BN batch
        loss_fine = self.supervised_loss(output["fine"][:n_lab], lab["label"])    # 2. L_f on fine cases
        terms = {"loss/fine": loss_fine}
        loss = loss_fine
        if hp.coarse_loss:                                                        #    L_c on every case
            coarse = torch.cat([lab["coarse_label"], unl["coarse_label"]]) if coarse_cases else lab["coarse_label"]
            terms["loss/coarse"] = losses.supervised_loss(output["coarse"], coarse)
            loss = loss + terms["loss/coarse"]
        if coarse_cases and (hp.pseudo_label or hp.hierarchical_mix):
            loss_u = self.unsupervised_loss(output["fine"][n_lab:], lab, unl, terms)
            weight = unsup_ramp(self.global_step, hp.ramp_every)
            terms.update({"loss/unsup": loss_u, "ramp": weight})
            loss = loss + weight * loss_u
        self.log_step({**terms, "loss/total": loss})
        return loss

    def unsupervised_loss(self, fine_logits: torch.Tensor, lab: dict, unl: dict, terms: dict) -> torch.Tensor:
        """L_u / w(t) of the coarse cases (steps 3-4): on P alone, or on the mixed images against T."""
        hp = self.hparams
        pseudo = None
        if hp.pseudo_label:                                                       # 3.
            pseudo = self.pseudo_labels(fine_logits, unl["coarse_label"], unl["image"])
            terms.update({"tau": self.tau(self.global_step), "accepted": pseudo.amax(1).mean()})
        if not hp.hierarchical_mix:
            return soft_target_loss(fine_logits, pseudo)
        with torch.no_grad():                                                     # 4.
            x_mix, y_mix, alpha = hierarchical_mix(unl["image"], unl["coarse_label"], lab["image"], lab["label"])
        with torch.set_grad_enabled(hp.mix_grad and torch.is_grad_enabled()):
            mixed_logits = self.logits(self.net(x_mix))
        target = mixed_target(pseudo, y_mix, alpha, self.hierarchy.num_fine, hp.mix_target)
        self.train_example = lambda: {"image": x_mix[0, 0], "mixed_label": y_mix[0]}
        return soft_target_loss(mixed_logits, target)

    # ---- evaluation: fine and coarse -----------------------------------------------------------------------
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K_f + K_c, *S]: the fine softmax, then the coarse softmax (inference averages both alike)."""
        output = self.net(x)
        return torch.cat([torch.softmax(output["fine"], 1), torch.softmax(output["coarse"], 1)], 1)

    def label_map(self, probs: torch.Tensor) -> torch.Tensor:
        """The fine prediction: ``postprocess`` of the first K_f channels."""
        return super().label_map(probs[:, :self.hierarchy.num_fine])

    def score_case(self, pred: np.ndarray, gt: np.ndarray, case: dict, probs: torch.Tensor) -> list[dict]:
        """One row per fine class: the base metrics plus precision and recall, and ``coarse_<metric>`` of its
        superclass (coarse prediction = argmax of the coarse softmax against the superclass mask of ``gt``)."""
        rows = super().score_case(pred, gt, case, probs)
        coarse_pred = probs[0, self.hierarchy.num_fine:].argmax(0).cpu().numpy()
        coarse_gt = self.hierarchy.coarse(gt)
        spacing = case.get("spacing", [None])[0]
        spacing = None if spacing is None else tuple(float(s) for s in spacing)
        coarse_rows = case_metrics(coarse_pred, coarse_gt, self.hierarchy.num_coarse, case["case"][0], spacing,
                                   empty_convention=self.hparams.empty_convention)
        for row in coarse_rows:
            c = int(row["class"])
            row["precision"], row["recall"] = precision_recall(coarse_pred == c, coarse_gt == c)
        parent = self.hierarchy.parent
        for k, row in enumerate(rows, start=1):
            row["precision"], row["recall"] = precision_recall(pred == k, gt == k)
            coarse = coarse_rows[parent[k] - 1]
            row.update({f"coarse_{name}": coarse[name] for name in ("dice", "hd95", "precision", "recall")})
        return rows

    def _predict_slice_windows(self, image: torch.Tensor) -> torch.Tensor:
        """[1, C, D, H, W] -> [1, K', D, H, W]: every slice by a 2D sliding window of ``roi_size`` at stride
        ``sw_stride`` (the authors' ACDC test: patch 256, stride 64, softmax averaged; padded when smaller)."""
        slices = image[0].movedim(1, 0)  # [D, C, H, W]
        overlap = overlap_for_stride(self.roi_size, self.sw_stride)
        probs = sliding_window_inference(slices, self.roi_size, self.hparams.sw_batch_size, self.probabilities,
                                         overlap=overlap, mode="constant")
        return probs.movedim(0, 1)[None]
