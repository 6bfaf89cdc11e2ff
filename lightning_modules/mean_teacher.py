"""Mean Teacher (Tarvainen & Valpola 2017) as in SSL4MIS (ACDC) and UA-MT's plain MT (LA).

spec/methods/mean_teacher.md sec. 1; the teacher is created and EMA-updated by callbacks.EMATeacher.
"""
from __future__ import annotations

import torch
from torch import nn

from callbacks.ema_teacher import EMATeacher
from lemis.errors import ConfigError
from lightning_modules import losses
from lightning_modules.segmentation import SegmentationModule

TEACHER_MODES = ("train", "eval")


class MeanTeacher(SegmentationModule):
    """Student/teacher consistency on the unlabeled stream.

    Args (beyond SegmentationModule's; the names the CPU protocols and sweeps use):
        consistency: c, the weight's plateau (0.1 in both codes).
        consistency_rampup: R, ramp length in "epochs" of ``rampup_epoch_len`` steps (ACDC 200, LA 40).
        rampup_epoch_len: steps per ramp epoch (150 in both codes).
        consistency_gate_steps: consistency weight is 0 before this step (ACDC 1000, LA 0).
        noise_std, noise_clip: teacher input noise clip(N(0, std^2), -clip, clip) (0.1, 0.2).
        teacher_mode: ``train`` (both codes: BatchNorm batch statistics, dropout on) or ``eval``.
        ema_decay: the teacher's EMA decay (0.99), applied by callbacks.EMATeacher.
    """

    def __init__(self, consistency: float = 0.1, consistency_rampup: float = 200.0,
                 rampup_epoch_len: int = 150, consistency_gate_steps: int = 1000, noise_std: float = 0.1,
                 noise_clip: float = 0.2, teacher_mode: str = "train", ema_decay: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        if teacher_mode not in TEACHER_MODES:
            raise ConfigError(f"model.init_args.teacher_mode must be one of {TEACHER_MODES}, got {teacher_mode!r}.")
        if rampup_epoch_len < 1:
            raise ConfigError(f"model.init_args.rampup_epoch_len must be >= 1, got {rampup_epoch_len}.")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.teacher: nn.Module | None = None  # the contracts.TeacherMethod slot, written by callbacks only

    @property
    def ema_decay(self) -> float:
        return self.hparams.ema_decay

    def check_setup(self, trainer, datamodule, stage: str) -> None:
        super().check_setup(trainer, datamodule, stage)
        if stage != "fit":
            return
        if not any(isinstance(callback, EMATeacher) for callback in trainer.callbacks):
            raise ConfigError(f"{type(self).__name__} needs the callbacks.ema_teacher.EMATeacher callback in "
                              f"trainer.callbacks.")
        if "unlabeled" not in getattr(datamodule, "stream_names", ("unlabeled",)):
            raise ConfigError(f"{type(self).__name__} needs an unlabeled stream: set "
                              f"data.init_args.labeled_batch_size below data.init_args.batch_size.")

    def consistency_weight(self, step: int) -> float:
        hp = self.hparams
        return losses.consistency_weight(step, hp.consistency, hp.consistency_rampup, hp.rampup_epoch_len,
                                         hp.consistency_gate_steps)

    def teacher_alpha(self, step: int) -> float:
        """EMA coefficient after optimizer step t (0-based), used by callbacks.EMATeacher."""
        return losses.ema_alpha(step, self.hparams.ema_decay)

    def teacher_input(self, image: torch.Tensor) -> torch.Tensor:
        """x_u' = x_u + clip(n, -clip, clip), n ~ N(0, std^2) per voxel (step 2)."""
        noise = (torch.randn_like(image) * self.hparams.noise_std).clamp(-self.hparams.noise_clip,
                                                                         self.hparams.noise_clip)
        return image + noise

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """batch: {"labeled": {image [B_l, C, *S], label [B_l, *S]}, "unlabeled": {image [B_u, C, *S]}}."""
        lab, unl = batch["labeled"], batch["unlabeled"]
        n_lab = lab["image"].shape[0]
        logits = self.logits(self.net(torch.cat([lab["image"], unl["image"]])))  # 1. one pass, both halves
        with torch.no_grad():                                                 # 2. teacher on noisy x_u
            self.teacher.train(self.hparams.teacher_mode == "train")
            teacher_probs = torch.softmax(self.logits(self.teacher(self.teacher_input(unl["image"]))), dim=1)
        loss_sup = self.supervised_loss(logits[:n_lab], lab["label"])         # 3.
        student_probs = torch.softmax(logits[n_lab:], dim=1)
        loss_cons = losses.softmax_mse(student_probs, teacher_probs)          # 4.
        weight = self.consistency_weight(self.global_step)                    # 5.
        loss = loss_sup + weight * loss_cons                                  # 6.
        self.log_step({"loss/sup": loss_sup, "loss/cons": loss_cons, "loss/total": loss, "cons_weight": weight})
        return loss
