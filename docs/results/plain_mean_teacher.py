"""An independent plain-PyTorch Mean Teacher / labeled-only loop for ACDC (issue "Evidence that label efficiency
works"): no Lightning, no lemis DataModule, transforms, losses or callbacks; only the net class is shared.

It follows spec/methods/mean_teacher.md sec. 1-2 the way SSL4MIS's scripts do: a TwoStreamBatchSampler-like
sampler and the RandomGenerator augmentation driven by numpy's global generator, one student pass over
[x_l; x_u], the teacher in train mode on noisy x_u, L = L_sup + w(t) L_con, SGD step, EMA update with alpha_t,
poly LR set after the step. Validation: every val.list volume slice by slice at the training size (order-0 zoom
both ways), Dice per class on the 3D volume (0 when exactly one mask is empty, 1 when both are).

    python docs/results/plain_mean_teacher.py --method mt --seed 1 --steps 800 --out runs/plain/mt_s1.json

Writes a JSON file: the arguments, the validation curve (step -> mean Dice) and the per-case Dice of the last step.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_modules.nets.unet2d import UNet2D  # noqa: E402


def zoom0(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return ndimage.zoom(a, (size[0] / a.shape[0], size[1] / a.shape[1]), order=0)


def augment(image, label, size):
    """SSL4MIS RandomGenerator (current form): rot90+flip with p 0.5, else rotate by an integer angle."""
    if random.random() > 0.5:
        k, axis = np.random.randint(0, 4), np.random.randint(0, 2)
        image, label = np.flip(np.rot90(image, k), axis).copy(), np.flip(np.rot90(label, k), axis).copy()
    else:
        angle = np.random.randint(-20, 20)
        image = ndimage.rotate(image, angle, order=0, reshape=False)
        label = ndimage.rotate(label, angle, order=0, reshape=False)
    return zoom0(image, size), zoom0(label, size)


def two_stream_batches(n_lab: int, n_unl: int, bs_lab: int, bs_unl: int):
    """Endless (labeled indices, unlabeled indices): labeled permutations cut into groups (leftover dropped),
    unlabeled indices from an endless chain of permutations."""
    unl = iter(())
    while True:
        lab = np.random.permutation(n_lab)
        for i in range(n_lab // bs_lab):
            picked = []
            while len(picked) < bs_unl:
                try:
                    picked.append(next(unl))
                except StopIteration:
                    unl = iter(np.random.permutation(n_unl))
            yield lab[i * bs_lab:(i + 1) * bs_lab], np.array(picked)


def dice_loss(probs, onehot):
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = (probs ** 2).sum(dims) + (onehot ** 2).sum(dims)
    return (1 - (2 * inter + 1e-5) / (denom + 1e-5)).mean()


def sup_loss(logits, label, classes):
    onehot = F.one_hot(label, classes).permute(0, 3, 1, 2).float()
    return 0.5 * (F.cross_entropy(logits, label) + dice_loss(torch.softmax(logits, 1), onehot))


def cons_weight(step, c, gate, epoch_len, ramp):
    if step < gate:
        return 0.0
    e = min(step // epoch_len, ramp)
    return c * math.exp(-5.0 * (1.0 - e / ramp) ** 2)


@torch.no_grad()
def evaluate(net, volumes, size, classes):
    """{case: [Dice of class 1..K-1]} for every volume, eval mode, slice by slice."""
    net.eval()
    out = {}
    for case, (image, label) in volumes.items():
        pred = np.zeros_like(label)
        for z in range(image.shape[0]):
            x = torch.from_numpy(zoom0(image[z], size)).float()[None, None]
            p = net(x).argmax(1)[0].numpy()
            pred[z] = zoom0(p, label.shape[1:])
        dice = []
        for c in range(1, classes):
            a, b = pred == c, label == c
            s = a.sum() + b.sum()
            dice.append(1.0 if s == 0 else 2.0 * (a & b).sum() / s)
        out[case] = dice
    net.train()
    return out


OPTIONS = {"root": "../shared/data/ACDC", "seed": 1, "steps": 800, "size": 128, "batch": 12, "labeled-bs": 6,
           "patients": 7, "consistency": 0.1, "gate": 27, "epoch-len": 4, "ramp": 200.0, "val-every": 100,
           "threads": 1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["sup", "mt"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    # --labeled-bs is MT's labeled half; labeled-only draws --batch labeled slices
    for name, default in OPTIONS.items():
        ap.add_argument(f"--{name}", type=type(default), default=default)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    root, size, K = Path(args.root), (args.size, args.size), 4

    names = (root / "train_slices.list").read_text().split()
    patients = list(dict.fromkeys(n.split("_")[0] for n in names))[:args.patients]
    lab_names = [n for n in names if n.split("_")[0] in patients]
    unl_names = [n for n in names if n.split("_")[0] not in patients]

    def load(name):
        with h5py.File(root / "data" / "slices" / f"{name}.h5") as f:
            return f["image"][()], f["label"][()]
    lab, unl = [load(n) for n in lab_names], [load(n) for n in unl_names]
    volumes = {}
    for case in (root / "val.list").read_text().split():
        with h5py.File(root / "data" / f"{case}.h5") as f:
            volumes[case] = (f["image"][()], f["label"][()].astype(np.int64))

    def batch(items, idx):
        pairs = [augment(*items[i], size) for i in idx]
        return (torch.from_numpy(np.stack([p[0] for p in pairs])).float()[:, None],
                torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)))

    net = UNet2D(in_channels=1, num_classes=K, upsample="bilinear")
    teacher = UNet2D(in_channels=1, num_classes=K, upsample="bilinear")
    teacher.load_state_dict(net.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    net.train(), teacher.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    mt = args.method == "mt"
    bs_lab = args.labeled_bs if mt else args.batch
    stream = two_stream_batches(len(lab), len(unl), bs_lab, args.batch - bs_lab if mt else 1)
    curve, start = {}, time.time()
    for step in range(args.steps):
        li, ui = next(stream)
        x_l, y_l = batch(lab, li)
        if mt:
            x_u, _ = batch(unl, ui)
            logits = net(torch.cat([x_l, x_u]))
            with torch.no_grad():
                noise = torch.clamp(torch.randn_like(x_u) * 0.1, -0.2, 0.2)
                q = torch.softmax(teacher(x_u + noise), 1)
            l_sup = sup_loss(logits[:bs_lab], y_l, K)
            l_con = torch.mean((torch.softmax(logits[bs_lab:], 1) - q) ** 2)
            loss = l_sup + cons_weight(step, args.consistency, args.gate, args.epoch_len, args.ramp) * l_con
        else:
            loss = sup_loss(net(x_l), y_l, K)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mt:
            alpha = min(1 - 1 / (step + 1), 0.99)
            with torch.no_grad():
                for t, s in zip(teacher.parameters(), net.parameters()):
                    t.mul_(alpha).add_(s, alpha=1 - alpha)
        for g in opt.param_groups:
            g["lr"] = 0.01 * (1 - step / args.steps) ** 0.9
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            per_case = evaluate(net, volumes, size, K)
            curve[step + 1] = float(np.mean([np.mean(d) for d in per_case.values()]))
            print(f"step {step + 1} loss {loss.item():.4f} val dice {curve[step + 1]:.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "curve": curve,
                                    "per_case": per_case, "wall_s": time.time() - start}, indent=1))


if __name__ == "__main__":
    main()
