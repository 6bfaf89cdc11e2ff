"""lemis's Mean Teacher, run by Lightning with its callbacks, equals a minimal plain-PyTorch loop of the same
protocol step by step (issue "Evidence that label efficiency works"): the one student pass over [x_l; x_u], the
teacher in train mode on noisy x_u, the gated and ramped weight, the SGD step, the EMA update with alpha_t after
it, then the poly LR. The loop below is written from spec/methods/mean_teacher.md sec. 1-2 alone."""
import copy
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from callbacks.ema_teacher import EMATeacher
from callbacks.rng_state import RNGState
from datamodules.acdc import ACDCDataModule
from lightning_modules.mean_teacher import MeanTeacher
from lightning_modules.nets.unet2d import UNet2D

STEPS, GATE, EPOCH_LEN, RAMP, C, K = 6, 2, 1, 4, 1.0, 4
DECAY = 0.75  # below alpha_t = 1 - 1/(t+1) from t = 4 on, so both branches of the min are exercised


class SeedEachStep(L.Callback):
    """The same random draws (dropout, teacher noise) in both loops: step t starts from seed 1000 + t."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 + trainer.global_step)


def plain_loop(net: torch.nn.Module, batches: list[dict]) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    teacher = copy.deepcopy(net)
    net.train()
    teacher.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for t, batch in enumerate(batches):
        torch.manual_seed(1000 + t)
        x_l, y_l, x_u = batch["labeled"]["image"], batch["labeled"]["label"], batch["unlabeled"]["image"]
        logits = net(torch.cat([x_l, x_u]))
        with torch.no_grad():
            q = torch.softmax(teacher(x_u + torch.clamp(torch.randn_like(x_u) * 0.1, -0.2, 0.2)), 1)
        p = torch.softmax(logits[:len(x_l)], 1)
        g = F.one_hot(y_l, K).permute(0, 3, 1, 2).float()
        dice = (1 - (2 * (p * g).sum((0, 2, 3)) + 1e-5) / ((p * p).sum((0, 2, 3)) + (g * g).sum((0, 2, 3)) + 1e-5))
        l_sup = 0.5 * (F.cross_entropy(logits[:len(x_l)], y_l) + dice.mean())
        l_con = torch.mean((torch.softmax(logits[len(x_l):], 1) - q) ** 2)
        w = 0.0 if t < GATE else C * math.exp(-5 * (1 - min(t // EPOCH_LEN, RAMP) / RAMP) ** 2)
        opt.zero_grad()
        (l_sup + w * l_con).backward()
        opt.step()
        alpha = min(1 - 1 / (t + 1), DECAY)
        with torch.no_grad():
            for a, b in zip(teacher.parameters(), net.parameters()):
                a.mul_(alpha).add_(b, alpha=1 - alpha)
        for group in opt.param_groups:
            group["lr"] = 0.01 * (1 - t / STEPS) ** 0.9
    return net, teacher, opt.param_groups[0]["lr"]


def test_mean_teacher_equals_a_plain_loop(acdc_phantom):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order in both loops, whatever the machine's load
    try:
        _compare_loops(acdc_phantom)
    finally:
        torch.set_num_threads(threads)


def _compare_loops(acdc_phantom):
    dm = ACDCDataModule(str(acdc_phantom), labeled=2, batch_size=4, labeled_batch_size=2, patch_size=(32, 32),
                        num_workers=0)
    dm.setup("fit")
    stream = iter(dm.train_dataloader())
    batches = [next(stream)[0] for _ in range(STEPS)]
    torch.manual_seed(0)
    net = UNet2D(in_channels=1, num_classes=K, channels=(8, 16, 32, 64, 128))
    reference, ref_teacher, ref_lr = plain_loop(copy.deepcopy(net), batches)

    module = MeanTeacher(net=net, num_classes=K, consistency=C, consistency_rampup=RAMP, rampup_epoch_len=EPOCH_LEN,
                         consistency_gate_steps=GATE, ema_decay=DECAY)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[EMATeacher(), RNGState(), SeedEachStep()])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))

    assert trainer.global_step == STEPS
    for ours, theirs in ((module.net, reference), (module.teacher, ref_teacher)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # parameters and BN buffers
    assert math.isclose(trainer.optimizers[0].param_groups[0]["lr"], ref_lr, rel_tol=1e-12)
    # the consistency term was on for the last steps, so a mismatch in it could not hide
    assert module.consistency_weight(STEPS - 1) > 0.5 * C
