"""A method defined entirely in this file, with no edit to any shared file (issue "Open the spine"): a net with a
tuple output, Adam with warm-up + cosine by epoch, a DataModule reading NIfTI with a third stream, a per-case
scorer of its own. It runs fit / validate / test / predict through the CLI, resumes bit-exact after SIGKILL, and
evaluates the same on two DDP ranks as on one."""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from datamodules.base import SegmentationDataModule
from datamodules.readers import NiftiReader, read_list
from datamodules.streams import Stream
from datamodules.transforms import random_crop
from lightning_modules.segmentation import SegmentationModule
from tests.test_resume import KILL, identical

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3  # 3 unlabeled training cases at batch 1: 3 steps an epoch, 9 in all


# ---- the data: NIfTI volumes, a third stream -------------------------------------------------------------------
def make_nifti_dataset(root: Path, n: int = 6) -> Path:
    """``imagesTr/{case}_0000.nii.gz`` (one channel), ``labelsTr/{case}.nii.gz``: a bright ball on noise,
    spacing (1, 1, 2) mm; ``train.list`` and ``val.list``."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (20, 20, 10)], indexing="ij"), -1)
    cases = [f"case{i}" for i in range(n)]
    for case in cases:
        centre, radius = rng.uniform([7, 7, 3], [13, 13, 7]), rng.uniform(3, 5)
        label = (np.linalg.norm((grid - centre) * [1, 1, 2], axis=-1) < radius).astype(np.uint8)
        image = (label * 2.0 + rng.normal(0, 0.5, label.shape)).astype(np.float32)
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"{case}.nii.gz"))
    (root / "train.list").write_text("\n".join(cases[:5]) + "\n")
    (root / "val.list").write_text("\n".join(cases[4:]) + "\n")
    return root


class NiftiThreeStreams(SegmentationDataModule):
    """Labeled, unlabeled and an ``extra`` stream (the labeled cases again, images only) of 3D NIfTI patches."""

    train_list = "train.list"
    reader = NiftiReader()
    class_names = ("ball",)

    def __init__(self, root: str, labeled: int = 2, num_classes: int = 2, **kwargs):
        super().__init__(root=root, num_classes=num_classes, labeled=labeled, **kwargs)

    @property
    def stream_names(self):
        return ("labeled", "unlabeled", "extra")

    def streams(self):
        labeled, unlabeled = super().streams()
        return [labeled, unlabeled, Stream("extra", labeled.items, ("image",), 1)]

    def train_units(self):
        return [(c, c) for c in read_list(self.root / self.train_list)]

    def train_path(self, item: str):
        return {"image": [self.root / "imagesTr" / f"{item}_0000.nii.gz"],
                "label": self.root / "labelsTr" / f"{item}.nii.gz"}

    case_path = train_path

    def train_sample(self, data: dict, item: str) -> dict:
        image, label = random_crop(data["image"][0], data.get("label"), self.patch_size)
        sample = {"image": torch.from_numpy(np.ascontiguousarray(image))[None], "case": item}
        if label is not None:
            sample["label"] = torch.from_numpy(label.astype(np.int64))
        return sample

    def eval_case(self, data: dict, case: str) -> dict:
        out = {"image": torch.from_numpy(data["image"].astype(np.float32)), "case": case,
               "spacing": data["attrs"]["spacing"]}
        if "label" in data:
            out["label"] = torch.from_numpy(data["label"].astype(np.int64))
        return out


# ---- the method: a two-headed net, three streams, a per-case scorer ------------------------------------------------
class TwoHeadNet(nn.Module):
    """(segmentation logits [B, 2, *S], foreground-fraction regression [B]) from a 3-layer 3D conv net."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, channels, 3, padding=1), nn.BatchNorm3d(channels), nn.ReLU(),
                                  nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU())
        self.seg = nn.Conv3d(channels, 2, 1)
        self.frac = nn.Linear(channels, 1)

    def forward(self, x):
        features = self.body(x)
        return self.seg(features), self.frac(features.mean((2, 3, 4)))[:, 0]


class ExampleMethod(SegmentationModule):
    """L = L_sup(labeled) + 0.1 (foreground-fraction head on ``extra`` vs its segmentation) + 0.01 entropy of the
    unlabeled predictions; scored per case by foreground Dice and the predicted/true volume ratio."""

    def training_step(self, batch, batch_idx):
        lab, unl, extra = batch["labeled"], batch["unlabeled"], batch["extra"]
        loss_sup = self.supervised_loss(self.logits(self.net(lab["image"])), lab["label"])
        seg, frac = self.net(extra["image"])
        loss_frac = F.mse_loss(frac, torch.softmax(seg, 1)[:, 1].mean((1, 2, 3)).detach())
        p = torch.softmax(self.logits(self.net(unl["image"])), 1)
        loss_ent = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
        loss = loss_sup + 0.1 * loss_frac + 0.01 * loss_ent
        self.log_step({"loss/sup": loss_sup, "loss/frac": loss_frac, "loss/ent": loss_ent, "loss/total": loss})
        return loss

    def score_case(self, pred, gt, case, probs):
        p, g = pred == 1, gt == 1
        return [{"case": case["case"][0], "fg_dice": float(2 * (p & g).sum() / max(p.sum() + g.sum(), 1)),
                 "volume_ratio": float(p.sum() / max(g.sum(), 1))}]


