"""SEMISE: semi-supervised severity representation pre-training (Tran et al. 2025, arXiv 2501.03848;
spec/methods/semise.md; no public code: the objective below is the spec's normative lemis reading).

L = alpha L_NT-Xent + (1 - alpha) (w_margin L_margin + w_rank L_rank): SimCLR's NT-Xent on two views of every
image; a margin contrastive loss pulling healthy-healthy and anomaly-anomaly pairs together and pushing
healthy-anomaly pairs at least ``margin`` apart in cosine distance; a Bradley-Terry ranking loss on a severity
score for pairs of different grades.

This file holds the losses and the pair sampling (checked by the spec's hand-computed examples); the nets
(``SemiseNet``: the SSL4MIS UNet's encoder with a projection and a rank head; ``SeverityNet``: the same encoder
with a linear classifier); ``SemisePretrain``, which writes ``encoder.pt`` into its run directory; the downstream
``SeverityClassifier``; and the chain pre-train -> classify -> segment on ``lemis.stages``:

    python -m lightning_modules.semise runs/semise_seed1 --seed_everything=1 [pretrain:--model.init_args.alpha=1.0]

The segmentation stage loads the encoder into the UNet of any segmentation method through the shared weights
option: ``--model.init_args.init_weights.path=encoder.pt --model.init_args.init_weights.into=encoder``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.transforms import zoom_nearest_torch
from lemis.errors import ConfigError
from lemis.files import atomic_path, run_directory
from lemis.stages import Pipeline, Stage, run_chain, split_overrides
from lightning_modules.nets.unet2d import UNet2D
from lightning_modules.segmentation import SegmentationModule


def nt_xent(z: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's loss. z [2N, d] L2-normalised, the view-1 block then the view-2 block (positives k <-> k + N):
    l_a = -log(exp(sim(a, p)) / sum_{k != a} exp(sim(a, k))), sim = z_a . z_k / tau; the mean over the 2N anchors."""
    n = z.shape[0] // 2
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, positives)


def unordered_pairs(n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) with i < j, i ascending then j ascending."""
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    return i, j


def margin_loss(distance: torch.Tensor, similar: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """1/(2P) sum over pairs of y D^2 + (1 - y) max(0, m - D)^2; distance, similar [P]; no pair -> 0."""
    if distance.numel() == 0:
        return distance.new_zeros(())
    y = similar.to(distance.dtype)
    return (y * distance**2 + (1 - y) * F.relu(margin - distance) ** 2).sum() / (2 * distance.numel())


def healthy_anomaly_loss(z: torch.Tensor, healthy: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The margin loss over every unordered pair of embeddings with known flags: similar = same flag,
    D = 1 - z_i . z_j. z [M, d] normalised; healthy [M] in {0, 1} or -1 (unknown, in no pair)."""
    known = torch.nonzero(healthy >= 0).flatten()
    i, j = unordered_pairs(len(known), z.device)
    i, j = known[i], known[j]
    distance = 1 - (z[i] * z[j]).sum(1)
    return margin_loss(distance, healthy[i] == healthy[j], margin)


