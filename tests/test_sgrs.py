"""SGRS-Net (spec/methods/sgrs.md): the hand-checkable example of sec. 12, mixing, uncertainty rules, ramp,
the code-quirk options, and one run on phantoms with region logging and drawing."""
import copy
import csv
import math
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from callbacks.ema_teacher import EMATeacher, weight_ema_step
from experiments.cli import LemisCLI
from lightning_modules import losses
from lightning_modules.sgrs import (
    SGRS,
    draw_mix,
    foreground_dice,
    masked_soft_dice,
    mix,
    region_map,
    regional_ce,
    sgrs_code_dice,
    synergy_regions,
    uncertain,
)
from tests.conftest import REPO
from tests.test_experiments import phantom_args

# sec. 12: K = 2, B_u = 1, 4 voxels; logits z = ln p.
P_U_FG = [0.90, 0.20, 0.45, 0.60]
P_M_FG = [0.80, 0.70, 0.10, 0.44]
PSEUDO = torch.tensor([[1, 0, 0, 1]])


def logits_of(fg: list[float]) -> torch.Tensor:
    """[1, 2, 4] logits whose softmax is (1 - fg, fg)."""
    p = torch.tensor(fg, dtype=torch.float64)
    return torch.stack([1 - p, p])[None].log()


def example_regions() -> dict:
    return synergy_regions(torch.softmax(logits_of(P_U_FG), 1), torch.softmax(logits_of(P_M_FG), 1), 0.425)


def as_list(mask: torch.Tensor) -> list[int]:
    return mask[0].int().tolist()


def test_regions_of_the_hand_example():
    r = example_regions()
    assert as_list(r["C"]) == [1, 0, 1, 0] and as_list(r["D"]) == [0, 1, 0, 1]
    assert as_list(r["I"]) == [0, 0, 1, 1]
    assert as_list(r["C'"]) == [1, 0, 0, 0] and as_list(r["D'"]) == [0, 1, 0, 0]
    assert region_map(r)[0].tolist() == [2, 1, 4, 4]  # C' green, D' red, I yellow


@pytest.mark.parametrize("ce_mask,view_u,view_m", [("C'", 0.1167834, 0.3355966), ("C", 0.2662426, 0.3619368)])
def test_regional_ce_terms(ce_mask, view_u, view_m):
    r = example_regions()
    ce_u = regional_ce(logits_of(P_U_FG), PSEUDO, r[ce_mask], r["D'"], eps=0.2)
    ce_m = regional_ce(logits_of(P_M_FG), PSEUDO, r[ce_mask], r["D'"], eps=0.2)
    assert ce_u.item() == pytest.approx(view_u, abs=1e-7) and ce_m.item() == pytest.approx(view_m, abs=1e-7)


@pytest.mark.parametrize("fg,mask,smooth,expected", [
    (P_U_FG, "C'", 1.0, 0.0626959), (P_M_FG, "C'", 1.0, 0.1190476),
    (P_U_FG, "D'", 20.0, 0.0095377), (P_M_FG, "D'", 20.0, 0.0333401),
])
def test_masked_soft_dice_terms(fg, mask, smooth, expected):
    probs = torch.softmax(logits_of(fg), 1)
    assert masked_soft_dice(probs, PSEUDO, example_regions()[mask], smooth).item() == pytest.approx(expected, abs=1e-7)


def test_empty_mask_gives_zero_dice_loss():
    probs = torch.softmax(logits_of(P_U_FG), 1)
    empty = torch.zeros(1, 4, dtype=torch.bool)
    assert masked_soft_dice(probs, PSEUDO, empty, 1.0).item() == pytest.approx(0, abs=1e-7)


def module(**kwargs) -> SGRS:
    return SGRS(net=nn.Identity(), num_classes=2, **kwargs)


@pytest.mark.parametrize("ce_mask,expected", [("c_prime", 0.1411727), ("c", 0.1851225)])
def test_pseudo_loss_of_the_hand_example(ce_mask, expected):
    z_u, z_m = logits_of(P_U_FG), logits_of(P_M_FG)
    terms = module(consistent_ce_mask=ce_mask).pseudo_loss(z_u, z_m, torch.softmax(z_u, 1), torch.softmax(z_m, 1),
                                                          PSEUDO, example_regions())
    assert terms["dice"].item() == pytest.approx(0.0561553, abs=1e-7)
    assert terms["ce"].item() == pytest.approx(0.2261900 if ce_mask == "c_prime" else 0.3140897, abs=1e-7)
    assert terms["pseudo"].item() == pytest.approx(expected, abs=1e-7)
    weight = module().consistency_weight(3000)
    if ce_mask == "c_prime":
        assert weight * terms["pseudo"].item() == pytest.approx(0.0404466, abs=1e-7)


def test_broadcast_bug_weights_every_sample_by_every_mask():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    hard, soft = torch.rand(2, 5, 5) > 0.5, torch.rand(2, 5, 5) > 0.5
    ce_ls = torch.nn.functional.cross_entropy(logits, target, reduction="none", label_smoothing=0.2)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    expected = (hard * ce).mean() + sum((soft[i] * ce_ls[j]).mean() for i in range(2) for j in range(2)) / 4
    assert regional_ce(logits, target, hard, soft, 0.2, broadcast_bug=True).item() == pytest.approx(expected.item())
    per_sample = (hard * ce).mean() + (soft * ce_ls).mean()
    assert regional_ce(logits, target, hard, soft, 0.2).item() == pytest.approx(per_sample.item())


