"""`python -m experiments.benchmark speed|data|infer|faults|slides [--quick|--full]` (spec/benchmarks.md).

speed: per method and input shape, the LightningModule's training step run by ``lightning.Trainer`` (logging and
callbacks on, a fixed in-memory batch) against a plain PyTorch loop doing the same arithmetic (same net, losses,
EMA update, optimizer and LR schedule), alternated AB BA AB ... in one process; median steps/s of each, the ratio
framework/reference with its spread, and peak memory.
data: samples/s delivered by each DataModule's training loader (published transforms) next to the model's steps/s.
infer: seconds per whole case of evaluation (prediction, then the metric rows), 2D slice-wise and 3D sliding window.
slides: patches/s read by region from a pyramidal TIFF by each slide reader (tifffile + zarr, OpenSlide).
faults: minor page faults per allocation of a 64 MiB tensor, with lemis's host-memory setting and with glibc's
defaults (each in a fresh process): what ``experiments.host_memory.keep_freed_memory`` saves every training step.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from callbacks.ema_teacher import EMATeacher
from experiments.host_memory import keep_freed_memory
from lightning_modules import losses
from lightning_modules.mean_teacher import MeanTeacher
from lightning_modules.nets.branched_unet import BranchedUNet
from lightning_modules.nets.unet2d import UNet2D
from lightning_modules.nets.vnet import VNet
from lightning_modules.schedules import Poly
from lightning_modules.sgrs import SGRS, draw_mix, masked_soft_dice, mix, regional_ce, synergy_regions
from lightning_modules.subclass import (
    Subclass,
    accept,
    hierarchical_mix,
    mixed_target,
    second_view,
    soft_target_loss,
    undo_view,
    unsup_ramp,
)
from lightning_modules.supervised import Supervised

# input -> (net factory, classes): the SSL4MIS UNet for ACDC slices, the VNet for LA patches.
NETS = {"acdc2d": (lambda: UNet2D(1, 4), 4), "la3d": (lambda: VNet(1, 2, has_dropout=True), 2)}
# (input, spatial shape, labeled, unlabeled, dice_include_background)
SHAPES = {
    "cpu": [("acdc2d", (128, 128), 6, 6, True), ("la3d", (64, 64, 48), 2, 2, False)],
    "quick": [("acdc2d", (64, 64), 4, 4, True), ("la3d", (32, 32, 32), 1, 1, False)],
    "full": [("acdc2d", (256, 256), 12, 12, True), ("la3d", (112, 112, 80), 2, 2, False)],
}


def fixed_batch(method: str, classes: int, shape, n_lab: int, n_unl: int, device) -> dict:
    """One in-memory training batch in the DataModule's format (two streams for the teacher methods; with the
    superclass masks of ``coarse_mapping`` {1: [1..K-1]} for subclass learning)."""
    g = torch.Generator().manual_seed(0)
    two_streams = METHODS[method].reference_loss is not None
    lab = {"image": torch.randn(n_lab if two_streams else n_lab + n_unl, 1, *shape, generator=g), "case": ["x"]}
    lab["label"] = torch.randint(0, classes, (lab["image"].shape[0], *shape), generator=g)
    unl = {"image": torch.randn(n_unl, 1, *shape, generator=g), "case": ["x"]}
    if method == "subclass":
        lab["coarse_label"] = (lab["label"] > 0).long()
        unl["coarse_label"] = (torch.randint(0, classes, (n_unl, *shape), generator=g) > 0).long()
    lab, unl = ({k: v.to(device) if torch.is_tensor(v) else v for k, v in d.items()} for d in (lab, unl))
    return {"labeled": lab, "unlabeled": unl} if two_streams else lab


class _Clock(L.Callback):
    """perf_counter at the start of the first timed step and at the end of the last (synchronised on GPU).

    The end is the last step's ``on_train_batch_end``, not ``on_train_end``: the one-off epoch end and logger
    flush that follow would otherwise be charged to a handful of timed steps (measured: ~4 % of a 5-step block
    of 32x32x32 VNet steps), a cost a real run spreads over thousands.
    """

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.last, self.start, self.end = warmup, warmup + steps, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.last:
            _sync()
            self.end = time.perf_counter()


class _Repeat(Dataset):
    """The same in-memory batch n times: no data loading in the timed loop."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.batch