def severity_pairs(grade: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs (i, j) with grade_i > grade_j (i the more severe), both known (>= 0); i ascending, then j."""
    g = grade.tolist()
    return [(i, j) for i in range(len(g)) for j in range(len(g)) if g[i] >= 0 and g[j] >= 0 and g[i] > g[j]]


def ranking_loss(score: torch.Tensor, grade: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """Bradley-Terry: mean over ``severity_pairs`` of softplus(-(s_i - s_j)) (= -log sigma(s_i - s_j)); also the
    number of pairs and the fraction ordered correctly (s_i > s_j). No pair -> (0, 0, nan)."""
    pairs = severity_pairs(grade)
    if not pairs:
        return score.new_zeros(()), 0, float("nan")
    i, j = (torch.tensor(idx, device=score.device) for idx in zip(*pairs))
    margin = score[i] - score[j]
    return F.softplus(-margin).mean(), len(pairs), float((margin > 0).float().mean())


def combined_loss(nt: torch.Tensor, margin: torch.Tensor, rank: torch.Tensor, alpha: float = 0.5,
                  w_margin: float = 1.0, w_rank: float = 1.0) -> torch.Tensor:
    """alpha L_nt + (1 - alpha) (w_margin L_margin + w_rank L_rank); alpha = 1 is SimCLR alone (the supervised
    terms contribute exactly 0), alpha = 0 drops NT-Xent."""
    supervised = w_margin * margin + w_rank * rank
    if alpha == 1:
        return nt
    if alpha == 0:
        return supervised
    return alpha * nt + (1 - alpha) * supervised


# ---- nets ---------------------------------------------------------------------------------------------------------

CHANNELS = (16, 32, 64, 128, 256)
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


def unet_encoder(in_channels: int, channels: Sequence[int], dropout: Sequence[float]) -> nn.ModuleList:
    """The down path of the SSL4MIS 2D UNet: the very modules of ``UNet2D(...).encoder``, so its state dict loads
    1:1 into a segmentation net's ``encoder``."""
    return UNet2D(in_channels, 1, channels, dropout).encoder


def pooled(encoder: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """f = GAP(encoder(x)[-1]): x [B, C, H, W] -> [B, channels[-1]]."""
    for stage in encoder:
        x = stage(x)
    return x.mean((2, 3))


class SemiseNet(nn.Module):
    """Encoder f, projection g: Linear(w, w)-ReLU-Linear(w, d) with z = g(f)/||g(f)||, rank head h: Linear(w, 1)
    on f (so the feature reused downstream is ordered by severity while z keeps SimCLR's invariances).

    forward(x [B, C, H, W]) -> {"feature": f [B, w], "z": [B, d], "score": s [B]}."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = CHANNELS,
                 dropout: Sequence[float] = DROPOUT, projection_dim: int = 128):
        super().__init__()
        width = channels[-1]
        self.encoder = unet_encoder(in_channels, channels, dropout)
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, projection_dim))
        self.rank_head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = pooled(self.encoder, x)
        return {"feature": f, "z": F.normalize(self.projection(f), dim=1), "score": self.rank_head(f)[:, 0]}


class SeverityNet(nn.Module):
    """Encoder f, then a linear classifier: forward(x [B, C, H, W]) -> logits [B, num_classes]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, channels: Sequence[int] = CHANNELS,
                 dropout: Sequence[float] = DROPOUT):
        super().__init__()
        self.encoder = unet_encoder(in_channels, channels, dropout)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled(self.encoder, x))


# ---- shared by both modules: setup checks and evaluation on a case's band slices ---------------------------------

class BandSlices(SegmentationModule):
    """What the pre-training and the classifier share: a case is its band slices (the DataModule's cut),
    predicted all at once; a method summarises per patient (both frames of an ACDC patient)."""

    STREAMS: tuple[str, ...] = ()

    def check_setup(self, trainer, datamodule, stage: str) -> None:
        """The schedule, the ROI, the data's streams, and one forward of zeros in eval mode."""
        if stage == "fit":
            self.check_schedule(trainer)
            names = tuple(getattr(datamodule, "stream_names", ()))
            if names != self.STREAMS:
                raise ConfigError(f"{type(self).__name__} trains on the streams {self.STREAMS}, the data gives "
                                  f"{names} (data.init_args.mode).")
        self.resolve_roi(datamodule)
        x = torch.zeros(2, datamodule.first_image(stage).shape[0], *self.roi_size)
        training = self.net.training
        self.net.eval()
        try:
            self.net(x)
        except RuntimeError as err:
            raise ConfigError(f"the net (model.init_args.net) cannot take this data's images {tuple(x.shape)}: "
                              f"{str(err).splitlines()[0]}") from None
        finally:
            self.net.train(training)

    def band_outputs(self, image: torch.Tensor):
        """The net on every slice of a case, each resized (order 0) to ``roi_size``: image [1, C, n, H, W]."""
        slices = zoom_nearest_torch(image[0].movedim(1, 0), self.roi_size)  # [n, C, *roi]
        return self.net(slices)

    def label_map(self, probs: torch.Tensor) -> torch.Tensor:
        """Case-level outputs [1, K] stay as they are (scored by ``score_case``)."""
        return probs

    def case_row(self, case: dict) -> dict:
        return {"case": case["case"][0], "patient": case["patient"][0], "target": int(case["target"][0]),
                "n_slices": int(case["image"].shape[2])}