@pytest.mark.parametrize("raw,expected,lam", [(0.3, [0.7, 0.6], 0.7), (0.8, [0.8, 0.4], 0.8)])
def test_mix_folds_lambda_and_blends_with_the_partner(raw, expected, lam):
    x_u = torch.tensor([1.0, 0.0]).view(1, 1, 2)
    x_l = torch.tensor([0.0, 2.0]).view(1, 1, 2)
    x_m, lam_out = mix(x_u, x_l, torch.tensor([raw]), torch.tensor([0]))
    assert x_m.flatten().tolist() == pytest.approx(expected) and lam_out.item() == pytest.approx(lam)


def test_draw_mix_partners_are_distinct_when_batches_match():
    torch.manual_seed(1)
    lam_raw, partner = draw_mix(4, 4, 0.75)
    assert sorted(partner.tolist()) == [0, 1, 2, 3] and ((lam_raw > 0) & (lam_raw < 1)).all()
    _, partner = draw_mix(5, 2, 0.75)
    assert partner.max() <= 1


def test_uncertainty_rules_reduce_to_the_binary_code_rule():
    tau = 0.425
    grid = torch.linspace(0.001, 0.999, 999)
    grid = grid[((grid - tau).abs() > 1e-4) & ((grid - 1 + tau).abs() > 1e-4)]
    probs = torch.stack([grid, 1 - grid], 1).double()  # [N, 2]: p_0 on the grid
    code_rule = (grid > tau) & (grid < 1 - tau)
    assert torch.equal(uncertain(probs, tau, "maxprob"), code_rule)
    assert torch.equal(uncertain(probs, tau, "entropy"), code_rule)
    h = -(tau * math.log10(tau) + (1 - tau) * math.log10(1 - tau))
    assert h == pytest.approx(0.296126, abs=1e-6)  # the paper's base-10 entropy threshold


@pytest.mark.parametrize("p,maxprob,entropy", [((0.5, 0.45, 0.05), True, False), ((0.6, 0.3, 0.1), False, False),
                                               ((0.4, 0.3, 0.3), True, True)])
def test_three_class_uncertainty(p, maxprob, entropy):
    probs = torch.tensor(p, dtype=torch.float64)[None]
    assert uncertain(probs, 0.425, "maxprob").item() is maxprob
    assert uncertain(probs, 0.425, "entropy").item() is entropy


@pytest.mark.parametrize("step,weight", [(0, 0.006738), (149, 0.006738), (150, 0.008625), (1499, 0.049632),
                                         (1500, 0.060055), (3000, 0.286505), (4500, 0.731616), (5999, 0.996880),
                                         (6000, 1.0), (15000, 1.0)])
def test_rampup_values(step, weight):
    assert module().consistency_weight(step) == pytest.approx(weight, abs=1e-6)


def test_ramp_starts_when_the_teacher_is_usable(monkeypatch):
    """ramp_start: teacher, threshold 0.5, running mean with decay 0.5: the teacher's foreground Dice on the
    labeled half is 0 at step 0 (w = 0) and 1 at step 1, so the running Dice is 0.5 * 0 + 0.5 * 1 = 0.5: t0 = 1,
    step 1 gets w(0) = exp(-5), step 3 gets w(2) = exp(-5 (1 - 2/4)^2) = exp(-1.25) and the teacher is no longer
    asked; t0 travels with checkpoints."""
    monkeypatch.setattr(SGRS, "global_step", property(lambda self: self.t))
    m = module(ramp_start="teacher", teacher_dice=0.5, teacher_dice_decay=0.5, rampup_epoch_len=1,
               consistency_rampup=4)
    label = torch.tensor([[0, 1, 1, 0]])

    def not_asked():
        raise AssertionError("the teacher is measured after t0")

    m.t = 0
    assert m.pseudo_weight(lambda: torch.zeros_like(label), label) == 0.0 and m.ramp == {"origin": -1, "dice": 0.0}
    m.t = 1
    assert m.pseudo_weight(lambda: label.clone(), label) == pytest.approx(math.exp(-5)) and m.ramp["origin"] == 1
    m.t = 3
    assert m.pseudo_weight(not_asked, label) == pytest.approx(math.exp(-1.25))
    checkpoint = {}
    m.on_save_checkpoint(checkpoint)
    resumed = module(ramp_start="teacher")
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.ramp == {"origin": 1, "dice": 0.5}
    published = module()
    published.t = 0
    assert published.pseudo_weight(not_asked, label) == published.consistency_weight(0)  # ramp_start: step


def test_foreground_dice_of_present_classes():
    pred, label = torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 2]])
    # class 1: 2*1/(2+1); class 2: 2*1/(1+2); class 3 absent from both: skipped
    assert foreground_dice(pred, label, 4).item() == pytest.approx(2 / 3)
    assert foreground_dice(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), 4).item() == 0


