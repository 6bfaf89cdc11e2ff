"""Losses, schedules and the EMA update against values computed by hand (mean_teacher.md sec. 1, 4)."""
import math

import pytest
import torch

from callbacks.ema_teacher import EMATeacher
from lightning_modules import losses
from lightning_modules.schedules import Constant, Poly, StepDecay, WarmupCosine, poly_factor
from lightning_modules.segmentation import overlap_for_stride

# spec sec. 4: 2 voxels, K = 2, p = [(0.8, 0.2), (0.4, 0.6)], y = [0, 1]
PROBS = torch.tensor([[0.8, 0.2], [0.4, 0.6]]).T[None, :, :, None]  # [B=1, K=2, 2, 1]
LABEL = torch.tensor([[[0], [1]]])                                   # [1, 2, 1]


def test_dice_matches_ssl4mis_definition():
    assert losses.dice_loss(PROBS, LABEL).item() == pytest.approx(0.1269833, abs=1e-6)
    assert losses.dice_loss(PROBS, LABEL, include_background=False).item() == pytest.approx(0.1428561, abs=1e-6)


def test_supervised_loss_matches_hand_value():
    logits = PROBS.log()  # softmax(log p) = p
    assert torch.nn.functional.cross_entropy(logits, LABEL).item() == pytest.approx(0.3669846, abs=1e-6)
    assert losses.supervised_loss(logits, LABEL).item() == pytest.approx(0.2469840, abs=1e-6)


def test_dice_is_batch_level_not_per_image():
    # Image 1 has no class-1 voxels; a per-image mean would score its class-1 term separately.
    probs = torch.tensor([[[0.9]], [[0.1]]]).reshape(1, 2, 1, 1).repeat(2, 1, 1, 1)
    label = torch.tensor([[[0]], [[1]]])
    p1 = probs[:, 1].flatten()
    g1 = torch.tensor([0.0, 1.0])
    d1 = 1 - (2 * (p1 * g1).sum() + 1e-5) / ((p1 ** 2).sum() + (g1 ** 2).sum() + 1e-5)
    p0, g0 = probs[:, 0].flatten(), 1 - g1
    d0 = 1 - (2 * (p0 * g0).sum() + 1e-5) / ((p0 ** 2).sum() + (g0 ** 2).sum() + 1e-5)
    assert losses.dice_loss(probs, label).item() == pytest.approx(((d0 + d1) / 2).item(), abs=1e-7)


def test_softmax_mse_is_mean_over_every_element():
    p, q = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    p[0, 0, 0, 0] = 1.0
    assert losses.softmax_mse(p, q).item() == pytest.approx(1 / 96)


@pytest.mark.parametrize("epoch,length,expected", [
    (0, 200, math.exp(-5)), (100, 200, math.exp(-5 * 0.25)), (200, 200, 1.0), (500, 200, 1.0), (3, 0, 1.0),
])
def test_sigmoid_rampup(epoch, length, expected):
    assert losses.sigmoid_rampup(epoch, length) == pytest.approx(expected)


def test_consistency_weight_gate_and_ramp():
    # ACDC: c = 0.1, R = 200, epoch = t // 150, 0 before t = 1000.
    assert losses.consistency_weight(999, 0.1, 200, 150, 1000) == 0.0
    assert losses.consistency_weight(1000, 0.1, 200, 150, 1000) == pytest.approx(0.1 * math.exp(-5 * (1 - 6 / 200) ** 2))
    assert losses.consistency_weight(15000, 0.1, 200, 150, 1000) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    # LA: R = 40, no gate: t = 0 already has exp(-5) * c.
    assert losses.consistency_weight(0, 0.1, 40, 150) == pytest.approx(0.1 * math.exp(-5))
    assert losses.consistency_weight(6000, 0.1, 40, 150) == pytest.approx(0.1)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (1, 0.5), (9, 0.9), (99, 0.99), (1000, 0.99)])
