"""Diagnostic of docs/results/acdc_cpu.md: val.list Dice (mean of the 3 classes) of each run's last-checkpoint
student, scored three ways:

- ``eval``: eval mode, the protocol;
- ``dropout-on``: the Dropout layers active while BatchNorm stays in eval mode;
- ``bn-recal``: eval mode after BatchNorm's running statistics are re-estimated with dropout off (a cumulative
  average over the 136 labeled training slices, at the training size, no augmentation; Li et al. 2019's cure
  for the dropout -> BN "variance shift"). Only labeled slices, so a labeled-only net sees no unlabeled data.

    .venv/bin/python docs/results/acdc_cpu_dropout_diagnostic.py runs/compare/acdc_cpu/supervised/seed1/version_0 ...
"""
import sys

import h5py
import numpy as np
import torch

from datamodules.acdc import patient_of
from datamodules.budget import select_labeled
from datamodules.transforms import zoom_nearest
from lightning_modules.metrics import case_metrics, summarize
from lightning_modules.nets.unet2d import UNet2D
from lightning_modules.supervised import Supervised

ROOT = "../shared/data/ACDC"
SIZE = (128, 128)


def val_dice(module, volumes) -> float:
    rows = []
    for case, image, label in volumes:
        with torch.no_grad():
            pred = module.predict_case(torch.from_numpy(image)[None, None]).argmax(1)[0].numpy()
        rows += case_metrics(pred, label, 4, case)
    return 100 * summarize(rows)["dice/mean"]


def labeled_slices() -> torch.Tensor:
    """[N, 1, 128, 128]: the 7 labeled patients' slices (the protocol's budget rule), resized as in training."""
    names = open(f"{ROOT}/train_slices.list").read().split()
    patients = list(dict.fromkeys(patient_of(n) for n in names))
    chosen = set(select_labeled(patients, 7))
    images = []
    for name in names:
        if patient_of(name) in chosen:
            with h5py.File(f"{ROOT}/data/slices/{name}.h5") as f:
                images.append(zoom_nearest(f["image"][()].astype(np.float32), SIZE))
    return torch.from_numpy(np.stack(images))[:, None]


def recalibrate_bn(net: torch.nn.Module, images: torch.Tensor, batch: int = 12) -> None:
    """Running statistics = the plain average over ``images`` of train-mode batch statistics, dropout off."""
    for layer in net.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average
            layer.train()
        elif isinstance(layer, torch.nn.Dropout):
            layer.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch):
            net(images[start:start + batch])
    net.eval()


def main(runs):
    volumes = []
    for case in open(f"{ROOT}/val.list").read().split():
        with h5py.File(f"{ROOT}/data/{case}.h5") as f:
            volumes.append((case, f["image"][()], f["label"][()]))
    slices = labeled_slices()
    for run in runs:
        state = torch.load(f"{run}/checkpoints/last.ckpt", weights_only=False)["state_dict"]
        module = Supervised(net=UNet2D(1, 4), num_classes=4, roi_size=SIZE, sw_batch_size=32)
        module.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        module.eval()
        plain = val_dice(module, volumes)
        for layer in module.net.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.train()
        torch.manual_seed(0)
        dropout_on = val_dice(module, volumes)
        recalibrate_bn(module.net, slices)
        print(f"{run}: eval {plain:.1f}  dropout-on {dropout_on:.1f}  bn-recal {val_dice(module, volumes):.1f}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
