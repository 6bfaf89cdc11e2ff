"""Histopathology pieces of IKD-MIL (spec/methods/ikd_mil.md): the VGG-MIL net, the MIL / distillation losses and
the per-image metrics, on the spec's hand-checkable examples (sec. 11)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from lemis.errors import ConfigError
from lightning_modules import losses
from lightning_modules.metrics import (
    _ranked_directed,
    blur_threshold,
    contour_points,
    hausdorff_cv_compat,
    hausdorff_max,
    histology_row,
)
from lightning_modules.nets.vgg_mil import VGG16_CONV_INDICES, VGGMIL

# ---- sec. 1: the net -------------------------------------------------------------------------------------------

def test_vgg_mil_parameters_outputs_and_fusion():
    net = VGGMIL().eval()
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 1_738_243
    s1, s2, s3, f = net(torch.randn(2, 3, 64, 64))
    assert all(t.shape == (2, 1, 64, 64) for t in (s1, s2, s3, f))
    assert all(((t > 0) & (t < 1)).all() for t in (s1, s2, s3))
    assert torch.allclose(f, 0.3 * s1 + 0.3 * s2 + 0.4 * s3)


def vgg16_features(seed: int = 0) -> dict:
    """A torchvision-shaped VGG16 ``features`` state dict (random values) for the first three blocks."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256)]
    state = {}
    for index, (c_out, c_in) in zip(VGG16_CONV_INDICES, shapes):
        state[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g)
        state[f"features.{index}.bias"] = torch.randn(c_out, generator=g)
    state["classifier.0.weight"] = torch.zeros(1)  # the rest of a full vgg16 file is ignored
    return state


def test_backbone_weights_load_from_a_file_and_bad_files_are_one_sentence(tmp_path):
    state = vgg16_features()
    torch.save(state, tmp_path / "vgg16.pth")
    net = VGGMIL(backbone_weights=str(tmp_path / "vgg16.pth"))
    for conv, index in zip(net.convs(), VGG16_CONV_INDICES):
        assert torch.equal(conv.weight, state[f"features.{index}.weight"])
        assert torch.equal(conv.bias, state[f"features.{index}.bias"])
    del state["features.12.bias"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ConfigError, match=r"short.pth: features.12.bias is missing"):
        VGGMIL(backbone_weights=str(tmp_path / "short.pth"))
    with pytest.raises(ConfigError, match="not found"):
        VGGMIL(backbone_weights=str(tmp_path / "absent.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ConfigError, match="cannot read VGG16 weights file"):
        VGGMIL(backbone_weights=str(tmp_path / "text.pth"))


# ---- secs. 2-3: losses ---------------------------------------------------------------------------------------

def image(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)[None, None]


def test_image_dice_of_the_hand_example():
    p = image([[1, 0], [0.5, 0.5]])
    ones = torch.ones_like(p)
    assert losses.image_dice_loss(p, ones).item() == pytest.approx(0.285714, abs=1e-6)
    assert losses.image_dice_loss(1 - p, ones).item() == pytest.approx(0.285714, abs=1e-6)
    q = image([[0.8, 0], [1, 0.2]])
    assert losses.image_dice_loss(p, q).item() == pytest.approx(0.24, abs=1e-6)


def test_mil_loss_sums_images_and_outputs():
    p = image([[1, 0], [0.5, 0.5]])
    outputs = (p, p, p, p)
    both = torch.cat([p, p])
    d = 1 - 5 / 7
    assert losses.mil_dice_loss(outputs, torch.tensor([1])).item() == pytest.approx(4 * d)
    assert losses.mil_dice_loss((both,) * 4, torch.tensor([1, 0])).item() == pytest.approx(8 * d)
    teacher = image([[0.8, 0], [1, 0.2]])
    assert losses.mil_dice_loss(outputs, torch.tensor([1]), teacher).item() == pytest.approx(4 * 0.24)


def test_oeem_weights_and_weighted_ce_of_the_hand_example():
    loss = torch.tensor([[0, math.log(3)], [0.2, 0.9], [math.log(2), math.log(2)]]).view(3, 1, 1, 2)
    pseudo = torch.tensor([[0., 1], [1, 1], [0, 1]]).view(3, 1, 1, 2)
    w = losses.oeem_weights(loss, pseudo).view(3, 2)
    assert w.flatten().tolist() == pytest.approx([1.5, 0.5, 1, 1, 1, 1])
    assert (w.view_as(loss) * loss).mean().item() == pytest.approx(0.505933, abs=1e-6)
    square = losses.oeem_weights(torch.tensor([[0, 0], [math.log(3), math.log(3)]]).view(1, 1, 2, 2),
                                 torch.tensor([[0., 1], [0, 1]]).view(1, 1, 2, 2))
    assert square.flatten().tolist() == pytest.approx([1.5, 1.5, 0.5, 0.5])


def test_ce_forms_of_the_hand_example():
    f = torch.tensor([0.9, 0.2]).view(1, 1, 1, 2)
    q = torch.tensor([0.97, 1.0]).view(1, 1, 1, 2)
    code = losses.prob_logit_ce_map(f, q.long().float())  # the code: y = trunc(q) = [0, 1]
    assert code.flatten().tolist() == pytest.approx([1.171101, 1.037488], abs=1e-6)
    lemis = losses.bce_map(f, (q >= 0.5).float())  # lemis: y = [1, 1] (single class: weights 1)
    assert lemis.flatten().tolist() == pytest.approx([0.105361, 1.609438], abs=1e-6)
    assert losses.oeem_weighted_mean(lemis, (q >= 0.5).float()).item() == pytest.approx(lemis.mean().item())


# ---- sec. 7: metrics -----------------------------------------------------------------------------------------

def squares():
    gt = np.zeros((4, 4), bool)
    gt[1:3, 1:3] = True
    pred = np.zeros((4, 4), bool)
    pred[1:3, 1:4] = True
    return pred, gt


def test_hausdorff_max_equals_the_point_set_definition():
    """The distance-transform Hausdorff equals scipy's directed_hausdorff on the pixel coordinates (both ways), on
    random masks and on two single pixels 3-4-5 apart; NaN when a mask is empty."""
    from scipy.spatial.distance import directed_hausdorff

    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random((30, 40)) > 0.97, rng.random((30, 40)) > 0.9
        pa, pb = np.argwhere(a), np.argwhere(b)
        expected = max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])
        assert hausdorff_max(a, b) == pytest.approx(expected, abs=1e-9)
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[1, 1], b[4, 5] = True, True
    assert hausdorff_max(a, b) == 5.0
    assert np.isnan(hausdorff_max(a, np.zeros_like(a)))