def _identity(batch):
    return batch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def framework_block(module, batch, warmup: int, steps: int, accelerator: str) -> float:
    """Steps/s of Trainer.fit over a fixed batch (logging on, EMATeacher for Mean Teacher)."""
    clock = _Clock(warmup, steps)
    callbacks = ([EMATeacher()] if isinstance(module, MeanTeacher) else []) + [clock]  # clock last: after the EMA
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_steps=warmup + steps, accelerator=accelerator, devices=1, callbacks=callbacks,
                            logger=L.pytorch.loggers.CSVLogger(tmp), enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50,
                            limit_val_batches=0, num_sanity_val_steps=0)
        loader = DataLoader(_Repeat(batch, warmup + steps), batch_size=None, collate_fn=_identity)
        trainer.fit(module, train_dataloaders=loader)
    return steps / (clock.end - clock.start)


def _noisy(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.randn_like(x) * 0.1).clamp(-0.2, 0.2)


def mean_teacher_loss(net, teacher, batch, step: int, dice_bg: bool) -> torch.Tensor:
    lab, unl = batch["labeled"], batch["unlabeled"]
    n = lab["image"].shape[0]
    logits = net(torch.cat([lab["image"], unl["image"]]))
    with torch.no_grad():
        q = torch.softmax(teacher(_noisy(unl["image"])), dim=1)
    return (losses.supervised_loss(logits[:n], lab["label"], dice_bg)
            + losses.consistency_weight(step, 0.1, 200, 150) * losses.softmax_mse(torch.softmax(logits[n:], 1), q))


def sgrs_loss(net, teacher, batch, step: int, dice_bg: bool) -> torch.Tensor:
    x_l, y_l, x_u = batch["labeled"]["image"], batch["labeled"]["label"], batch["unlabeled"]["image"]
    n_l, n_u = x_l.shape[0], x_u.shape[0]
    with torch.no_grad():
        x_u_noisy, x_l_noisy = _noisy(x_u), _noisy(x_l)
        pseudo = teacher(x_u_noisy).argmax(1)
        x_m, _ = mix(x_u_noisy, x_l_noisy, *draw_mix(n_u, n_l, 0.75, x_u.device))
    z_l, z_u, z_m = net(torch.cat([x_l, x_u, x_m])).split([n_l, n_u, n_u])
    probs = [torch.softmax(z, 1) for z in (z_u, z_m)]
    with torch.no_grad():
        r = synergy_regions(*probs, 0.425)
    ce = 0.5 * sum(regional_ce(z, pseudo, r["C'"], r["D'"], 0.2) for z in (z_u, z_m))
    dice = 0.25 * sum(masked_soft_dice(p, pseudo, r[k], s) for p in probs for k, s in (("C'", 1.0), ("D'", 20.0)))
    return (losses.supervised_loss(z_l, y_l, dice_bg)
            + losses.consistency_weight(step, 1.0, 40, 150) * 0.5 * (ce + dice))


def subclass_loss(net, teacher, batch, step: int, dice_bg: bool) -> torch.Tensor:
    """The full subclass method (PC + SN + pseudo labels + HierarchicalMix with gradient), mapping {1: [1..K-1]}."""
    lab, unl = batch["labeled"], batch["unlabeled"]
    n = lab["image"].shape[0]
    out = net(torch.cat([lab["image"], unl["image"]]))
    loss = (losses.supervised_loss(out["fine"][:n], lab["label"], dice_bg)
            + losses.supervised_loss(out["coarse"], torch.cat([lab["coarse_label"], unl["coarse_label"]])))
    k, axis = int(torch.randint(4, ()).item()), (-2, -1)[int(torch.randint(2, ()).item())]
    with torch.no_grad():
        r = undo_view(torch.softmax(net(second_view(unl["image"], k, axis))["fine"], 1), k, axis)
    parent = (0,) + (1,) * (out["fine"].shape[1] - 1)
    pseudo = accept(torch.softmax(out["fine"][n:].detach(), 1), r, unl["coarse_label"], parent, 0.5)
    with torch.no_grad():
        x_mix, y_mix, alpha = hierarchical_mix(unl["image"], unl["coarse_label"], lab["image"], lab["label"])
    target = mixed_target(pseudo, y_mix, alpha, out["fine"].shape[1])
    return loss + unsup_ramp(step) * soft_target_loss(net(x_mix)["fine"], target)