def per_patient(rows: list[dict], columns: list[str]) -> list[dict]:
    """Rows of the same patient merged: ``columns`` averaged weighted by ``n_slices`` (the mean over all the
    patient's band slices, both frames), ``target`` kept; in patient order."""
    merged: dict[str, dict] = {}
    for row in rows:
        entry = merged.setdefault(row["patient"], {"case": row["patient"], "target": row["target"], "n_slices": 0,
                                                   **{c: 0.0 for c in columns}})
        entry["n_slices"] += row["n_slices"]
        for c in columns:
            entry[c] += row[c] * row["n_slices"]
    for entry in merged.values():
        for c in columns:
            entry[c] /= entry["n_slices"]
    return [merged[p] for p in sorted(merged)]


# ---- pre-training -------------------------------------------------------------------------------------------------

PHASES = ("joint", "two_phase")


class SemisePretrain(BandSlices):
    """SEMISE pre-training (spec sec. 1): L = alpha L_nt + (1 - alpha)(w_margin L_margin + w_rank L_rank).

    Args (beyond SegmentationModule's; ``net`` a ``SemiseNet``): alpha (1: the SimCLR-only baseline, no label is
        used; 0: no NT-Xent); temperature tau; margin m; w_margin, w_rank; phase_schedule ``joint`` or
        ``two_phase`` (w_rank = 0 for the first ``phase1_fraction`` of trainer.max_steps, then w_margin = 0).
    Validation scores each case by its mean rank score s and reports, per patient, the fraction of pairs of
    different grades that s orders (``rank_accuracy``). At fit end ``encoder.pt`` = {"state_dict": the encoder's,
    "meta": {...}} is written into the run directory.
    """

    INFER_MODES = ("band_score",)
    STREAMS = ("unlabeled", "graded")

    def __init__(self, alpha: float = 0.5, temperature: float = 0.5, margin: float = 1.0, w_margin: float = 1.0,
                 w_rank: float = 1.0, phase_schedule: str = "joint", phase1_fraction: float = 0.5, **kwargs):
        kwargs.setdefault("num_classes", 1)  # one score a case; no segmentation classes
        kwargs.setdefault("infer_mode", "band_score")
        super().__init__(**kwargs)
        if not 0 <= alpha <= 1:
            raise ConfigError(f"model.init_args.alpha must be in [0, 1], got {alpha}.")
        if phase_schedule not in PHASES:
            raise ConfigError(f"model.init_args.phase_schedule must be one of {PHASES}, got {phase_schedule!r}.")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])

    def phase_weights(self) -> tuple[float, float]:
        """(w_margin, w_rank) of this step: both (joint); w_rank := 0 in the first phase, w_margin := 0 after."""
        hp = self.hparams
        if hp.phase_schedule == "joint":
            return hp.w_margin, hp.w_rank
        total = self.trainer.max_steps if self._trainer is not None else -1
        first = total <= 0 or self.global_step < hp.phase1_fraction * total
        return (hp.w_margin, 0.0) if first else (0.0, hp.w_rank)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """u: {image, view2 [B_u, C, H, W]}; g: {image, view2 [B_g, C, H, W], grade [B_g], healthy [B_g]}.

        One encoder pass over X = [u.v1, g.v1, u.v2, g.v2] (2N = 2(B_u + B_g) images; positives k <-> k + N);
        the margin loss on z and the ranking loss on s over the 2 B_g graded rows (both views)."""
        u, g = batch["unlabeled"], batch["graded"]
        n_u, n_g = len(u["image"]), len(g["image"])
        out = self.net(torch.cat([u["image"], g["image"], u["view2"], g["view2"]]))
        rows = torch.cat([torch.arange(n_u, n_u + n_g), torch.arange(2 * n_u + n_g, 2 * (n_u + n_g))])
        z, score = out["z"][rows], out["score"][rows]
        grade, healthy = g["grade"].repeat(2), g["healthy"].repeat(2)
        alpha = self.hparams.alpha
        nt = nt_xent(out["z"], self.hparams.temperature) if alpha > 0 else out["z"].new_zeros(())
        if alpha < 1:
            margin = healthy_anomaly_loss(z, healthy, self.hparams.margin)
            rank, n_pairs, accuracy = ranking_loss(score, grade)
        else:  # SimCLR only: the labels are not used at all
            margin, rank, n_pairs, accuracy = z.new_zeros(()), z.new_zeros(()), 0, float("nan")
        w_margin, w_rank = self.phase_weights()
        loss = combined_loss(nt, margin, rank, alpha, w_margin, w_rank)
        # every head stays in the graph (gradient 0 where its term is off), so DDP reduces every parameter
        loss = loss + 0.0 * (out["score"].sum() + out["z"].sum())
        self.log_step({"loss/total": loss, "loss/nt_xent": nt, "loss/margin": margin, "loss/rank": rank,
                       "loss/supervised": (1 - alpha) * (w_margin * margin + w_rank * rank),
                       "rank/n_pairs": float(n_pairs), "rank/accuracy": accuracy,
                       "graded/healthy_fraction": (g["healthy"] == 1).float().mean()})
        return loss

    # ---- evaluation: the rank score of each case -----------------------------------------------------------
    def _predict_band_score(self, image: torch.Tensor) -> torch.Tensor:
        """[1, C, n, H, W] -> [1, 1]: the mean rank score s over the case's slices."""
        return self.band_outputs(image)["score"].mean().view(1, 1)

    def score_case(self, pred: np.ndarray, gt: np.ndarray, case: dict, probs: torch.Tensor) -> list[dict]:
        return [{**self.case_row(case), "score": float(probs[0, 0])}]

    def summarize_rows(self, rows: list[dict]) -> dict:
        """Per patient: mean score; over the pairs of patients of different grades (i more severe), the fraction
        with s_i > s_j (``rank_accuracy``, NaN without a pair)."""
        patients = per_patient(rows, ["score"])
        pairs = [(a, b) for a in patients for b in patients if a["target"] > b["target"] >= 0]
        ordered = [a["score"] > b["score"] for a, b in pairs]
        return {"rank_accuracy": float(np.mean(ordered)) if pairs else float("nan"), "n_pairs": len(pairs),
                "score/mean": float(np.mean([p["score"] for p in patients])), "n_cases": len(patients)}

    # ---- the encoder file ---------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        log_dir = run_directory(self.trainer)  # a collective: every rank calls it
        if self.trainer.is_global_zero and log_dir is not None:
            save_encoder(self.net.encoder, log_dir / "encoder.pt", self.encoder_meta())

    def encoder_meta(self) -> dict:
        data = getattr(self.trainer, "datamodule", None)
        return {"alpha": float(self.hparams.alpha), "temperature": float(self.hparams.temperature),
                "steps": int(self.global_step), "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),
                "patch_size": list(getattr(data, "patch_size", ())),
                "graded_cases": list(getattr(data, "graded", []))}


