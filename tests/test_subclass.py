"""Subclass learning (spec/methods/subclass.md): the hand-checkable numbers of secs. 1-5, the branched net's
heads, the coarse stream that never carries a fine label, fine + coarse evaluation, and real BraTS steps."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from datamodules.acdc import ACDCDataModule
from datamodules.hierarchy import Hierarchy
from experiments.__main__ import main
from lemis.errors import ConfigError
from lightning_modules.nets.branched_unet import BranchedUNet
from lightning_modules.subclass import (
    Subclass,
    accept,
    bounding_box,
    mix_pair,
    mixed_target,
    second_view,
    soft_target_loss,
    tau,
    undo_view,
    unsup_ramp,
)
from tests.conftest import REPO, real

ACDC = Hierarchy.from_mapping({1: [1, 2, 3]})


# ---- sec. 1: the hierarchy -------------------------------------------------------------------------------------

def test_superclass_derivation_of_the_spec_examples():
    assert ACDC.coarse(np.array([[0, 1, 2], [3, 3, 0]])).tolist() == [[0, 1, 1], [1, 1, 0]]
    assert ACDC.coarse(torch.tensor([[0, 1], [2, 3]])).tolist() == [[0, 1], [1, 1]]  # BraTS after 4 -> 3
    two = Hierarchy.from_mapping({1: [1, 2], 2: [3]})
    assert two.parent == (0, 1, 1, 2) and (two.num_coarse, two.num_fine) == (3, 4)
    assert two.coarse(np.array([1, 2, 3, 0])).tolist() == [1, 1, 2, 0]
    assert two.coarse(torch.tensor([1, 2, 3, 0])).tolist() == [1, 1, 2, 0]


@pytest.mark.parametrize("mapping", [{1: [2, 1, 3]}, {1: [1, 3]}, {2: [1, 2, 3]}, {1: [1, 2], 2: [2, 3]},
                                     {1: []}, {"a": [1]}])
def test_mappings_a_head_cannot_lay_out_are_refused(mapping):
    with pytest.raises(ConfigError, match="coarse_mapping"):
        Hierarchy.from_mapping(mapping)


# ---- sec. 2: the net -----------------------------------------------------------------------------------------

def head_params(net: BranchedUNet) -> int:
    return sum(p.numel() for p in net.head.parameters() if p.requires_grad)


@pytest.mark.parametrize("dims,pc,sn,count", [(2, False, False, 2454), (2, True, False, 2462), (2, False, True, 4789),
                                              (2, True, True, 4792), (3, False, False, 7062), (3, True, True, 14008)])
def test_head_parameter_counts_and_shapes(dims, pc, sn, count):
    shape = (2, 1, 64, 64) if dims == 2 else (1, 4, 32, 32, 32)
    net = BranchedUNet(shape[1], dims=dims, prior_concatenation=pc, separate_normalization=sn).eval()
    assert head_params(net) == count
    out = net(torch.randn(shape))
    assert out["coarse"].shape == (shape[0], 2, *shape[2:]) and out["fine"].shape == (shape[0], 4, *shape[2:])
    assert torch.equal(out["coarse"][:, 0], out["fine"][:, 0]) == sn  # the shared background logit


def test_separate_normalization_ends_the_backbone_with_a_bare_conv():
    plain, sn = BranchedUNet(1), BranchedUNet(1, separate_normalization=True)
    assert isinstance(plain.decoder[-1][-1], torch.nn.ReLU) and isinstance(sn.decoder[-1][-1], torch.nn.Conv2d)
    assert all(isinstance(level[-1], torch.nn.ReLU) for level in sn.decoder[:-1])  # v2: only the last block


def test_general_mapping_has_one_branch_per_superclass():
    net = BranchedUNet(1, mapping={1: [1, 2], 2: [3]}, separate_normalization=True, prior_concatenation=True).eval()
    assert [b.fine.out_channels for b in net.head.branches] == [2, 1]
    assert [b.fine.in_channels for b in net.head.branches] == [17, 17]  # PC: the branch's own coarse logit
    out = net(torch.randn(1, 1, 32, 32))
    assert out["coarse"].shape[1] == 3 and out["fine"].shape[1] == 4
    assert torch.equal(out["coarse"][:, 0], out["fine"][:, 0])


# ---- sec. 3: pseudo labels -----------------------------------------------------------------------------------

@pytest.mark.parametrize("step,value", [(0, 1.0), (9, 1.0), (10, 0.999), (100, 0.990045), (1000, 0.904792),
                                        (5000, 0.606379), (9159, 0.400333), (9160, 0.4), (40000, 0.4)])
def test_tau_schedule(step, value):
    assert tau(step) == pytest.approx(value, abs=1e-6)


def vec(*v):
    return torch.tensor(v, dtype=torch.float64).view(1, 4, 1)


@pytest.mark.parametrize("t,y_c,q,r,expected", [
    (0.5, 1, (.1, .7, .1, .1), (.1, .6, .2, .1), (0, 1, 0, 0)),
    (0.5, 1, (.1, .7, .1, .1), (.1, .3, .5, .1), (0, 0, 0, 0)),
    (0.5, 0, (.2, .7, .05, .05), (.2, .7, .05, .05), (0, 0, 0, 0)),
    (0.5, 0, (.9, .05, .03, .02), (.8, .1, .05, .05), (1, 0, 0, 0)),
    (0.5, 1, (.9, .05, .03, .02), (.9, .05, .03, .02), (0, 0, 0, 0)),
    (0.4, 1, (.1, .45, .45, 0), (.1, .45, .45, 0), (0, 1, 1, 0)),
    (1.0, 1, (0, 1, 0, 0), (0, 1, 0, 0), (0, 0, 0, 0)),
])
def test_pseudo_label_acceptance_table(t, y_c, q, r, expected):
    p = accept(vec(*q), vec(*r), torch.tensor([[y_c]]), ACDC.parent, t)
    assert p.view(-1).tolist() == list(expected)


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (1, 2, 3, 8, 8)])
def test_second_view_is_undone_exactly(shape):
    x = torch.randn(shape)
    for k in range(4):
        for axis in (-2, -1):
            view = second_view(x, k, axis)
            assert undo_view(view, k, axis).equal(x)
            assert k == 0 or not view.equal(x)


# ---- sec. 4: HierarchicalMix ---------------------------------------------------------------------------------

def example_2d():
    coarse_u = torch.zeros(6, 6, dtype=torch.long)
    coarse_u[2, 2] = coarse_u[2, 3] = coarse_u[3, 3] = 1
    label_l = torch.zeros(6, 6, dtype=torch.long)
    label_l[0, 0], label_l[0, 1], label_l[1, 0] = 1, 2, 3
    return coarse_u, label_l


def test_mix_2d_without_resize():
    coarse_u, label_l = example_2d()
    assert bounding_box(label_l > 0) == (slice(0, 2), slice(0, 2))
    assert bounding_box(coarse_u > 0) == (slice(2, 4), slice(2, 4))
    x_mix, y_mix, alpha = mix_pair(torch.full((1, 6, 6), 2.0), coarse_u, torch.full((1, 6, 6), 10.0), label_l, 0.5)
    expected = torch.full((1, 6, 6), 2.0)
    expected[0, 2, 2] = expected[0, 2, 3] = 6.0
    assert torch.equal(x_mix, expected) and alpha == 0.5
    expected_y = torch.zeros(6, 6, dtype=torch.long)
    expected_y[2, 2], expected_y[2, 3] = 1, 2  # the 3 lands on (3, 2), outside the superclass
    assert torch.equal(y_mix, expected_y)


def test_mix_2d_with_nearest_resize():
    _, label_l = example_2d()
    coarse_u = torch.zeros(6, 6, dtype=torch.long)
    coarse_u[1:5, 1:5] = 1
    x_mix, y_mix, _ = mix_pair(torch.zeros(1, 6, 6), coarse_u, torch.full((1, 6, 6), 8.0), label_l, 1.0)
    block = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 0, 0], [3, 3, 0, 0]])
    assert torch.equal(y_mix[1:5, 1:5], block) and int(y_mix.count_nonzero()) == 12
    assert torch.equal(x_mix[0], (y_mix > 0).float() * 8)


def test_mix_3d():
    coarse_u = torch.zeros(4, 4, 4, dtype=torch.long)
    coarse_u[1:3, 1:3, 1:3] = 1
    label_l = torch.zeros(4, 4, 4, dtype=torch.long)
    label_l[:2, :2, :2] = 2
    label_l[0, 0, 0], label_l[1, 1, 1] = 1, 3
    x_mix, y_mix, _ = mix_pair(torch.zeros(2, 4, 4, 4), coarse_u, torch.full((2, 4, 4, 4), 4.0), label_l, 0.25)
    assert torch.equal(x_mix, coarse_u.float().expand(2, -1, -1, -1))  # 0.25 * 4 on the cube, every channel
    assert int(y_mix[1, 1, 1]) == 1 and int(y_mix[2, 2, 2]) == 3
    assert (y_mix[1:3, 1:3, 1:3] == 2).sum() == 6 and int(y_mix.count_nonzero()) == 8


def test_mix_with_an_empty_superclass_keeps_the_image():
    _, label_l = example_2d()
    x_u = torch.randn(1, 6, 6)
    x_mix, y_mix, alpha = mix_pair(x_u, torch.zeros(6, 6, dtype=torch.long), torch.ones(1, 6, 6), label_l, 0.7)
    assert torch.equal(x_mix, x_u) and not y_mix.any() and alpha == 0.0


def three_voxel_target():
    pseudo = torch.tensor([[0., 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]).T[None]  # [1, K_f = 4, 3 voxels]
    return mixed_target(pseudo, torch.tensor([[2, 0, 0]]), torch.tensor([0.5]), 4)


def test_mixed_target_formula():
    target = three_voxel_target()
    assert target[0].T.tolist() == [[0, .5, .5, 0], [.5, 0, 0, 0], [1, 0, 0, 0]]
    only_mix = mixed_target(None, torch.tensor([[2, 0, 0]]), torch.tensor([0.5]), 4)
    assert only_mix[0].T.tolist() == [[0, 0, .5, 0], [.5, 0, 0, 0], [.5, 0, 0, 0]]
    region = mixed_target(torch.tensor([[0., 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]).T[None], torch.tensor([[2, 0, 0]]),
                          torch.tensor([0.5]), 4, "region")
    assert region[0].T.tolist() == [[0, .5, .5, 0], [0, 0, 0, 0], [1, 0, 0, 0]]  # P outside the pasted voxel


# ---- sec. 5: losses and ramp ---------------------------------------------------------------------------------

def test_unsupervised_loss_value_check():
    target = three_voxel_target().double()
    logits = torch.zeros_like(target)
    assert torch.nn.functional.cross_entropy(logits, target).item() == pytest.approx(1.155245, abs=1e-6)
    loss = soft_target_loss(logits, target)
    assert loss.item() == pytest.approx(0.688516, abs=1e-6)
    assert (unsup_ramp(0) * loss).item() == pytest.approx(0.344258, abs=1e-6)


@pytest.mark.parametrize("step,value", [(0, 0.5), (1, 0.731059), (1000, 0.731059), (1001, 0.880797),
                                        (2001, 0.952574), (5000, 0.993307)])
def test_ramp_is_the_code_formula(step, value):
    assert unsup_ramp(step) == pytest.approx(value, abs=1e-6)
    assert unsup_ramp(step) == pytest.approx(1 / (1 + math.exp(-step // 1000)), abs=1e-12)


# ---- sec. 6: a training step -----------------------------------------------------------------------------------

def batch(dims: int):
    torch.manual_seed(0)
    spatial = (32, 32) if dims == 2 else (16, 16, 16)
    label = torch.zeros(2, *spatial, dtype=torch.long)
    label[:, 4:12, 4:12] = torch.randint(1, 4, (2, 8, 8) + spatial[2:])
    coarse_u = torch.zeros(3, *spatial, dtype=torch.long)
    coarse_u[:, 6:14, 6:14] = 1
    channels = 1 if dims == 2 else 4
    lab = {"image": torch.randn(2, channels, *spatial), "label": label, "coarse_label": ACDC.coarse(label)}
    return {"labeled": lab, "unlabeled": {"image": torch.randn(3, channels, *spatial), "coarse_label": coarse_u}}


def module(dims: int, **kwargs) -> Subclass:
    net = BranchedUNet(1 if dims == 2 else 4, dims=dims, prior_concatenation=True, separate_normalization=True)
    return Subclass(net=net, num_classes=4, **kwargs)


@pytest.mark.parametrize("dims", [2, 3])
def test_every_parameter_gets_a_gradient_with_hierarchical_mix(dims):
    m = module(dims, pseudo_label=True, hierarchical_mix=True)
    m.training_step(batch(dims), 0).backward()
    assert [n for n, p in m.net.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


@pytest.mark.parametrize("pseudo", [True, False])
def test_the_code_switch_gives_the_mixed_loss_no_gradient(pseudo):
    m = module(2, pseudo_label=pseudo, hierarchical_mix=True, mix_grad=False)
    b = batch(2)
    lab, unl = b["labeled"], b["unlabeled"]
    fine = m.net(unl["image"])["fine"]
    assert not m.unsupervised_loss(fine, lab, unl, {}).requires_grad
    m.hparams.mix_grad = True
    assert m.unsupervised_loss(fine, lab, unl, {}).requires_grad


def test_fine_only_row_never_forwards_the_coarse_cases():
    m = module(2, coarse_loss=False)
    seen = []
    m.net.register_forward_hook(lambda net, args, out: seen.append(args[0].shape[0]))
    m.training_step(batch(2), 0)
    assert seen == [2]
    m = module(2, pseudo_label=True, hierarchical_mix=True)
    m.net.register_forward_hook(lambda net, args, out: seen.append(args[0].shape[0]))
    seen.clear()
    m.training_step(batch(2), 0)
    assert seen == [5, 3, 3]  # joint pass, the second view, the mixed images


# ---- data: the coarse stream -----------------------------------------------------------------------------------

def test_coarse_cases_carry_only_their_superclass(acdc_phantom):
    dm = ACDCDataModule(str(acdc_phantom), labeled=2, batch_size=4, labeled_batch_size=2, patch_size=(64, 64),
                        augment="crop", num_workers=0, coarse_mapping={1: [1, 2, 3]})
    dm.setup("fit")
    for i in range(len(dm.datasets["unlabeled"])):
        sample = dm.datasets["unlabeled"][i]
        assert "label" not in sample and sample["granularity"] == 0
        with h5py.File(acdc_phantom / "data" / "slices" / f"{sample['case']}.h5") as f:
            fine = f["label"][()]
        assert np.array_equal(sample["coarse_label"].numpy(), ACDC.coarse(fine))  # crop 64 of 64: no change
    assert all(set(np.unique(d["label"])) <= {0, 1} for (_, _, s), d in dm._cache.items() if s == "unlabeled")
    lab = dm.datasets["labeled"][0]
    assert lab["granularity"] == 1 and torch.equal(lab["coarse_label"], ACDC.coarse(lab["label"]))
    first, _, _ = next(iter(dm.train_dataloader()))
    assert set(first["unlabeled"]) == {"image", "coarse_label", "granularity", "case"}
    assert set(first["labeled"]) == {"image", "label", "coarse_label", "granularity", "case"}


def test_mapping_must_match_the_data(acdc_phantom, tmp_path, capsys):
    args = ["fit", "--config", str(REPO / "experiments" / "acdc" / "subclass.yaml"),
            f"--data.init_args.root={acdc_phantom}", "--data.init_args.coarse_mapping=null",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.accelerator=cpu"]
    assert main(args) == 2
    assert "data.init_args.coarse_mapping=None must equal the net's mapping" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---- evaluation ----------------------------------------------------------------------------------------------

def test_fine_and_coarse_rows_of_one_case():
    m = module(2)
    gt = np.zeros((1, 4, 4), dtype=np.int64)
    gt[0, 0, :2], gt[0, 1, :2], gt[0, 2, :2] = 1, 2, 3  # RV row, Myo row, LV row; heart = 6 voxels
    pred = gt.copy()
    pred[0, 2, :2] = 2  # LV called Myo: fine LV missed, heart perfect
    probs = torch.zeros(1, 6, 1, 4, 4)
    probs[0, 4] = 1.0
    probs[0, 5, 0, :3, :2] = 1.0
    probs[0, 4, 0, :3, :2] = 0.0
    probs[0, 5, 0, 3, 0] = 1.0  # one false-positive heart voxel
    probs[0, 4, 0, 3, 0] = 0.0
    m._class_names = lambda: ("RV", "Myo", "LV")
    rows = m.score_case(pred, gt, {"case": ["c"], "spacing": [None]}, probs)
    by = {r["class"]: r for r in rows}
    assert by["RV"]["dice"] == 1.0 and by["LV"]["dice"] == 0.0 and by["Myo"]["dice"] == pytest.approx(2 * 2 / 6)
    assert by["Myo"]["precision"] == 0.5 and by["Myo"]["recall"] == 1.0
    assert by["LV"]["precision"] == 0.0 and by["LV"]["recall"] == 0.0
    assert all(r["coarse_dice"] == pytest.approx(2 * 6 / 13) for r in rows)
    assert all(r["coarse_precision"] == pytest.approx(6 / 7) and r["coarse_recall"] == 1.0 for r in rows)


# ---- real data -----------------------------------------------------------------------------------------------

@pytest.mark.real_data
def test_real_brats_cases_train_subclass_steps(tmp_path):
    root = real("BraTS2018-subset")
    args = ["fit", "--config", str(REPO / "experiments" / "brats" / "subclass.yaml"), f"--data.init_args.root={root}",
            "--data.init_args.labeled=1", "--data.init_args.val_cases=0", "--data.init_args.patch_size=[48,48,48]",
            "--data.init_args.batch_size=2", "--data.init_args.labeled_batch_size=1",
            "--data.init_args.num_workers=0", "--model.init_args.sw_stride=[48,48,48]",
            "--model.init_args.net.init_args.channels=[4,8,16,32,64]", "--model.init_args.sw_batch_size=8",
            "--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
            "--trainer.val_check_interval=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main(args) == 0
    (rows,) = tmp_path.rglob("per_case_val.csv")
    header, *lines = rows.read_text().splitlines()
    assert {"coarse_dice", "precision", "recall"} <= set(header.split(","))
    assert {line.split(",")[2] for line in lines} == {"NCR", "ED", "ET"}
    (metrics,) = tmp_path.rglob("metrics.csv")
    assert "loss/unsup" in metrics.read_text().splitlines()[0]


def test_crop_augment_pads_a_smaller_slice_and_bad_options_are_refused(acdc_phantom):
    dm = ACDCDataModule(str(acdc_phantom), labeled=2, batch_size=2, patch_size=(80, 80), augment="crop",
                        num_workers=0)
    dm.setup("fit")
    sample = dm.datasets["labeled"][0]
    assert sample["image"].shape == (1, 80, 80) and sample["label"].shape == (80, 80)
    assert not sample["image"][0, :8].any() and not sample["image"][0, -8:].any()  # 64 centred in 80
    with pytest.raises(ConfigError, match="data.init_args.augment"):
        ACDCDataModule(str(acdc_phantom), augment="mixup")
    with pytest.raises(ConfigError, match="coarse_mapping has 3 fine classes"):
        ACDCDataModule(str(acdc_phantom), coarse_mapping={1: [1, 2]})


def test_sigkill_then_resume_equals_uninterrupted(acdc_phantom, tmp_path):
    """Second views, mixing partners and alpha are drawn from torch's generator: a killed run resumes them."""
    from tests.test_resume import assert_same_end, final, fit
    from tests.test_resume import config as resume_config

    cfg = resume_config(tmp_path, "acdc/subclass.yaml")
    extra = ["--model.init_args.tau_base=0.5", "--model.init_args.tau_every=1", "--model.init_args.ramp_every=2",
             "--model.init_args.infer_mode=slices"]
    whole = fit(cfg, acdc_phantom, tmp_path / "whole", *extra)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = fit(cfg, acdc_phantom, tmp_path / "runs", *extra, kill=f"7:6:{tmp_path / 'step6.ckpt'}")
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = fit(cfg, acdc_phantom, tmp_path / "runs", *extra, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    end, rows = final(tmp_path / "runs")
    assert any(float(r.get("accepted", 0)) > 0 for r in rows)  # pseudo labels were accepted on resumed steps
    assert_same_end((end, rows), final(tmp_path / "whole"), start=7, callbacks=("RNGState",))