def test_positive_and_negative_image_rows():
    pred, gt = squares()
    assert contour_points(pred).tolist() == [[1, 1], [1, 2], [3, 2], [3, 1]]
    assert contour_points(gt).tolist() == [[1, 1], [1, 2], [2, 2], [2, 1]]
    row = histology_row(pred, gt, "pos")
    assert row["f1"] == pytest.approx(0.8) and row["iou"] == pytest.approx(2 / 3)
    assert row["hd_cv"] == 0.0 and row["hd_max"] == 1.0 and row["positive"] == 1
    assert row["f1_pos"] == row["f1"] and "f1_neg" not in row
    negative = np.zeros((4, 4), bool)
    fp = negative.copy()
    fp[0, :2] = True
    row = histology_row(fp, negative, "neg")
    assert row["f1"] == pytest.approx(28 / 30) and row["iou"] == pytest.approx(14 / 16)
    assert "hd_cv" not in row and row["positive"] == 0
    assert contour_points(negative).tolist() == [[0, 0]]


def test_the_rank_rule_depends_on_contour_order():
    a = np.array([(0, 0), (10, 0), (0, 1), (0, 2)], float)
    b = np.array([(0, 0), (0, 1), (0, 2)], float)
    assert max(_ranked_directed(a, b, 0.6), _ranked_directed(b, a, 0.6)) == 10.0
    a = a[[1, 0, 2, 3]]
    assert max(_ranked_directed(a, b, 0.6), _ranked_directed(b, a, 0.6)) == 0.0
    pred, gt = squares()
    assert hausdorff_cv_compat(pred, gt) == 0.0


def test_blur_threshold_of_the_hand_examples():
    dot = np.zeros((41, 41))
    dot[20, 20] = 1
    assert gaussian_filter(dot, 3)[20, 20] == pytest.approx(0.017685, abs=1e-6) and not blur_threshold(dot).any()
    square = np.zeros((41, 41))
    square[10:31, 10:31] = 1
    kept = blur_threshold(square)
    assert kept[20, 20] and kept[10, 20] and not kept[10, 10]
    step = np.zeros((41, 41))
    step[:, 20:] = 1
    assert blur_threshold(step)[:, 20:].all() and not blur_threshold(step)[:, :20].any()
