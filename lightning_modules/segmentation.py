"""SegmentationModule: the network, the supervised loss, the optimizer/LR schedule and whole-case evaluation.

Every method subclasses this and overrides ``training_step``; inference and metrics exist once, here. Its seams
(each one overridable method or one option): the optimizer and scheduler are injected (``param_groups`` says what
they optimise), ``logits`` maps a tuple/dict net output to the evaluated logits, ``label_map`` post-processes,
``score_case`` scores, ``summarize_rows`` summarises the rows, ``INFER_MODES`` lists ``_predict_<mode>`` methods,
``init_weights`` loads a file into the net (or one of its submodules) before any callback copies it. What
callbacks read from a module is declared in ``lightning_modules.contracts``.
"""
from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from monai.inferers import sliding_window_inference
from torch import nn

from datamodules.transforms import zoom_nearest_torch
from lemis.errors import ConfigError
from lemis.files import run_directory
from lightning_modules import losses
from lightning_modules.metrics import case_metrics, summarize, write_rows_csv
from lightning_modules.schedules import Poly

INFER_MODES = ("slices", "sliding_window")  # SegmentationModule._predict_<mode>; a method adds its own
POSTPROCESS = ("argmax", "threshold")
LR_INTERVALS = ("step", "epoch")


def overlap_for_stride(roi_size: tuple[int, ...], stride: tuple[int, ...]) -> list[float]:
    """Per-axis MONAI overlap whose scan interval int(roi * (1 - overlap)) equals ``stride`` exactly.

    MONAI then places windows at min(i * stride, size - roi), which is UA-MT's test_util placement; half a
    voxel of slack keeps float rounding from giving stride - 1; a stride >= roi means no overlap.
    """
    return [max(1.0 - (s + 0.5) / r, 0.0) for r, s in zip(roi_size, stride)]


