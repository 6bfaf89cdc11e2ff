"""IKD-MIL: a MIL teacher from image-level labels, then distillation to a student with OEEM-weighted CE, with role
reversal between the two (He, Li, Zemp 2024, arXiv 2407.10274; spec/methods/ikd_mil.md; code ``wollf2008/IKD-MIL``).

The module trains ``net`` (VGG-MIL: side probabilities s1, s2, s3 and their fusion f) and scores it per image.
``stage`` (a buffer, so it travels with checkpoints) and ``teacher`` are slots written only by
``callbacks.role_reversal.RoleReversal``: stage 1 trains the MIL teacher in ``net``; at the stage switch the
callback freezes the best stage-1 weights into ``teacher`` and gives ``net`` its initial weights back, and stage 2
distils the teacher into it. Training batches are ``{image [B, 3, H, W], bag_label [B], case}``, never a mask.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from lemis.errors import ConfigError
from lightning_modules import losses
from lightning_modules.metrics import histology_row
from lightning_modules.segmentation import INFER_MODES, SegmentationModule

STAGE1_LOSSES = ("dice_const", "gm_bce")
PSEUDO_LABELS = ("threshold", "exact_one")
CE_FORMS = ("bce", "prob_logits")
NEG_PSEUDO = ("zeros", "teacher")


class IKDMIL(SegmentationModule):
    """Args (beyond SegmentationModule's; quirks Q1-Q3 of sec. 8 as options, the intended version the default):
        stage1_loss: ``dice_const`` (the code: Dice of every output against a constant mask) or ``gm_bce``
            (DWS-MIL's generalised-mean BCE, r = ``gm_r``).
        pseudo_label: ``threshold`` (y = q >= 0.5) or ``exact_one`` (the code's ``q.long()``).
        ce_form: ``bce`` or ``prob_logits`` (the code: CE over the probabilities [1 - f, f] as logits).
        neg_pseudo: ``zeros`` (negative images are background) or ``teacher`` (the code: the teacher's q).
        wce_weight: lambda of the weighted CE; unset: 2 B (the code's ``loss_oeem * batch_size * 2``).
        blur_sigma: Gaussian blur of the fused probability before the 0.5 threshold at evaluation (3).
        eval_scale: ``infer_mode: resized`` enlarges each whole image by this factor (256 / 128 = 2 for GlaS
            crops of 128 seen at 256), reflect-pads to a multiple of 8, predicts, blurs at that scale and
            resizes the probability back to the native size.
    """

    INFER_MODES = INFER_MODES + ("resized",)
    SUPPORTS_IGNORE = False

    def __init__(self, stage1_loss: str = "dice_const", gm_r: float = 4.0, pseudo_label: str = "threshold",
                 ce_form: str = "bce", neg_pseudo: str = "zeros", wce_weight: float | None = None,
                 blur_sigma: float = 3.0, eval_scale: float = 2.0, **kwargs):
        kwargs.setdefault("num_classes", 2)
        kwargs.setdefault("infer_mode", "resized")
        kwargs.setdefault("threshold", 0.5)
        super().__init__(**kwargs)
        for name, value, allowed in (("stage1_loss", stage1_loss, STAGE1_LOSSES),
                                     ("pseudo_label", pseudo_label, PSEUDO_LABELS), ("ce_form", ce_form, CE_FORMS),
                                     ("neg_pseudo", neg_pseudo, NEG_PSEUDO)):
            if value not in allowed:
                raise ConfigError(f"model.init_args.{name} must be one of {allowed}, got {value!r}.")
        if self.hparams.num_classes != 2:
            raise ConfigError(f"IKDMIL segments one foreground class: model.init_args.num_classes must be 2, got "
                              f"{self.hparams.num_classes}.")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.teacher: torch.nn.Module | None = None  # written by callbacks.role_reversal.RoleReversal only
        self.pseudo_pool = None  # the teacher's maps (callbacks.pseudo_labels.PseudoLabelRefresh), else online
        self.register_buffer("stage", torch.tensor(1))

    def check_setup(self, trainer, datamodule, stage: str) -> None:
        from callbacks.pseudo_labels import PseudoLabelRefresh
        from callbacks.role_reversal import RoleReversal

        super().check_setup(trainer, datamodule, stage)
        if stage != "fit":
            return
        if not any(isinstance(c, RoleReversal) for c in trainer.callbacks):
            raise ConfigError("IKDMIL needs the callbacks.role_reversal.RoleReversal callback in trainer.callbacks "
                              "(it switches the stages and reverses the roles).")
        pooled = any(isinstance(c, PseudoLabelRefresh) and c.source == "pool" for c in trainer.callbacks)
        if pooled and self.hparams.neg_pseudo == "teacher":
            raise ConfigError("model.init_args.neg_pseudo=teacher needs the teacher's maps of negative images too: "
                              "use PseudoLabelRefresh source: online (the pool holds positive images only).")

    # ---- the net's output -----------------------------------------------------------------------------------
    def logits(self, output) -> torch.Tensor:
        """log [1 - f, f] of the fused probability: logits whose softmax is the two-class probability."""
        fused = output[3]
        return torch.cat([1 - fused, fused], 1).clamp_min(1e-6).log()

    # ---- training -------------------------------------------------------------------------------------------
    def pseudo_labels(self, q: torch.Tensor, bag_label: torch.Tensor) -> torch.Tensor:
        """y-hat [B, 1, H, W] from the teacher's fused map q (sec. 3)."""
        pseudo = (q >= 0.5).to(q.dtype) if self.hparams.pseudo_label == "threshold" else q.long().to(q.dtype)
        if self.hparams.neg_pseudo == "zeros":
            pseudo = pseudo * bag_label.view(-1, 1, 1, 1).to(q.dtype)
        return pseudo

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Stage 1: L1 (sec. 2); stage 2: L2 = sum of Dice-to-teacher terms + lambda WCE (sec. 3)."""
        if "label" in batch:
            raise ConfigError("IKDMIL trains on image-level labels: a training batch must not carry a pixel mask.")
        image, bag = batch["image"], batch["bag_label"]
        outputs = self.net(image)
        if int(self.stage) == 1:
            if self.hparams.stage1_loss == "dice_const":
                loss = losses.mil_dice_loss(outputs, bag)
            else:
                loss = losses.generalised_mean_bce(outputs, bag, self.hparams.gm_r)
            self.log_step({"loss/mil": loss})
            return loss
        with torch.no_grad():
            if self.pseudo_pool is not None:
                q = self.pseudo_pool.lookup(batch["case"], outputs[3].detach())
            else:
                self.teacher.eval()
                q = self.teacher(image)[3]
        loss_kd = losses.mil_dice_loss(outputs, bag, target=q)
        pseudo = self.pseudo_labels(q, bag)
        pixel = (losses.bce_map if self.hparams.ce_form == "bce" else losses.prob_logit_ce_map)(outputs[3], pseudo)
        loss_wce = losses.oeem_weighted_mean(pixel, pseudo)
        weight = self.hparams.wce_weight if self.hparams.wce_weight is not None else 2.0 * image.shape[0]
        loss = loss_kd + weight * loss_wce
        self.log_step({"loss/kd": loss_kd, "loss/wce": loss_wce, "loss/total": loss,
                       "pseudo_fg": pseudo.mean()})
        return loss

    # ---- evaluation -----------------------------------------------------------------------------------------
    def _predict_resized(self, image: torch.Tensor) -> torch.Tensor:
        """[1, 3, H, W] -> [1, 2, H, W]: enlarged by ``eval_scale``, reflect-padded to a multiple of 8, fused
        probability blurred (sigma ``blur_sigma``) at that scale, resized back bilinearly (sec. 9, GlaS)."""
        size = image.shape[-2:]
        x = F.interpolate(image, scale_factor=self.hparams.eval_scale, mode="bilinear", align_corners=False)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 8, 0, -h % 8), mode="reflect")
        fused = self.net(x)[3][..., :h, :w]
        blurred = torch.from_numpy(gaussian_filter(fused[0, 0].double().cpu().numpy(), self.hparams.blur_sigma))
        p = F.interpolate(blurred[None, None].to(image), size=size, mode="bilinear", align_corners=False)
        return torch.cat([1 - p, p], 1)

    def label_map(self, probs: torch.Tensor) -> torch.Tensor:
        """Foreground where its probability reaches ``threshold`` (>=, as the code)."""
        return (probs[:, 1] >= self.hparams.threshold).long()

    def score_case(self, pred: np.ndarray, gt: np.ndarray, case: dict, probs: torch.Tensor) -> list[dict]:
        """One row per image (``metrics.histology_row``): F1 / IoU of the foreground for a positive image, of the
        background for a negative one, and the Hausdorff distances of a positive one."""
        return [histology_row(pred == 1, gt == 1, case["case"][0])]