def test_supervised_dice_variants():
    probs = torch.tensor([[0.8, 0.4], [0.2, 0.6]])[None]  # [1, K=2, 2 voxels]
    label = torch.tensor([[0, 1]])
    assert sgrs_code_dice(probs, label).item() == pytest.approx(0.5634921, abs=1e-7)
    assert losses.dice_loss(probs, label).item() == pytest.approx(0.1269833, abs=1e-7)


def test_double_ema_decays_the_student_and_averages_bn_statistics():
    torch.manual_seed(0)
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        for m in (student, teacher):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                t.uniform_(0.5, 1.5)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    e0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    weight_ema_step(teacher, student, 0.99, 2e-4)
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.allclose(teacher.state_dict()[key], 0.99 * e0[key] + 0.01 * s0[key])
        assert torch.allclose(student.state_dict()[key], s0[key] * (1 - 2e-4))
    assert teacher.num_batches_tracked == e0["num_batches_tracked"]  # integer entries untouched


@pytest.mark.parametrize("mode", ["single", "double"])
def test_ema_teacher_modes(mode):
    """After optimizer step 0: single = alpha_0 = 0, the teacher copies the student; double = WeightEMA
    (teacher 0.99 e + 0.01 s, BN statistics included, student decayed) then the EMA with alpha_1 = 0.5."""
    torch.manual_seed(0)
    m = SGRS(net=nn.BatchNorm1d(3), num_classes=2)
    callback = EMATeacher(mode=mode)
    callback.setup(None, m, "fit")
    with torch.no_grad():
        for t in (*m.net.parameters(), m.net.running_mean):
            t.uniform_(0.5, 1.5)
    e0, s0 = copy.deepcopy(m.teacher.state_dict()), copy.deepcopy(m.net.state_dict())
    callback.on_train_batch_end(types.SimpleNamespace(global_step=1, world_size=1), m, None, None, 0)
    for key in ("weight", "bias"):
        if mode == "single":
            torch.testing.assert_close(m.teacher.state_dict()[key], s0[key])
        else:
            s1 = s0[key] * (1 - 2e-4)
            torch.testing.assert_close(m.net.state_dict()[key], s1)
            torch.testing.assert_close(m.teacher.state_dict()[key], 0.5 * (0.99 * e0[key] + 0.01 * s0[key]) + 0.5 * s1)
    expected_mean = e0["running_mean"] if mode == "single" else 0.99 * e0["running_mean"] + 0.01 * s0["running_mean"]
    torch.testing.assert_close(m.teacher.running_mean, expected_mean)
    with pytest.raises(Exception, match="mode must be one of"):
        EMATeacher(mode="triple")


@pytest.mark.parametrize("option", ["uncertainty_rule=median", "sup_dice=other", "tau=0.6"])
def test_bad_options_name_themselves(option):
    name, value = option.split("=")
    with pytest.raises(Exception, match=f"model.init_args.{name}"):
        module(**{name: float(value) if name == "tau" else value})


@pytest.mark.parametrize("config", ["acdc/sgrs.yaml", "la/sgrs.yaml"])
def test_sgrs_logs_regions_and_draws_them(config, acdc_phantom, la_phantom, tmp_path):
    cfg = yaml.safe_load((REPO / "experiments" / config).read_text())
    logger = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ImageLogger"))
    logger["init_args"]["every_n_train_steps"] = 1
    ema = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EMATeacher"))
    ema["init_args"]["mode"] = "double"
    (tmp_path / "sgrs.yaml").write_text(yaml.safe_dump(cfg))
    args = phantom_args(tmp_path / "sgrs.yaml", acdc_phantom, la_phantom, tmp_path)
    cli = LemisCLI(args=["fit", *args, "--trainer.log_every_n_steps=1"])
    run = Path(cli.trainer.log_dir)
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sgrs/frac_c_prime")]
    assert len(rows) == 2
    for r in rows:  # C', D', I partition the voxels; the folded lambda lies in [0.5, 1]
        parts = sum(float(r[f"sgrs/frac_{k}"]) for k in ("c_prime", "d_prime", "uncertain"))
        assert parts == pytest.approx(1.0) and 0.5 <= float(r["sgrs/lambda_mean"]) <= 1.0
    assert (run / "images" / "train_step1.png").is_file() and (run / "images" / "train_step2.png").is_file()
    assert "mode: double" in (run / "config.yaml").read_text()


def test_benchmark_reference_step_does_the_module_arithmetic():
    """experiments.benchmark's plain loop must time the same loss as SGRS.training_step (same RNG draws)."""
    import copy
    import warnings

    from experiments.benchmark import fixed_batch, sgrs_loss
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    sgrs = SGRS(net=net, num_classes=3)
    sgrs.teacher = copy.deepcopy(net).requires_grad_(False)
    batch = fixed_batch("sgrs", 3, (16, 16), 2, 2, "cpu")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = sgrs.training_step(batch, 0)
    torch.manual_seed(1)
    assert torch.equal(loss, sgrs_loss(net, sgrs.teacher, batch, 0, True))