def published_sgd(params) -> torch.optim.Optimizer:
    """Both published codes' optimizer: SGD, lr 0.01, momentum 0.9, weight decay 1e-4."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)


@dataclass
class WeightsFile:
    """Weights loaded into the net when the module is built, before any callback copies it (a teacher).

    path: a state dict or a Lightning checkpoint (its ``state_dict``); prefix: keep the keys that start with it,
    stripped (``net.`` takes a lemis checkpoint's student); strict: every key must match; sha256: the file's
    digest, checked when given; into: the submodule of the net that receives the weights (``encoder``: a
    pre-trained encoder into the UNet's down path; unset: the whole net)."""

    path: str
    prefix: str = ""
    strict: bool = True
    sha256: str | None = None
    into: str = ""


def load_weights(net: nn.Module, spec: WeightsFile, option: str = "model.init_args.init_weights") -> None:
    """``spec`` into ``net``; one sentence naming the file for a missing or damaged file, a digest or key mismatch."""
    path = Path(spec.path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found ({option}.path).")
    if spec.sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != spec.sha256.lower():
            raise ConfigError(f"weights file {path} has sha256 {digest}, {option}.sha256 says {spec.sha256}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged or foreign files
        raise ConfigError(f"cannot read weights file {path} ({type(err).__name__}).") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} holds no state dict ({option}).")
    if spec.prefix:
        state = {k[len(spec.prefix):]: v for k, v in state.items() if k.startswith(spec.prefix)}
        if not state:
            raise ConfigError(f"weights file {path} has no key starting with {spec.prefix!r} ({option}.prefix).")
    try:
        target = net.get_submodule(spec.into)
    except AttributeError:
        raise ConfigError(f"the net has no submodule {spec.into!r} to load {path} into ({option}.into).") from None
    try:
        target.load_state_dict(state, strict=spec.strict)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ConfigError(f"weights file {path} does not fit the net (model.init_args.net): {detail}") from None


def wants_total_steps(factory) -> bool:
    """Whether a scheduler factory (a class, or jsonargparse's partial of one) takes ``total_steps`` and the
    config left it unset."""
    target = factory
    if isinstance(factory, partial):  # jsonargparse's: partial(helper, instantiator, SchedulerClass, **init_args)
        if "total_steps" in factory.keywords:
            return factory.keywords["total_steps"] is None
        target = next((a for a in factory.args if isinstance(a, type)), factory.func)
    try:
        return "total_steps" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


class SegmentationModule(L.LightningModule):
    """Supervised segmentation; the labeled-only baseline as is.

    Args:
        net: any ``nn.Module`` mapping [B, C, *S] to logits [B, K, *S], or to a tuple/dict that ``logits`` maps
            to them (by ``class_path``: lemis nets, MONAI nets).
        num_classes: K, background included.
        optimizer: a callable params -> optimizer (a YAML's ``class_path: torch.optim.SGD`` with ``init_args``);
            unset: SGD 0.01 / 0.9 / 1e-4 (``published_sgd``). It optimises ``param_groups()``.
        lr_scheduler: a callable optimizer -> scheduler (``lightning_modules.schedules``: Poly, StepDecay,
            Constant, WarmupCosine, or any torch scheduler); its ``total_steps`` comes from the trainer when
            unset; unset: ``Poly(power=0.9)``. lr_interval: the scheduler steps every optimizer ``step`` or
            every ``epoch``.
        init_weights: a ``WeightsFile`` loaded into the net now (pre-trained encoders, a previous stage).
        dice_include_background: SSL4MIS Dice over all classes (True) or UA-MT's foreground-only Dice (False).
        infer_mode: ``slices`` (2D nets: every slice along the first spatial axis resized to ``roi_size``,
            predicted, resized back with nearest neighbour) or ``sliding_window`` (3D nets: MONAI sliding window
            of ``roi_size`` with stride ``sw_stride``, softmax averaged over overlaps).
        roi_size: inference window; unset: the data's training patch (``data.init_args.patch_size``).
        postprocess: ``argmax`` of the class probabilities, or ``threshold``: the most likely foreground class
            where its probability exceeds ``threshold``, background elsewhere.
        empty_convention: ``lemis`` (datasets.md) or ``legacy_zero`` (published scripts).
    """

    INFER_MODES = INFER_MODES
    SUPPORTS_IGNORE = True  # whether every loss of the method leaves out the data's ignore label

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_interval: str = "step",
        init_weights: WeightsFile | None = None,
        dice_include_background: bool = True,
        infer_mode: str = "slices",
        roi_size: tuple[int, ...] | None = None,
        sw_stride: tuple[int, ...] | None = None,
        sw_batch_size: int = 4,
        postprocess: str = "argmax",
        threshold: float = 0.5,
        empty_convention: str = "lemis",
    ):
        super().__init__()
        for name, value, allowed in (("infer_mode", infer_mode, self.INFER_MODES), ("postprocess", postprocess,
                                      POSTPROCESS), ("lr_interval", lr_interval, LR_INTERVALS)):
            if value not in allowed:
                raise ConfigError(f"model.init_args.{name} must be one of {allowed}, got {value!r}.")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        if init_weights is not None:
            load_weights(net, init_weights)
        self.net = net
        self.optimizer_factory = optimizer or published_sgd
        self.scheduler_factory = lr_scheduler or partial(Poly, power=0.9)
        self.roi_size = tuple(roi_size) if roi_size else None
        self.sw_stride = tuple(sw_stride) if sw_stride else None
        self._rows: list[dict] = []
        self.ignore_index: int | None = None  # the data's ignore label, taken at setup (datamodule.ignore_index)
        self.example: dict | None = None
        self.last_summary: dict = {}

    # ---- training -------------------------------------------------------------------------------------------
    def logits(self, output) -> torch.Tensor:
        """The logits [B, K, *S] that are trained by the supervised loss and evaluated, from the net's output: the
        tensor itself, ``output["logits"]`` of a dict, ``output[0]`` of a tuple. A method whose net has several
        heads overrides this (its own loss reads the other entries)."""
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, dict):
            return output["logits"]
        return output[0]

    def supervised_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """0.5 * (CE + Dice) of logits [B, K, *S] and label [B, *S]."""
        return losses.supervised_loss(logits, label, self.hparams.dice_include_background, self.ignore_index)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Labeled-only step: batch is a plain stream {image [B, C, *S], label [B, *S], case}."""
        batch = batch.get("labeled", batch)
        loss = self.supervised_loss(self.logits(self.net(batch["image"])), batch["label"])
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

    def param_groups(self):
        """What the optimizer optimises: the net's parameters; a method with two nets or two learning rates
        returns its own groups (``[{"params": ..., "lr": ...}, ...]``)."""
        return self.net.parameters()

    def schedule_length(self, trainer) -> int | None:
        """Scheduler steps in the run: ``trainer.max_steps`` by step, ``trainer.max_epochs`` by epoch."""
        total = trainer.max_steps if self.hparams.lr_interval == "step" else trainer.max_epochs
        return total if total and total > 0 else None

    def build_optimizer(self, total: int | None):
        """(optimizer, scheduler) from the injected factories; the scheduler gets ``total_steps`` when it takes
        one and the config leaves it unset."""
        optimizer = self.optimizer_factory(self.param_groups())
        kwargs = {"total_steps": total} if wants_total_steps(self.scheduler_factory) else {}
        return optimizer, self.scheduler_factory(optimizer, **kwargs)

    def configure_optimizers(self):
        optimizer, scheduler = self.build_optimizer(self.schedule_length(self.trainer))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.lr_interval}}

    # ---- checks before a run writes anything ----------------------------------------------------------------
    @torch.no_grad()
    def check_setup(self, trainer, datamodule, stage: str) -> None:
        """What a run needs of its trainer and data, checked by the CLI after ``datamodule.setup(stage)`` and
        before the run directory exists: the schedule has a length, the model, its net and the data agree on K,
        and the net takes the data's images (one forward of zeros shaped like one ROI of the stage's first image,
        in eval mode, so no statistics or random state change)."""
        if stage == "fit":
            self.check_schedule(trainer)
        self.resolve_roi(datamodule)
        self.take_ignore_index(datamodule)
        k, data_k = self.hparams.num_classes, getattr(datamodule, "num_classes", self.hparams.num_classes)
        if data_k != k:
            raise ConfigError(f"model.init_args.num_classes={k} but data.init_args.num_classes={data_k}: both count "
                              f"the classes of the labels, background included.")
        channels = datamodule.first_image(stage).shape[0]
        x = torch.zeros(1, channels, *self.roi_size)
        training = self.net.training
        self.net.eval()
        try:
            out = self.logits(self.net(x))
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"the net (model.init_args.net) cannot take this data's images {tuple(x.shape)}: "
                              f"{first}") from None
        finally:
            self.net.train(training)
        if out.shape[1] != k:
            raise ConfigError(f"the net (model.init_args.net) outputs {out.shape[1]} channels but "
                              f"model.init_args.num_classes={k}: set the net's number of output classes to {k}.")

    def check_schedule(self, trainer) -> None:
        """The optimizer and scheduler, built once on the side: a bad value fails here, not after the run
        directory exists."""
        try:
            self.build_optimizer(self.schedule_length(trainer))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.init_args.optimizer / lr_scheduler: {err}.") from None

    # ---- whole-case inference -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.resolve_roi(datamodule, required=False)  # loaders without data: later
        self.take_ignore_index(datamodule)

    def take_ignore_index(self, datamodule) -> None:
        """The data's ignore label (voxels no loss or metric sees), refused for a method whose losses would
        train on it."""
        self.ignore_index = getattr(datamodule, "ignore_index", None)
        if self.ignore_index is not None and not self.SUPPORTS_IGNORE:
            raise ConfigError(f"{type(self).__name__} does not support an ignore label (label "
                              f"{self.ignore_index} of the data): use a method that does, or relabel those voxels.")

    def resolve_roi(self, datamodule, required: bool = True) -> None:
        """An unset ``roi_size`` is the data's training patch (said once); an unset stride half of it."""
        if self.roi_size is None:
            patch = getattr(datamodule, "patch_size", None)
            if patch is None and not required:
                return
            if patch is None:
                raise ConfigError("model.init_args.roi_size is unset and the data has no patch_size: set "
                                  "model.init_args.roi_size.")
            self.roi_size = tuple(patch)
            rank_zero_info(f"lemis: inference ROI {self.roi_size} = data.init_args.patch_size "
                           f"(model.init_args.roi_size unset).")
        if self.sw_stride is None:
            self.sw_stride = tuple(max(r // 2, 1) for r in self.roi_size)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """softmax over classes of the net's logits, [B, K, *S]."""
        return torch.softmax(self.logits(self.net(x)), dim=1)

    def label_map(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, K, *S] probabilities -> [B, *S] labels by ``postprocess``."""
        if self.hparams.postprocess == "argmax":
            return probs.argmax(1)
        best, label = probs[:, 1:].max(1)
        return torch.where(best > self.hparams.threshold, label + 1, torch.zeros_like(label))

    @torch.no_grad()
    def predict_case(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities of one whole case by ``infer_mode``. image [1, C, *S] -> [1, K, *S]."""
        if self.roi_size is None:
            self.resolve_roi(getattr(self._trainer, "datamodule", None) if self._trainer else None)
        return getattr(self, f"_predict_{self.hparams.infer_mode}")(image)

    def _predict_sliding_window(self, image: torch.Tensor) -> torch.Tensor:
        """[1, C, *S] -> [1, K, *S]: MONAI sliding window of ``roi_size`` at stride ``sw_stride``, softmax
        averaged where windows overlap."""
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
        probs = self.predict_case(case["image"])
        pred = self.label_map(probs)[0].cpu().numpy()
        gt = case["label"][0].cpu().numpy()
        if self.ignore_index is not None:  # ignored voxels score as background in both maps: in no class
            ignored = gt == self.ignore_index
            pred, gt = np.where(ignored, 0, pred), np.where(ignored, 0, gt)
        if batch_idx == 0:  # kept for callbacks (ImageLogger) so they need not predict again
            self.example = {"case": case["case"][0], "image": case["image"][0, 0].cpu().numpy(), "label": gt,
                            "prediction": pred}
        self._rows += self.score_case(pred, gt, case, probs)

    def score_case(self, pred: np.ndarray, gt: np.ndarray, case: dict, probs: torch.Tensor) -> list[dict]:
        """Rows of one evaluated case (label maps [*S]; ``case`` the evaluation batch; ``probs`` [1, K', *S] what
        ``predict_case`` returned, for a method that scores more than the label map): one per foreground class
        with Dice, Jaccard, HD95, ASD, ASSD in voxels and mm. A method scoring otherwise (per image, per case
        class) returns its own rows: ``case`` and numeric columns, plus ``class`` when there are several rows a
        case; ``summarize`` averages every numeric column."""
        spacing = case.get("spacing", [None])[0]
        spacing = None if spacing is None else tuple(float(s) for s in spacing)
        return case_metrics(pred, gt, self.hparams.num_classes, case["case"][0], spacing, self._class_names(),
                            self.hparams.empty_convention)

    def summarize_rows(self, rows: list[dict]) -> dict:
        """The logged summary of one evaluation's rows (all ranks'): ``metrics.summarize``, the mean of every
        numeric column. A scorer whose metrics are not means of per-case values (macro F1 over cases) returns
        its own summary, with ``n_cases``."""
        return summarize(rows)

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
        unique = {(r["case"], str(r.get("class", ""))): r for r in rows}
        return [unique[key] for key in sorted(unique)]

    def _finish_evaluation(self, stage: str) -> None:
        rows, self._rows = self._gather_rows(), []
        if not rows:
            return
        summary = self.summarize_rows(rows)
        for key, value in summary.items():
            if not (isinstance(value, float) and math.isnan(value)):
                self.log(f"{stage}/{key}", float(value), sync_dist=False, rank_zero_only=False)
        self.log("step", float(self.global_step), sync_dist=False, rank_zero_only=False)  # see log_step
        log_dir = run_directory(self.trainer)
        if self.trainer.is_global_zero and log_dir and not self.trainer.sanity_checking:
            step_rows = [{"step": self.global_step, **r} for r in rows]
            write_rows_csv(step_rows, log_dir / f"per_case_{stage}.csv")
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
        """Label map of one case: {"case": id, "prediction": [*S] uint8 on CPU}, plus the case's geometry
        (``affine``, ``axes``, ``crop``, ``spacing``) where its DataModule gives it, for a writer to keep."""
        pred = self.label_map(self.predict_case(case["image"]))[0].to(torch.uint8).cpu()
        geometry = {key: case[key][0] for key in ("affine", "axes", "crop", "spacing") if key in case}
        return {"case": case["case"][0], "prediction": pred, **geometry}
