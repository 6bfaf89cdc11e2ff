"""CLISC's label-free rules (spec/methods/clisc.md) on the spec's hand examples and a FLAIR-like phantom."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lightning_modules.clisc import (
    cam_mask,
    dice,
    dilated_box,
    equalise,
    frame_scale,
    intensity_slice_labels,
    keep_large_components,
    largest_component,
    majority_vote,
    point_prompts,
    s3f_keep,
    slice_probability,
)


@pytest.mark.parametrize("fraction,p,certain", [(0.0, 0.0, True), (0.005, 0.2, True), (0.01, 0.5, False),
                                                (0.02, 0.8, True)])
def test_labeller_probability_and_certainty(fraction, p, certain):
    assert slice_probability(fraction) == pytest.approx(p)
    assert (max(p, 1 - p) >= 0.6 - 1e-12) == certain


def test_majority_vote_examples():
    z = list(range(12))
    assert majority_vote(z, [0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1]) == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1]
    assert majority_vote(z, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0])[6] == 0  # 10 voters, 5 vs 5: a tie gives 0
    far = [0, 1, 2, 3, 4, 20, 21, 22, 23, 24, 25, 26]  # a gap: voters more than 6 slices away do not vote
    assert majority_vote(far, [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1])[5] == 0


def phantom(tumour: bool) -> np.ndarray:
    rng = np.random.default_rng(0)
    d, h, w = 40, 48, 48
    zz, yy, xx = np.mgrid[:d, :h, :w]
    brain = ((zz - 20) / 18) ** 2 + ((yy - 24) / 20) ** 2 + ((xx - 24) / 20) ** 2 <= 1
    volume = np.where(brain, rng.normal(100, 5, brain.shape), 0.0)
    if tumour:
        sphere = (zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 22) ** 2 <= 36
        volume[sphere] = 180
    return volume


def test_intensity_labeller_on_a_phantom():
    rows = intensity_slice_labels(phantom(True))
    positive = [r["z"] for r in rows if r["raw"] == 1]
    assert positive and all(14 <= z <= 26 for z in positive) and 20 in positive
    assert all(r["raw"] == 0 for r in rows if r["certain"] and abs(r["z"] - 20) > 8)
    assert not any(r["raw"] == 1 for r in intensity_slice_labels(phantom(False)))
    assert not rows[0]["certain"]  # an almost brain-free end slice


def test_component_rules():
    mask = np.zeros((10, 10, 40), bool)
    for start, size in ((0, 9), (12, 4), (20, 3), (30, 2)):  # sizes 90, 40, 30, 20 (x10 rows)
        mask[:, 0, start:start + size] = True
    kept = keep_large_components(mask)
    assert sorted(np.bincount(ndimage.label(kept, np.ones((3, 3, 3)))[0].ravel())[1:]) == [30, 40, 90]
    assert largest_component(mask).sum() == 90
    cam = np.zeros((6, 6, 6))
    cam[1:5, 1:5, 1:5] = 0.5
    cam[0, 0, 0] = 0.9  # a lone voxel: removed by the opening
    assert cam_mask(cam).sum() == 64 and not cam_mask(cam)[0, 0, 0]


def test_boxes_frames_and_points():
    mask = np.zeros((240, 240), bool)
    mask[100:120, 80:110] = True
    assert dilated_box(mask, 0) == (80, 100, 109, 119) and dilated_box(mask) == (70, 90, 119, 129)
    corner = np.zeros((240, 240), bool)
    corner[3:21, 230:240] = True
    assert dilated_box(corner) == (220, 0, 240, 30) and dilated_box(np.zeros((4, 4), bool)) is None
    s, size = frame_scale((240, 240))
    assert s == pytest.approx(16 / 15) and size == (256, 256)
    assert np.allclose(np.array([50, 60, 120, 150]) * s, [53.333333, 64, 128, 160])
    s, size = frame_scale((170, 140))
    assert s == pytest.approx(1.505882, abs=1e-6) and size == (256, 211)
    assert np.allclose(np.array([10, 20, 100, 150]) * s, [15.0588, 30.1176, 150.5882, 225.8824], atol=1e-4)
    image = np.zeros((8, 8))
    image[2:6, 2:6] = np.arange(16).reshape(4, 4)
    points, labels = point_prompts(image > 0, image, (1, 1, 6, 6))
    assert labels.tolist() == [1] * 5 + [0] * 4 and points[5:].tolist() == [[1, 1], [6, 1], [1, 6], [6, 6]]
    assert all(image[y, x] >= 0.6 * 15 for x, y in points[:5])


def test_equalisation_spreads_a_narrow_histogram():
    image = np.repeat(np.linspace(10, 11, 64)[None], 4, 0)
    out = equalise(image)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_s3f_keep_rule():
    scores = {"A": 0.91, "B": 0.35, "C": 0.78, "D": 0.88, "E": 0.60}
    assert s3f_keep(scores) == ["A", "D", "C", "E"]
    assert s3f_keep({"x": 0.5, "a": 0.5}, 0.1) == ["a"]
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0 and dice(a & False, a & False) == 0.0