def test_ema_alpha_warmup(step, expected):
    assert losses.ema_alpha(step, 0.99) == pytest.approx(expected)


def test_ema_update_equals_per_parameter_formula():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in teacher.parameters()]
    EMATeacher.update(teacher, student, 0.9)
    for t_new, t_old, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s)
    EMATeacher.update(teacher, student, 0.0)  # alpha_0 = 0: exact copy
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)


def _factors(scheduler_class, n: int, **kwargs) -> list[float]:
    """LR factors of the first n optimizer steps under a lemis schedule (what LambdaLR really sets)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler, out = scheduler_class(optimizer, **kwargs), []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_poly_lr_follows_ssl4mis_order():
    # Steps 0 and 1 both use the base LR; step t+1 uses (1 - t/N)^0.9.
    assert poly_factor(0, 30000) == 1.0 and poly_factor(1, 30000) == 1.0
    assert poly_factor(2, 30000) == pytest.approx((1 - 1 / 30000) ** 0.9)
    assert poly_factor(15001, 30000) == pytest.approx(0.5 ** 0.9)
    assert _factors(Poly, 4, total_steps=10) == pytest.approx([1.0, 1.0, 0.9 ** 0.9, 0.8 ** 0.9])
    assert _factors(Poly, 12, total_steps=100, power=1.0)[11] == pytest.approx(0.9)  # linear


def test_step_lr_follows_ua_mt_boundaries():
    # 1-based steps 1-2500 use 0.01, 2501-5000 use 0.001: 0-based 0..2499 and 2500..4999.
    factors = _factors(StepDecay, 5001, step_size=2500, gamma=0.1)
    assert factors[2499] == 1.0 and factors[2500] == pytest.approx(0.1) and factors[5000] == pytest.approx(0.01)
    assert _factors(Constant, 3) == [1.0, 1.0, 1.0]


def test_warmup_cosine():
    # W = 2, T = 6: (t + 1)/2 for t < 2, then 0.1 + 0.9 (1 + cos(pi (t - 2)/4))/2
    expected = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55,
                0.1 + 0.45 * (1 + math.cos(0.75 * math.pi)), 0.1]
    assert _factors(WarmupCosine, 7, total_steps=6, warmup_steps=2, min_factor=0.1) == pytest.approx(expected)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        WarmupCosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total_steps=3, warmup_steps=3)


def ua_mt_starts(size: int, patch: int, stride: int) -> list[int]:
    """UA-MT test_util window origins along one axis (after padding to at least the patch)."""
    size = max(size, patch)
    n = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(n)]


@pytest.mark.parametrize("size,patch,stride", [(187, 112, 18), (137, 112, 18), (88, 80, 4), (112, 112, 18),
                                               (150, 112, 18), (150, 64, 64)])
def test_sliding_window_overlap_reproduces_ua_mt_placement(size, patch, stride):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    overlap = overlap_for_stride((patch,), (stride,))
    interval = _get_scan_interval((size,), (patch,), 1, overlap)
    starts = [s[0].start for s in dense_patch_slices((size,), (patch,), interval)]
    assert starts == ua_mt_starts(size, patch, stride)


def test_ignored_voxels_are_in_neither_term():
    """A third voxel labeled 2 (the ignore label), predicted badly: the spec's 2-voxel hand value stands."""
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.01, 0.99]]).T[None, :, :, None]  # [1, K=2, 3, 1]
    label = torch.tensor([[[0], [1], [2]]])
    assert losses.dice_loss(probs, label, ignore_index=2).item() == pytest.approx(0.1269833, abs=1e-6)
    assert losses.supervised_loss(probs.log(), label, ignore_index=2).item() == pytest.approx(0.2469840, abs=1e-6)
    assert losses.supervised_loss(probs.log(), torch.tensor([[[0], [1], [0]]])).item() > 0.5  # the voxel counts
