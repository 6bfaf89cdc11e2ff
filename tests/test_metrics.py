"""Metric conventions of spec/datasets.md ("Metric conventions"); expected values are worked out by hand."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from lightning_modules.metrics import (
    METRIC_NAMES,
    binary_metrics,
    case_metrics,
    summarize,
    surface_distances,
    write_rows_csv,
)

SPACING = (0.85, 1.2, 0.9)


def test_dice_jaccard_of_shifted_squares():
    pred = np.zeros((4, 4), bool)
    gt = np.zeros((4, 4), bool)
    pred[0:2, 0:2] = True
    gt[0:2, 1:3] = True  # overlap 2 voxels, union 6
    m = binary_metrics(pred, gt)
    assert m["dice"] == pytest.approx(2 * 2 / (4 + 4))
    assert m["jaccard"] == pytest.approx(2 / 6)
    assert m["empty"] == 0


def test_cube_shifted_by_one_voxel():
    # 3x3x3 cubes, the second shifted by 1 along axis 0. Each border has 26 voxels (all but the centre).
    # P -> G: the 9 voxels of P's x=0 face and P's x=2 face centre (G's interior voxel) are 1 voxel away from
    # G's border; the other 16 lie on it. By symmetry the same holds for G -> P.
    pred = np.zeros((7, 5, 5), bool)
    gt = np.zeros((7, 5, 5), bool)
    pred[1:4, 1:4, 1:4] = True
    gt[2:5, 1:4, 1:4] = True
    m = binary_metrics(pred, gt, spacing=SPACING)
    # pooled: 32 zeros and 20 ones, the 95th percentile falls among the ones
    assert m["hd95"] == pytest.approx(1.0)
    assert m["asd"] == pytest.approx(10 / 26)
    assert m["assd"] == pytest.approx(10 / 26)
    # in mm each one-voxel step is along axis 0 (0.85 mm beats 1.2 and 0.9 mm sideways)
    assert m["hd95_mm"] == pytest.approx(0.85)
    assert m["asd_mm"] == pytest.approx(10 * 0.85 / 26)
    assert m["assd_mm"] == pytest.approx(10 * 0.85 / 26)
    assert m["dice"] == pytest.approx(2 * 18 / 54)
    assert m["jaccard"] == pytest.approx(18 / 36)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_sheet_shifted_by_k_along_an_axis(axis, k):
    # A one-voxel-thick sheet is all border, and every voxel is exactly k steps from the shifted copy.
    shape = [9, 9, 9]
    sheet = [slice(2, 6)] * 3
    sheet[axis] = slice(1, 2)
    pred = np.zeros(shape, bool)
    pred[tuple(sheet)] = True
    gt = np.roll(pred, k, axis=axis)
    m = binary_metrics(pred, gt, spacing=SPACING)
    for name in ("hd95", "asd", "assd"):
        assert m[name] == pytest.approx(k)
        assert m[f"{name}_mm"] == pytest.approx(k * SPACING[axis])
    np.testing.assert_allclose(surface_distances(pred, gt, SPACING), k * SPACING[axis])


def test_hd95_pools_both_directions():
    # P = two isolated pixels 4 apart, G = one of them. d(P->G) = [0, 4], d(G->P) = [0].
    # pooled [0, 0, 4]: position 0.95 * 2 = 1.9 -> 0 + 0.9 * 4 = 3.6
    # max of directional percentiles: max(0.95 * 4, 0) = 3.8 (MONAI's definition, not ours)
    pred = np.zeros((3, 7), bool)
    gt = np.zeros((3, 7), bool)
    pred[1, 1] = pred[1, 5] = True
    gt[1, 1] = True
    m = binary_metrics(pred, gt)
    assert m["hd95"] == pytest.approx(3.6)
    assert m["asd"] == pytest.approx(2.0)  # directed pred -> gt: (0 + 4) / 2
    assert m["assd"] == pytest.approx(1.0)  # mean of the directed means (2 + 0) / 2, not the pooled 4 / 3
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["jaccard"] == pytest.approx(1 / 2)


SHAPE = (4, 5, 6)
EMPTY_SPACING = (0.5, 2.0, 1.0)
DIAG = math.sqrt(4**2 + 5**2 + 6**2)
DIAG_MM = math.sqrt(2.0**2 + 10.0**2 + 6.0**2)


def _masks(pred_empty: bool, gt_empty: bool):
    blob = np.zeros(SHAPE, bool)
    blob[1:3, 1:3, 1:3] = True
    empty = np.zeros(SHAPE, bool)
    return (empty if pred_empty else blob), (empty if gt_empty else blob)


ZEROS = (0.0, 0.0, 0.0, 0.0)  # dice, jaccard, distance (voxels), distance (mm)


@pytest.mark.parametrize(
    "convention, pred_empty, gt_empty, expected, empty",
    [
        ("lemis", True, True, (1.0, 1.0, 0.0, 0.0), 0),
        ("lemis", True, False, (0.0, 0.0, DIAG, DIAG_MM), 1),
        ("lemis", False, True, (0.0, 0.0, DIAG, DIAG_MM), 1),
        ("legacy_zero", True, True, ZEROS, 0),
        ("legacy_zero", True, False, ZEROS, 1),
        ("legacy_zero", False, True, (0.0, 0.0, DIAG, DIAG_MM), 1),
    ],
)
def test_empty_rules(convention, pred_empty, gt_empty, expected, empty):
    pred, gt = _masks(pred_empty, gt_empty)
    m = binary_metrics(pred, gt, spacing=EMPTY_SPACING, empty_convention=convention)
    dice, jaccard, dist, dist_mm = expected
    assert m["dice"] == pytest.approx(dice)
    assert m["jaccard"] == pytest.approx(jaccard)
    for name in ("hd95", "asd", "assd"):
        assert m[name] == pytest.approx(dist)
        assert m[f"{name}_mm"] == pytest.approx(dist_mm)
    assert m["empty"] == empty


@pytest.mark.parametrize("pred_empty, gt_empty", [(False, False), (True, True), (True, False), (False, True)])
def test_no_spacing_gives_nan_mm_columns(pred_empty, gt_empty):
    pred, gt = _masks(pred_empty, gt_empty)
    m = binary_metrics(pred, gt)
    assert set(m) == set(METRIC_NAMES) | {"empty"}
    for name in ("hd95_mm", "asd_mm", "assd_mm"):
        assert math.isnan(m[name])
    for name in ("dice", "hd95", "asd", "assd"):
        assert not math.isnan(m[name])


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="empty_convention"):
        binary_metrics(np.ones((2, 2)), np.ones((2, 2)), empty_convention="medpy")
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        binary_metrics(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 2\)"):
        case_metrics(np.ones((2, 2), int), np.ones((3, 2), int), num_classes=2, case="c")


def _label_maps():
    pred = np.zeros((6, 6), int)
    gt = np.zeros((6, 6), int)
    pred[0:2, 0:2] = 1
    gt[0:2, 0:2] = 1
    gt[4:6, 4:6] = 2  # class 2 missed: empty prediction
    return pred, gt


def test_case_metrics_rows():
    pred, gt = _label_maps()
    rows = case_metrics(pred, gt, num_classes=3, case="patient001", class_names=("RV", "LV"))
    assert [(r["case"], r["class"]) for r in rows] == [("patient001", "RV"), ("patient001", "LV")]
    assert rows[0]["dice"] == 1.0 and rows[0]["empty"] == 0
    assert rows[1]["dice"] == 0.0 and rows[1]["empty"] == 1
    assert rows[1]["hd95"] == pytest.approx(math.sqrt(72))
    default = case_metrics(pred, gt, num_classes=3, case="p")
    assert [r["class"] for r in default] == ["1", "2"]


def _row(case, cls, dice, hd95, hd95_mm, empty=0):
    row = {"case": case, "class": cls, **{name: 0.0 for name in METRIC_NAMES}, "empty": empty}
    row.update(dice=dice, hd95=hd95, hd95_mm=hd95_mm)
    return row


def test_summarize_means_by_hand():
    rows = [
        _row("a", "x", dice=1.0, hd95=2.0, hd95_mm=1.0),
        _row("a", "y", dice=0.5, hd95=6.0, hd95_mm=float("nan")),
        _row("b", "x", dice=0.0, hd95=4.0, hd95_mm=3.0, empty=1),
        _row("b", "y", dice=0.25, hd95=10.0, hd95_mm=5.0),
    ]
    s = summarize(rows)
    assert s["dice/x"] == pytest.approx(0.5)
    assert s["dice/y"] == pytest.approx(0.375)
    assert s["dice/mean"] == pytest.approx(0.4375)
    assert s["hd95/x"] == pytest.approx(3.0)
    assert s["hd95/y"] == pytest.approx(8.0)
    assert s["hd95/mean"] == pytest.approx(5.5)
    assert s["hd95_mm/x"] == pytest.approx(2.0)
    assert math.isnan(s["hd95_mm/y"]) and math.isnan(s["hd95_mm/mean"])
    assert s["n_empty"] == 1
    assert s["n_cases"] == 2


def test_summarize_averages_a_column_over_the_rows_that_have_it():
    rows = [{"case": "a", "f1": 0.8, "hd_cv": 2.0}, {"case": "b", "f1": 0.4}, {"case": "c", "f1": 0.3, "hd_cv": 4.0}]
    s = summarize(rows)
    assert s["f1/mean"] == pytest.approx(0.5) and s["hd_cv/mean"] == pytest.approx(3.0) and s["n_cases"] == 3


def test_write_rows_csv_round_trip(tmp_path):
    pred, gt = _label_maps()
    rows = case_metrics(pred, gt, num_classes=3, case="p1") + case_metrics(gt, gt, num_classes=3, case="p2")
    path = tmp_path / "run" / "per_case.csv"
    path.parent.mkdir()
    path.write_text("stale\n")
    write_rows_csv(rows, path)
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows)
    for written, read in zip(rows, back):
        assert list(read) == ["case", "class", *METRIC_NAMES, "empty"]
        assert read["case"] == written["case"] and read["class"] == written["class"]
        for name in METRIC_NAMES:
            np.testing.assert_equal(float(read[name]), written[name])
        assert int(read["empty"]) == written["empty"]
    assert [p.name for p in path.parent.iterdir()] == ["per_case.csv"]


def test_write_rows_csv_creates_parent(tmp_path):
    path = tmp_path / "a" / "b" / "rows.csv"
    write_rows_csv([{"case": "c", "dice": 0.5}], path)
    assert path.read_text().splitlines() == ["case,dice", "c,0.5"]


def _reference(pred, gt, spacing):
    """medpy 0.4 on the full, uncropped arrays: (hd95, asd, assd)."""
    cross = generate_binary_structure(pred.ndim, 1)
    borders = [m ^ binary_erosion(m, structure=cross, iterations=1) for m in (pred, gt)]
    d_pg = distance_transform_edt(~borders[1], sampling=spacing)[borders[0]]
    d_gp = distance_transform_edt(~borders[0], sampling=spacing)[borders[1]]
    return np.percentile(np.concatenate([d_pg, d_gp]), 95), d_pg.mean(), (d_pg.mean() + d_gp.mean()) / 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounding_box_crop_matches_uncropped(seed):
    rng = np.random.default_rng(seed)
    shape = (20, 18, 16)
    pred = np.zeros(shape, bool)
    gt = np.zeros(shape, bool)
    # small irregular structures, one of them touching the array edge so the crop margin gets clipped
    pred[6:11, 5:9, 4:8] = rng.random((5, 4, 4)) > 0.3
    gt[7:13, 4:9, 0:6] = rng.random((6, 5, 6)) > 0.3
    m = binary_metrics(pred, gt, spacing=SPACING)
    expected = _reference(pred, gt, None) + _reference(pred, gt, SPACING)
    got = tuple(m[name] for name in ("hd95", "asd", "assd", "hd95_mm", "asd_mm", "assd_mm"))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    cross = generate_binary_structure(3, 1)
    border_gt = gt ^ binary_erosion(gt, structure=cross)
    border_pred = pred ^ binary_erosion(pred, structure=cross)
    full = distance_transform_edt(~border_gt, sampling=SPACING)[border_pred]
    np.testing.assert_array_equal(surface_distances(pred, gt, SPACING), full)
