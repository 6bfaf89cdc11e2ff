"""Diagnostic for ikd_mil_glas.md: why neither the MIL teacher nor its students beat "everything is gland".

    python docs/results/ikd_mil_glas_diagnostic.py [--out runs/ikd_mil_glas] [--seeds 1 2]
    python docs/results/ikd_mil_glas_diagnostic.py --out runs/ikd_mil_glas64 --seeds 1 --crop 64 --stride 32 \
        --scale 1 --sigma 1.5                                                       # the ikd_mil_cpu64.yaml run

For each seed's MIL teacher (``mil_teacher.ckpt``, teacher slot) and final student (last ``net``):
- on the training crops (64x64, as trained): the mean fused probability of positive and of negative bags, and the
  share of bags whose mean is on the right side of 0.5 (does MIL separate the bags at all?);
- on testA at native size (the run's own inference: x0.5, blur, resized back): the share of pixels predicted gland
  against the true share, and the pixel AUC of the probability against the mask (is there localisation signal
  that the 0.5 threshold hides?).
Also the F1 of predicting every pixel gland on val and testA, the trivial reference.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from datamodules.glas import GlaSDataModule
from lightning_modules.metrics import f1_iou
from lightning_modules.nets.vgg_mil import VGGMIL

ROOT = "../shared/data/GlaS-half"


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula; ties get their mean rank."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def load(ckpt: Path, slot: str) -> VGGMIL:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    net = VGGMIL(in_channels=3, fusion_weights=(0.3, 0.3, 0.4))
    net.load_state_dict({k[len(slot) + 1:]: v for k, v in state.items() if k.startswith(slot + ".")})
    return net.eval()


@torch.no_grad()
def bag_means(net: VGGMIL, dm: GlaSDataModule) -> tuple[np.ndarray, np.ndarray]:
    means, labels = [], []
    for name, item in dm.train_units():
        sample = dm.train_sample(dm._read(dm.train_path(item), ("image", "label"), "labeled"), item)
        means.append(float(net(sample["image"][None])[3].mean()))
        labels.append(int(sample["bag_label"]))
    return np.array(means), np.array(labels, bool)


@torch.no_grad()
def test_images(net: VGGMIL, dm: GlaSDataModule, stage: str, scale: float, sigma: float):
    """(probability [H, W], mask [H, W]) of every image of ``stage`` (testA; val), with the run's inference rule."""
    from lightning_modules.ikd_mil import IKDMIL

    module = IKDMIL(net=net, eval_scale=scale, blur_sigma=sigma)
    for case in dm.eval_cases(stage):
        sample = dm.eval_case(dm._read(dm.case_path(case), ("image", "label"), "eval"), case)
        p = module._predict_resized(sample["image"][None].float())[0, 1].numpy()
        yield p, sample["label"].numpy().astype(bool)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/ikd_mil_glas"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--sigma", type=float, default=0.75)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dm = GlaSDataModule(root=ROOT, patch_size=(64, 64), crop_size=args.crop, crop_stride=args.stride)
    for stage in ("val", "test"):
        masks = [m for _, m in test_images(VGGMIL(in_channels=3), dm, stage, args.scale, args.sigma)]
        allfg = np.mean([f1_iou(np.ones_like(m), m)[0] for m in masks])
        print(f"{stage}: true gland share {np.mean([m.mean() for m in masks]):.3f}; every pixel gland: F1 {allfg:.3f}")
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        finals = sorted(run.glob("version_*/checkpoints/last.ckpt"))
        for label, ckpt, slot in (("MIL teacher", run / "mil_teacher.ckpt", "teacher"),
                                  ("student (last)", finals[-1], "net")):
            net = load(ckpt, slot)
            means, bags = bag_means(net, dm)
            right = np.mean((means >= 0.5) == bags)
            shares, aucs = [], []
            for p, m in test_images(net, dm, "test", args.scale, args.sigma):
                shares.append((p >= 0.5).mean())
                aucs.append(auc(p.ravel(), m.ravel()))
            print(f"seed {seed} {label}: bag mean p pos {means[bags].mean():.3f} neg {means[~bags].mean():.3f}, "
                  f"bags right {right:.3f}; testA predicted gland share {np.mean(shares):.3f}, "
                  f"pixel AUC {np.mean(aucs):.3f} ({min(aucs):.3f}..{max(aucs):.3f})")


if __name__ == "__main__":
    main()