def config(tmp_path: Path, root: Path) -> Path:
    cfg = {
        "seed_everything": 7,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": EPOCHS, "max_steps": -1,
                    "check_val_every_n_epoch": 1, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "deterministic": True,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "example"}},
                    "callbacks": [{"class_path": "callbacks.guards.NonFiniteGuard"},
                                  {"class_path": "callbacks.prediction_writer.PredictionWriter"},
                                  {"class_path": "callbacks.rng_state.RNGState"},
                                  {"class_path": "tests.test_resume.KillAt"},
                                  {"class_path": "callbacks.checkpoint.ResumableCheckpoint",
                                   "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1}},
                                  {"class_path": "callbacks.checkpoint.ResumableCheckpoint",  # best, by epoch
                                   "init_args": {"monitor": "val/fg_dice/mean", "mode": "max", "every_n_epochs": 1,
                                                 "save_last": False, "filename": "best-{epoch}"}}]},
        "model": {"class_path": "tests.test_example_method.ExampleMethod", "init_args": {
            "net": {"class_path": "tests.test_example_method.TwoHeadNet"}, "num_classes": 2,
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
            "lr_scheduler": {"class_path": "lightning_modules.schedules.WarmupCosine",
                             "init_args": {"warmup_steps": 1}},
            "lr_interval": "epoch", "infer_mode": "sliding_window", "sw_batch_size": 2}},
        "data": {"class_path": "tests.test_example_method.NiftiThreeStreams", "init_args": {
            "root": str(root), "labeled": 2, "batch_size": 2, "labeled_batch_size": 1, "patch_size": [16, 16, 8],
            "num_workers": 0}},
    }
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lemis(*args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL} | {"OMP_NUM_THREADS": "1"} | (
        {KILL: kill} if kill else {})
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def versions(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "runs" / "example").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "step"} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_example_method_runs_everything(tmp_path):
    root = make_nifti_dataset(tmp_path / "data")
    cfg = config(tmp_path, root)

    whole = lemis("fit", "--config", str(cfg))
    assert whole.returncode == 0, whole.stderr[-3000:]
    (run,) = versions(tmp_path)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == EPOCHS * 3
    scheduler = state["lr_schedulers"][0]
    assert scheduler["last_epoch"] == EPOCHS and scheduler["total_steps"] == EPOCHS  # stepped by epoch
    assert len(list((run / "checkpoints").glob("best-epoch=*.ckpt"))) == 1  # epoch-based selection
    per_case = rows(run / "per_case_val.csv")
    assert [r["case"] for r in per_case] == ["case4", "case5"] and set(per_case[0]) == {"case", "fg_dice",
                                                                                        "volume_ratio"}
    logged = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("val/fg_dice/mean") for r in logged) and any(r.get("loss/frac") for r in logged)

    ckpt = str(run / "checkpoints" / "last.ckpt")
    for command in ("validate", "test", "predict"):
        done = lemis(command, "--config", str(cfg), f"--ckpt_path={ckpt}", "--data.init_args.test_list=val.list")
        assert done.returncode == 0, done.stderr[-3000:]
    predictions = sorted(p.name for p in tmp_path.rglob("predictions/*.h5"))
    assert predictions == ["case4.h5", "case5.h5"]
    validated = versions(tmp_path)[1]
    assert rows(validated / "per_case_val.csv") == per_case  # validate on the last checkpoint = the run's last

    # SIGKILL as step 6 starts (mid-epoch 2), resume with --ckpt_path last: the end equals the uninterrupted run
    killed_cfg = tmp_path / "killed"
    killed_cfg.mkdir()
    cfg2 = config(killed_cfg, root)
    killed = lemis("fit", "--config", str(cfg2), kill="5:99:/dev/null")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = lemis("fit", "--config", str(cfg2), "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    end = torch.load(versions(killed_cfg)[-1] / "checkpoints" / "last.ckpt", weights_only=False)
    assert end["global_step"] == state["global_step"]
    for key in state["state_dict"]:
        assert identical(end["state_dict"][key], state["state_dict"][key]), key
    assert identical(end["optimizer_states"], state["optimizer_states"])
    assert rows(versions(killed_cfg)[-1] / "per_case_val.csv") == per_case

    # two DDP ranks evaluate the last checkpoint as one process does
    ddp = lemis("validate", "--config", str(cfg), f"--ckpt_path={ckpt}", "--trainer.devices=2",
                "--trainer.strategy=ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert rows(versions(tmp_path)[-1] / "per_case_val.csv") == per_case


@pytest.mark.slow
def test_example_method_trains_on_two_ranks(tmp_path):
    root = make_nifti_dataset(tmp_path / "data")
    cfg = config(tmp_path, root)
    done = lemis("fit", "--config", str(cfg), "--trainer.devices=2", "--trainer.strategy=ddp",
                 "--trainer.max_epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = versions(tmp_path)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4  # 3 unlabeled cases, padded to 4, over 2 ranks at batch 1: 2 an epoch
    assert [r["case"] for r in rows(run / "per_case_val.csv")] == ["case4", "case5"]