@dataclass
class Bench:
    """A benchmarked method: its module, and the plain loop's loss for it (None: the supervised loss alone,
    a labeled-only batch; otherwise a two-stream batch); ``teacher``: an EMA teacher on both sides; ``net``: a
    net factory (input, classes) replacing the input's own (``NETS``)."""

    build: Callable[..., L.LightningModule]
    reference_loss: Callable | None = None
    teacher: bool = True
    net: Callable[[str, int], torch.nn.Module] | None = None


def branched_net(name: str, classes: int) -> BranchedUNet:
    return BranchedUNet(1, mapping={1: list(range(1, classes))}, dims=2 if name == "acdc2d" else 3,
                        prior_concatenation=True, separate_normalization=True)


METHODS = {
    "supervised": Bench(Supervised),
    # the consistency term is on in every step timed
    "mean_teacher": Bench(partial(MeanTeacher, consistency_gate_steps=0), mean_teacher_loss),
    "sgrs": Bench(SGRS, sgrs_loss),
    # tau fixed at 0.5 in the reference; the module's tau(t) changes which voxels are accepted, not the arithmetic
    "subclass": Bench(partial(Subclass, pseudo_label=True, hierarchical_mix=True), subclass_loss, teacher=False,
                      net=branched_net),
}


def reference_block(method: str, net, batch, warmup: int, steps: int, dice_bg: bool, device) -> float:
    """Steps/s of a plain PyTorch loop doing the same arithmetic as the module + callbacks."""
    net = net.to(device).train()
    step_loss = METHODS[method].reference_loss
    teacher = copy.deepcopy(net).requires_grad_(False) if step_loss and METHODS[method].teacher else None
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = Poly(optimizer, total_steps=warmup + steps)  # the module's default, over the Trainer's max_steps
    for step in range(warmup + steps):
        if step == warmup:
            _sync()
            start = time.perf_counter()
        if step_loss is None:
            loss = losses.supervised_loss(net(batch["image"]), batch["label"], dice_bg)
        else:
            loss = step_loss(net, teacher, batch, step, dice_bg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if teacher is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(teacher.parameters()), list(net.parameters()), 1 - losses.ema_alpha(step, 0.99))
    _sync()
    return steps / (time.perf_counter() - start)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    print("| method | input | batch | framework steps/s | reference steps/s | ratio (min..max) | images/s (fw) | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape, n_lab, n_unl, dice_bg in SHAPES[args.size]:
        if name not in args.inputs:
            continue
        for method in args.methods:
            make_net, classes = NETS[name]
            if METHODS[method].net is not None:
                make_net = partial(METHODS[method].net, name, classes)
            batch = fixed_batch(method, classes, shape, n_lab, n_unl, device)
            fw, ref = [], []
            for block in range(args.blocks):  # AB BA AB ...: drift hits both alike, and neither is always first
                for side in ("fw", "ref") if block % 2 == 0 else ("ref", "fw"):
                    torch.manual_seed(0)
                    if side == "fw":
                        module = METHODS[method].build(net=make_net(), num_classes=classes,
                                                       dice_include_background=dice_bg)
                        fw.append(framework_block(module, batch, args.warmup, args.steps, accelerator))
                    else:
                        ref.append(reference_block(method, make_net(), batch, args.warmup, args.steps, dice_bg, device))
            ratios = [f / r for f, r in zip(fw, ref)]
            images = (n_lab + n_unl) * statistics.median(fw)
            print(f"| {method} | {name} {'x'.join(map(str, shape))} | {n_lab}+{n_unl} | {statistics.median(fw):.3f} | "
                  f"{statistics.median(ref):.3f} | {statistics.median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f}) | "
                  f"{images:.1f} | {peak_memory_mb():.0f} |", flush=True)


# (input, case shape [D, H, W] of a real case, infer_mode, {size: (roi, sliding-window stride)}); stride None is
# half the ROI: the published LA stride 18x18x4 at a 64x64x48 ROI would mean 440 windows per case.
CASES = [("acdc2d", (10, 256, 232), "slices",
          {"quick": ((64, 64), None), "cpu": ((128, 128), None), "full": ((256, 256), None)}),
         ("la3d", (180, 135, 88), "sliding_window",
          {"quick": ((32, 32, 32), None), "cpu": ((64, 64, 48), None), "full": ((112, 112, 80), (18, 18, 4))})]


def infer(args) -> None:
    """Median seconds per case of ``predict_case`` and of ``case_metrics`` (Dice, Jaccard, HD95, ASD) on random
    volumes of a real case's shape (ACDC patient002 frame 1; LA 1GU15S0GJ6PFNARO469W); `--full` is the published
    ROI and stride."""
    from lightning_modules.metrics import case_metrics

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("| input | case shape | roi | stride | predict s/case | metrics s/case |")
    print("|---|---|---|---|---|---|")
    for name, shape, mode, sizes in CASES:
        if name not in args.inputs:
            continue
        make_net, classes = NETS[name]
        roi, stride = sizes[args.size]
        module = Supervised(make_net(), classes, infer_mode=mode, roi_size=roi, sw_stride=stride).to(device).eval()
        g = torch.Generator().manual_seed(0)
        image = torch.randn(1, 1, *shape, generator=g).to(device)
        label = torch.randint(0, classes, shape, generator=g).numpy()
        module.predict_case(image)  # warm-up
        predict, metrics = [], []
        for _ in range(args.cases):
            _sync()
            start = time.perf_counter()
            pred = module.predict_case(image).argmax(1)[0].cpu().numpy()
            _sync()
            predict.append(time.perf_counter() - start)
            start = time.perf_counter()
            case_metrics(pred, label, classes, "x")
            metrics.append(time.perf_counter() - start)
        windows = "slices" if mode == "slices" else "x".join(map(str, module.sw_stride))
        print(f"| {name} | {'x'.join(map(str, shape))} | {'x'.join(map(str, roi))} | {windows} | "
              f"{statistics.median(predict):.2f} | {statistics.median(metrics):.2f} |", flush=True)


def endless(loader):
    """Batches of ``loader`` epoch after epoch (small budgets make epochs of a few batches)."""
    while True:
        yield from loader


def data(args) -> None:
    """Samples/s of each DataModule's training loader on phantoms (or real data with --root-acdc/--root-la)."""
    from datamodules.acdc import ACDCDataModule
    from datamodules.la import LADataModule
    from datamodules.phantoms import ensure_phantoms

    acdc_root = args.root_acdc or ensure_phantoms("acdc", Path(".cache/phantoms/bench_acdc"), n_train=20, n_val=2,
                                                  n_test=2, size=(256, 224), seed=0)
    la_root = args.root_la or ensure_phantoms("la", Path(".cache/phantoms/bench_la"), n_train=8, n_test=2,
                                              shape=(128, 128, 88), seed=0)
    shape2d, shape3d = (128, 128), (64, 64, 48)
    modules = {
        f"ACDC {shape2d}": ACDCDataModule(str(acdc_root), labeled=3, batch_size=12, labeled_batch_size=6,
                                          patch_size=shape2d, num_workers=args.workers),
        f"LA {shape3d}": LADataModule(str(la_root), labeled=4, batch_size=4, labeled_batch_size=2, patch_size=shape3d,
                                      num_workers=args.workers, present="present.list" if args.root_la else None),
    }
    print("| datamodule | workers | batches | samples/s |")
    print("|---|---|---|---|")
    for name, dm in modules.items():
        dm.setup("fit")
        batches = endless(dm.train_dataloader())
        next(batches)  # worker start-up and cache fill are not steady state
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        rate = args.batches * dm.batch_size / (time.perf_counter() - start)
        print(f"| {name} | {args.workers} | {args.batches} | {rate:.1f} |", flush=True)


def slides(args) -> None:
    """Patches/s read by region from a pyramidal JPEG TIFF (a generated slide of ``--slide-side`` x 1.5 that many
    pixels, 3 levels), by each slide reader, at two levels, in random places (8 reads warm the file cache first)."""
    from datamodules.phantoms.slides import make_slide
    from datamodules.slides import BACKENDS, Slide

    side = args.slide_side
    path = Path(f".cache/phantoms/bench_slide_{side}.tif")
    if not path.is_file():
        import numpy as np

        make_slide(path, np.random.default_rng(0), size=(side, side * 3 // 2), n_tumours=2, levels=3)
    print("| reader | level | patch | patches | patches/s |")
    print("|---|---|---|---|---|")
    for backend in BACKENDS:
        for level in (0, 1):
            with Slide(path, backend) as slide:
                width, height = slide.dimensions[0]
                d = int(slide.downsamples[level])
                torch.manual_seed(level)  # the same places for each reader
                places = [(int(torch.randint(0, width - 256 * d, ()).item()),
                           int(torch.randint(0, height - 256 * d, ()).item())) for _ in range(args.batches * 4)]
                for place in places[:8]:
                    slide.read_region(place, level, (256, 256))
                start = time.perf_counter()
                for place in places:
                    slide.read_region(place, level, (256, 256))
                rate = len(places) / (time.perf_counter() - start)
            print(f"| {backend} | {level} | 256 | {len(places)} | {rate:.1f} |", flush=True)


FAULTS = """
import resource, sys, torch
from experiments.host_memory import keep_freed_memory
kept = keep_freed_memory()
pages = 2**26 // 4096
def faults_per_alloc(n):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        x = torch.empty(2**26 // 4)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
        x.fill_(1.0)
        del x
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / n / pages
faults_per_alloc(10)  # the heap settles (posix_memalign splits) before the steady state is counted
print(kept, faults_per_alloc(int(sys.argv[1])))
"""


def faults(args) -> None:
    """Fraction of a 64 MiB tensor's pages faulted in again per allocation, in a fresh process per mode (the
    setting is per process and cannot be undone)."""
    print("| host malloc | allocations | faulted pages per allocation (fraction) |")
    print("|---|---|---|")
    for extra in ({}, {"LEMIS_MALLOC": "system"}):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra
        kept, fraction = subprocess.run([sys.executable, "-c", FAULTS, str(args.batches)], env=env,
                                        capture_output=True, text=True, check=True).stdout.split()
        label = "keeps freed memory" if kept == "True" else "glibc default"
        print(f"| {label} | {args.batches} | {float(fraction):.3f} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("speed", "data", "infer", "faults", "slides"))
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick")
    size.add_argument("--full", dest="size", action="store_const", const="full")
    parser.set_defaults(size="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--inputs", nargs="+", default=["acdc2d", "la3d"], choices=["acdc2d", "la3d"])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--slide-side", type=int, default=4096)
    parser.add_argument("--root-acdc", type=Path)
    parser.add_argument("--root-la", type=Path)
    args = parser.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    kept = keep_freed_memory()  # as the CLI does: both sides run with it (or both without, LEMIS_MALLOC=system)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # keep the table readable
    print(f"# lemis benchmark {args.what} ({args.size}); torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {'cuda:' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
          f"host malloc {'keeps freed memory' if kept else 'glibc default'}")
    {"speed": speed, "data": data, "infer": infer, "faults": faults, "slides": slides}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
