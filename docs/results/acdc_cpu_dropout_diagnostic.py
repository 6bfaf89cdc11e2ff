"""Diagnostic of docs/results/acdc_cpu.md: val.list Dice (mean of the 3 classes) of each run's last-checkpoint
student, in eval mode (the protocol) and with its Dropout layers active while BatchNorm stays in eval mode.

    .venv/bin/python docs/results/acdc_cpu_dropout_diagnostic.py runs/acdc_cpu_supervised/version_0 ...
"""
import sys

import h5py
import torch

from lightning_modules.metrics import case_metrics, summarize
from lightning_modules.nets.unet2d import UNet2D
from lightning_modules.supervised import Supervised

ROOT = "../shared/data/ACDC"


def val_dice(module, volumes) -> float:
    rows = []
    for case, image, label in volumes:
        with torch.no_grad():
            pred = module.predict_case(torch.from_numpy(image)[None, None]).argmax(1)[0].numpy()
        rows += case_metrics(pred, label, 4, case)
    return 100 * summarize(rows)["dice/mean"]


def main(runs):
    volumes = []
    for case in open(f"{ROOT}/val.list").read().split():
        with h5py.File(f"{ROOT}/data/{case}.h5") as f:
            volumes.append((case, f["image"][()], f["label"][()]))
    for run in runs:
        state = torch.load(f"{run}/checkpoints/last.ckpt", weights_only=False)["state_dict"]
        module = Supervised(net=UNet2D(1, 4), num_classes=4, roi_size=(128, 128), sw_batch_size=32)
        module.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        module.eval()
        plain = val_dice(module, volumes)
        for layer in module.net.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.train()
        torch.manual_seed(0)
        print(f"{run}: eval {plain:.1f}  dropout-on {val_dice(module, volumes):.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
