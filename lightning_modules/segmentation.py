"""SegmentationModule: the network, the supervised loss, the optimizer/LR schedule and whole-case evaluation.

Every method subclasses this and overrides `training_step` only; inference and metrics exist once, here.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from monai.inferers import sliding_window_inference
from torch import nn

from lemis.errors import ConfigError
from datamodules.transforms import zoom_nearest_torch
from lightning_modules import losses
from lightning_modules.metrics import case_metrics, summarize, write_rows_csv

LR_SCHEDULES = ("poly", "linear", "constant", "step")
INFER_MODES = ("slices", "sliding_window")


def lr_factor(step: int, schedule: str, max_steps: int, power: float = 0.9, step_size: int = 2500,
              gamma: float = 0.1) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based: the number of steps already done).

    poly (SSL4MIS): the LR used at step t+1 is set after step t to (1 - t/max_steps)^0.9, so steps 0 and 1
    both use the base LR. linear: the same with power 1. step (UA-MT): gamma^(t // step_size), i.e. steps
    0..2499 use lr, 2500..4999 use 0.1 lr, ... constant: 1.
    """
    if schedule in ("poly", "linear"):
        done = max(step - 1, 0)
        return max(1.0 - done / max_steps, 0.0) ** (power if schedule == "poly" else 1.0)
    if schedule == "step":
        return gamma ** (step // step_size)
    return 1.0


def overlap_for_stride(roi_size: tuple[int, ...], stride: tuple[int, ...]) -> list[float]:
    """Per-axis MONAI overlap whose scan interval int(roi * (1 - overlap)) equals ``stride`` exactly.

    MONAI then places windows at min(i * stride, size - roi), which is UA-MT's test_util placement; half a
    voxel of slack keeps float rounding from giving stride - 1; a stride >= roi means no overlap.
    """
    return [max(1.0 - (s + 0.5) / r, 0.0) for r, s in zip(roi_size, stride)]


def check_optimizer_options(**values: float) -> None:
    """SGD and schedule options with a value no run can use (``lr=-1``, ``momentum=1.5``): one sentence each."""
    valid = {"lr": (lambda v: v > 0, "> 0"), "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
             "weight_decay": (lambda v: v >= 0, ">= 0"), "poly_power": (lambda v: v > 0, "> 0"),
             "lr_step_size": (lambda v: v >= 1, ">= 1"), "lr_gamma": (lambda v: 0 < v <= 1, "in (0, 1]")}
    for name, value in values.items():
        ok, rule = valid[name]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise ConfigError(f"model.init_args.{name} must be {rule}, got {value!r}.")


class SegmentationModule(L.LightningModule):
    """Supervised segmentation; the labeled-only baseline as is.

    Args:
        net: any ``nn.Module`` mapping [B, C, *S] -> logits [B, K, *S] (by ``class_path``: lemis nets, MONAI nets).
        num_classes: K, background included.
        lr, momentum, weight_decay: SGD (both published codes: 0.01, 0.9, 1e-4).
        lr_schedule: poly | linear | constant | step, by optimizer step; ``lr_step_size``/``lr_gamma`` for step.
        dice_include_background: SSL4MIS Dice over all classes (True) or UA-MT's foreground-only Dice (False).
        infer_mode: ``slices`` (2D nets: every slice along the first spatial axis resized to ``roi_size``,
            predicted, resized back with nearest neighbour) or ``sliding_window`` (3D nets: MONAI sliding window
            of ``roi_size`` with stride ``sw_stride``, softmax averaged over overlaps).
        empty_convention: ``lemis`` (datasets.md) or ``legacy_zero`` (published scripts).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_schedule: str = "poly",
        poly_power: float = 0.9,
        lr_step_size: int = 2500,
        lr_gamma: float = 0.1,
        dice_include_background: bool = True,
        infer_mode: str = "slices",
        roi_size: tuple[int, ...] = (256, 256),
        sw_stride: tuple[int, ...] | None = None,
        sw_batch_size: int = 4,
        empty_convention: str = "lemis",
    ):
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"model.init_args.lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
        if infer_mode not in INFER_MODES:
            raise ConfigError(f"model.init_args.infer_mode must be one of {INFER_MODES}, got {infer_mode!r}.")
        check_optimizer_options(lr=lr, momentum=momentum, weight_decay=weight_decay, poly_power=poly_power,
                                lr_step_size=lr_step_size, lr_gamma=lr_gamma)
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.roi_size = tuple(roi_size)
        self.sw_stride = tuple(sw_stride) if sw_stride else tuple(max(r // 2, 1) for r in self.roi_size)
        self._rows: list[dict] = []
        self.example: dict | None = None

    # ---- training -------------------------------------------------------------------------------------------
    def supervised_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """0.5 * (CE + Dice) of logits [B, K, *S] and label [B, *S]."""
        return losses.supervised_loss(logits, label, self.hparams.dice_include_background)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Labeled-only step: batch is a plain stream {image [B, C, *S], label [B, *S], case}."""
        batch = batch.get("labeled", batch)
        loss = self.supervised_loss(self.net(batch["image"]), batch["label"])
        self.log_step({"loss/sup": loss})
        return loss

    def log_step(self, metrics: dict) -> None:
        """Training scalars and the LR of this step, handed to Lightning only on the steps its loggers write
        (every ``trainer.log_every_n_steps``). Step-only values logged in between are overwritten unseen, and
        ``self.log`` costs ~1.5 ms a value on 2 CPU cores (py-spy: 3 % of an SGRS step in the benchmark).

        Every file of a run numbers steps alike: step N is the N-th optimizer step, so its losses and LR, the
        validation after it (``metrics.csv``, ``per_case_val.csv``, ``images/val_stepN.png``) and the
        checkpoint of its weights (``best-step=N.ckpt``) all say N. Lightning's own logger step counts from 0,
        hence the explicit ``step``.
        """
        trainer = self._trainer
        if trainer is None:
            return
        if (self.global_step + 1) % trainer.log_every_n_steps and not trainer.should_stop:
            return
        lrs = {"lr" if i == 0 else f"lr/{i}": opt.param_groups[0]["lr"] for i, opt in enumerate(trainer.optimizers)}
        self.log_dict({**metrics, **lrs, "step": float(self.global_step + 1)})

    def configure_optimizers(self):
        hp = self.hparams
        max_steps = self.trainer.max_steps
        optimizer = torch.optim.SGD(self.net.parameters(), lr=hp.lr, momentum=hp.momentum,
                                    weight_decay=hp.weight_decay)
        factor = partial(lr_factor, schedule=hp.lr_schedule, max_steps=max_steps, power=hp.poly_power,
                         step_size=hp.lr_step_size, gamma=hp.lr_gamma)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checks before a run writes anything ----------------------------------------------------------------
    @torch.no_grad()
    def check_setup(self, trainer, datamodule, stage: str) -> None:
        """What a run needs of its trainer and data, checked by the CLI after ``datamodule.setup(stage)`` and
        before the run directory exists: the schedule has a length, the model, its net and the data agree on K,
        and the net takes the data's images (one forward of zeros shaped like one ROI of the stage's first image,
        in eval mode, so no statistics or random state change)."""
        hp = self.hparams
        if stage == "fit" and hp.lr_schedule in ("poly", "linear") and trainer.max_steps <= 0:
            raise ConfigError(f"model.init_args.lr_schedule={hp.lr_schedule} needs trainer.max_steps > 0.")
        k, data_k = self.hparams.num_classes, getattr(datamodule, "num_classes", self.hparams.num_classes)
        if data_k != k:
            raise ConfigError(f"model.init_args.num_classes={k} but data.init_args.num_classes={data_k}: both count "
                              f"the classes of the labels, background included.")
        channels = datamodule.first_image(stage).shape[0]
        x = torch.zeros(1, channels, *self.roi_size)
        training = self.net.training
        self.net.eval()
        try:
            out = self.net(x)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"the net (model.init_args.net) cannot take this data's images {tuple(x.shape)}: "
                              f"{first}") from None
        finally:
            self.net.train(training)
        if out.shape[1] != k:
            raise ConfigError(f"the net (model.init_args.net) outputs {out.shape[1]} channels but "
                              f"model.init_args.num_classes={k}: set the net's number of output classes to {k}.")

    # ---- whole-case inference -------------------------------------------------------------------------------
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(net(x)) over classes, [B, K, *S]."""
        return torch.softmax(self.net(x), dim=1)

    @torch.no_grad()
    def predict_case(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities of one whole case. image [1, C, *S] -> [1, K, *S]."""
        if self.hparams.infer_mode == "slices":
            return self._predict_slices(image)
        overlap = overlap_for_stride(self.roi_size, self.sw_stride)
        return sliding_window_inference(image, self.roi_size, self.hparams.sw_batch_size, self.probabilities,
                                        overlap=overlap, mode="constant")

    def _predict_slices(self, image: torch.Tensor) -> torch.Tensor:
        """[1, C, D, H, W] -> [1, K, D, H, W]: each slice resized (order 0) to roi_size, predicted, resized back.

        Probabilities are resized back with nearest neighbour as well, so argmax equals SSL4MIS's
        order-0 zoom of the predicted label map.
        """
        slices = image[0].movedim(1, 0)  # [D, C, H, W]
        size = tuple(slices.shape[-2:])
        probs = [self.probabilities(zoom_nearest_torch(chunk, self.roi_size))
                 for chunk in slices.split(max(self.hparams.sw_batch_size, 1))]
        probs = zoom_nearest_torch(torch.cat(probs), size)  # [D, K, H, W]
        return probs.movedim(0, 1)[None]

    # ---- evaluation: per-case rows, gathered across ranks ---------------------------------------------------
    def _evaluate_case(self, case: dict, batch_idx: int) -> None:
        pred = self.predict_case(case["image"]).argmax(1)[0].cpu().numpy()
        gt = case["label"][0].cpu().numpy()
        if batch_idx == 0:  # kept for callbacks (ImageLogger) so they need not predict again
            self.example = {"case": case["case"][0], "image": case["image"][0, 0].cpu().numpy(), "label": gt,
                            "prediction": pred}
        spacing = case.get("spacing", [None])[0]
        spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self._rows += case_metrics(pred, gt, self.hparams.num_classes, case["case"][0], spacing,
                                   self._class_names(), self.hparams.empty_convention)

    def _class_names(self):
        dm = getattr(self.trainer, "datamodule", None)
        return getattr(dm, "class_names", None)

    def _gather_rows(self) -> list[dict]:
        """All ranks' rows, de-duplicated by (case, class): distributed samplers pad with repeated cases."""
        rows = self._rows
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        unique = {(r["case"], r["class"]): r for r in rows}
        return sorted(unique.values(), key=lambda r: (r["case"], r["class"]))

    def _finish_evaluation(self, stage: str) -> None:
        rows, self._rows = self._gather_rows(), []
        if not rows:
            return
        summary = summarize(rows)
        for key, value in summary.items():
            if not (isinstance(value, float) and math.isnan(value)):
                self.log(f"{stage}/{key}", float(value), sync_dist=False, rank_zero_only=False)
        self.log("step", float(self.global_step), sync_dist=False, rank_zero_only=False)  # see log_step
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if self.trainer.is_global_zero and log_dir and not self.trainer.sanity_checking:
            step_rows = [{"step": self.global_step, **r} for r in rows]
            write_rows_csv(step_rows, Path(log_dir) / f"per_case_{stage}.csv")
        self.last_summary = {stage: summary}

    def validation_step(self, case: dict, batch_idx: int) -> None:
        self._evaluate_case(case, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def test_step(self, case: dict, batch_idx: int) -> None:
        self._evaluate_case(case, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def predict_step(self, case: dict, batch_idx: int) -> dict:
        """Label map of one case: {"case": id, "prediction": [*S] uint8 on CPU}."""
        pred = self.predict_case(case["image"]).argmax(1)[0].to(torch.uint8).cpu()
        return {"case": case["case"][0], "prediction": pred}