def save_encoder(encoder: nn.Module, path: Path, meta: dict) -> None:
    """{"state_dict": the encoder's tensors on the CPU, "meta": meta}, written atomically."""
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "meta": meta}, tmp)


# ---- downstream: severity classifier ------------------------------------------------------------------------------

class SeverityClassifier(BandSlices):
    """Encoder + linear head on single slices, class-weighted CE (spec sec. 4a); a patient's prediction is the
    argmax of the mean softmax over its band slices of both frames.

    Args (beyond SegmentationModule's; ``net`` a ``SeverityNet``, ``num_classes`` its K): freeze_encoder (a
        linear probe: encoder fixed, BatchNorm and dropout in eval mode); encoder_lr: the encoder's learning rate
        when it trains (unset: the optimizer's); class_balanced: CE weights w_k ∝ 1/(training slices of class k),
        mean 1 over the classes present; ordinal: the target is a grade, so MAE and MAEE are reported.
    Pre-trained weights: ``init_weights: {path: encoder.pt, into: encoder}``.
    """

    INFER_MODES = ("slice_mean",)
    STREAMS = ("labeled",)

    def __init__(self, freeze_encoder: bool = False, encoder_lr: float | None = 1e-4, class_balanced: bool = True,
                 ordinal: bool = True, **kwargs):
        kwargs.setdefault("num_classes", 3)
        kwargs.setdefault("infer_mode", "slice_mean")
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.net.encoder.requires_grad_(not freeze_encoder)
        self.class_weights: torch.Tensor | None = None

    def check_setup(self, trainer, datamodule, stage: str) -> None:
        super().check_setup(trainer, datamodule, stage)
        if not hasattr(datamodule, "num_targets"):
            raise ConfigError(f"SeverityClassifier needs severity targets: data.class_path "
                              f"datamodules.severity.ACDCSeverityDataModule (mode: classify), not "
                              f"{type(datamodule).__name__}.")
        k, data_k = self.hparams.num_classes, datamodule.num_targets()
        if k != data_k:
            raise ConfigError(f"model.init_args.num_classes={k} but the data's target ({datamodule.target}) has "
                              f"{data_k} classes; set both (and the net's num_classes) to {data_k}.")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.class_balanced:
            self.class_weights = balanced_weights(self.trainer.datamodule.class_counts())

    def param_groups(self):
        """The head; the encoder too (at ``encoder_lr``) unless frozen."""
        head = {"params": list(self.net.head.parameters())}
        if self.hparams.freeze_encoder:
            return [head]
        encoder = {"params": list(self.net.encoder.parameters())}
        if self.hparams.encoder_lr is not None:
            encoder["lr"] = self.hparams.encoder_lr
        return [encoder, head]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """{image [B, C, H, W], target [B]} -> weighted CE of the logits [B, K]."""
        batch = batch.get("labeled", batch)
        if self.hparams.freeze_encoder:  # Lightning sets train mode after every validation
            self.net.encoder.eval()
        logits = self.net(batch["image"])
        weight = None if self.class_weights is None else self.class_weights.to(logits)
        loss = F.cross_entropy(logits, batch["target"], weight=weight)
        accuracy = (logits.argmax(1) == batch["target"]).float().mean()
        self.log_step({"loss/ce": loss, "train/accuracy": accuracy})
        return loss

    # ---- evaluation ------------------------------------------------------------------------------------------
    def _predict_slice_mean(self, image: torch.Tensor) -> torch.Tensor:
        """[1, C, n, H, W] -> [1, K]: the softmax averaged over the case's slices."""
        return torch.softmax(self.band_outputs(image), dim=1).mean(0, keepdim=True)

    def score_case(self, pred: np.ndarray, gt: np.ndarray, case: dict, probs: torch.Tensor) -> list[dict]:
        """One row a case (an ACDC frame): its target, slice count and mean class probabilities."""
        return [{**self.case_row(case), **{f"prob/{k}": float(p) for k, p in enumerate(probs[0].tolist())}}]

    def summarize_rows(self, rows: list[dict]) -> dict:
        """Per patient (both frames): prediction = argmax of the mean softmax; macro F1 / recall, accuracy,
        MAE / MAEE (ordinal) and the confusion matrix over patients."""
        k = self.hparams.num_classes
        patients = per_patient(rows, [f"prob/{c}" for c in range(k)])
        target = np.array([p["target"] for p in patients])
        pred = np.array([int(np.argmax([p[f"prob/{c}"] for c in range(k)])) for p in patients])
        return {**classification_summary(target, pred, k, self.hparams.ordinal), "n_cases": len(patients)}


def balanced_weights(counts: Sequence[int]) -> torch.Tensor:
    """w_k = (1/n_k) / mean over present classes of 1/n_j (mean 1); 0 for a class with no item."""
    n = torch.tensor(counts, dtype=torch.float32)
    inverse = torch.where(n > 0, 1 / n.clamp(min=1), torch.zeros_like(n))
    return inverse / inverse[n > 0].mean()


def classification_summary(target: np.ndarray, pred: np.ndarray, k: int, ordinal: bool = True) -> dict:
    """Macro F1 and recall over the labels 0..k-1 (a label without support or prediction scores 0: sklearn's
    zero_division=0 with explicit labels; torchmetrics' macro drops such labels instead), accuracy, the
    confusion matrix (``confusion/<true><predicted>``) and, for an ordinal target, MAE = mean |pred - target|
    and MAEE = mean exp(|pred - target|) (1 = perfect)."""
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (target, pred), 1)
    tp, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(k), where=support + predicted > 0)  # 2TP/(2TP+FP+FN)
    summary = {"f1": float(f1.mean()), "recall": float(recall.mean()), "accuracy": float(np.mean(target == pred))}
    if ordinal:
        error = np.abs(pred - target)
        summary.update(mae=float(error.mean()), maee=float(np.exp(error).mean()))
    summary.update({f"confusion/{t}{p}": int(confusion[t, p]) for t in range(k) for p in range(k)})
    return summary


# ---- the chain: pre-train -> classify and segment (lemis.stages) -------------------------------------------------

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "acdc"
CHAIN = {"pretrain": EXPERIMENTS / "semise_pretrain.yaml", "classify": EXPERIMENTS / "semise_classify.yaml",
         "segment": EXPERIMENTS / "semise_segment.yaml"}
DOWNSTREAM_OUTPUTS = ("per_case_val.csv", "summary.json")


def fit(config: Path, folder: Path, overrides: list[str]):
    """``lemis fit --config config`` with its run directory under ``folder``; returns the CLI object."""
    from experiments.cli import LemisCLI  # the CLI imports every module: imported when a chain runs

    return LemisCLI(args=["fit", "--config", str(config), *overrides,
                          f"--trainer.logger.init_args.save_dir={folder}"])


def pretrain_stage(config: Path, overrides: list[str]):
    def run(folder: Path, inputs: dict[str, Path]) -> None:
        cli = fit(config, folder, overrides)
        with atomic_path(folder / "encoder.pt") as tmp:
            shutil.copyfile(Path(cli.trainer.log_dir) / "encoder.pt", tmp)
    return run


def downstream_stage(config: Path, overrides: list[str]):
    """A downstream fit from the pre-trained encoder (``init_weights`` into the net's ``encoder``); its
    ``per_case_val.csv`` and last validation summary copied into the stage folder."""
    def run(folder: Path, inputs: dict[str, Path]) -> None:
        encoder = inputs["pretrain"] / "encoder.pt"
        cli = fit(config, folder, [f"--model.init_args.init_weights.path={encoder}",
                                   "--model.init_args.init_weights.into=encoder", *overrides])
        with atomic_path(folder / "per_case_val.csv") as tmp:
            shutil.copyfile(Path(cli.trainer.log_dir) / "per_case_val.csv", tmp)
        with atomic_path(folder / "summary.json") as tmp:
            tmp.write_text(json.dumps(cli.model.last_summary, indent=1, sort_keys=True))
    return run


def chain(root: str | Path, overrides: dict[str, list[str]], configs: dict[str, Path] = CHAIN) -> Pipeline:
    """pretrain (writes encoder.pt) -> classify, segment (each reads it); ``overrides``: {"common" | stage:
    [--key=value, ...]}, the common ones first."""
    def args(name: str) -> list[str]:
        return [*overrides.get("common", []), *overrides.get(name, [])]
    return Pipeline([Stage("pretrain", pretrain_stage(configs["pretrain"], args("pretrain")), outputs=("encoder.pt",)),
                     Stage("classify", downstream_stage(configs["classify"], args("classify")), ("pretrain",),
                           DOWNSTREAM_OUTPUTS),
                     Stage("segment", downstream_stage(configs["segment"], args("segment")), ("pretrain",),
                           DOWNSTREAM_OUTPUTS)], root)


def main(argv: list[str] | None = None) -> int:
    """Run the chain; 0 when every stage is done or skipped, 2 with one sentence for bad input."""
    from experiments.__main__ import wandb_offline_without_key

    parser = argparse.ArgumentParser(prog="python -m lightning_modules.semise",
                                     description="SEMISE: pre-train, then classify and segment from the encoder.")
    parser.add_argument("root", help="the chain's folder: one sub-folder a stage, skipped when done")
    for name, config in CHAIN.items():
        parser.add_argument(f"--{name}_config", default=str(config), help=f"the {name} experiment YAML")
    known, extra = parser.parse_known_args(argv)
    wandb_offline_without_key()
    configs = {name: Path(getattr(known, f"{name}_config")) for name in CHAIN}
    return run_chain(lambda: chain(known.root, split_overrides(extra, CHAIN), configs))


if __name__ == "__main__":
    sys.exit(main())
