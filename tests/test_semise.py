"""SEMISE (spec/methods/semise.md): NT-Xent, margin and Bradley-Terry losses and pair sampling on the spec's
hand-computed examples; ACDC groups, ejection fraction and its grade, the graded-patient rule on real data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datamodules.readers import read_list
from datamodules.severity import acdc_ejection_fraction, acdc_group, ef_grade, ejection_fraction, graded_patients
from lemis.errors import DataError
from lightning_modules.semise import (
    combined_loss,
    healthy_anomaly_loss,
    margin_loss,
    nt_xent,
    ranking_loss,
    severity_pairs,
)
from tests.conftest import real

VIEWS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.6, 0.8]], dtype=torch.float64)  # a1, b1 | a2, b2


@pytest.mark.parametrize("tau,value", [(0.5, 0.642893), (1.0, 0.800588), (0.1, 0.708269)])
def test_nt_xent_of_the_hand_example(tau, value):
    assert nt_xent(VIEWS, tau).item() == pytest.approx(value, abs=1e-6)


def test_nt_xent_anchor_terms():
    sim = VIEWS @ VIEWS.T / 0.5
    a1 = -sim[0, 2] + torch.logsumexp(sim[0, [1, 2, 3]], 0)
    assert a1.item() == pytest.approx(0.330678, abs=1e-6)


def test_margin_loss_examples():
    d = torch.tensor([0.2, 0.3, 1.4], dtype=torch.float64)
    assert margin_loss(d, torch.tensor([True, False, False])).item() == pytest.approx(0.088333, abs=1e-6)
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)  # healthy h, anomalies a, b
    healthy = torch.tensor([1, 0, 0])
    assert healthy_anomaly_loss(z, healthy).item() == pytest.approx(0.066667, abs=1e-6)
    assert healthy_anomaly_loss(z, healthy, margin=0.5).item() == pytest.approx(0.008333, abs=1e-6)
    assert healthy_anomaly_loss(z, torch.tensor([1, -1, -1])).item() == 0.0  # no pair of known flags


def test_ranking_loss_and_pairs():
    assert severity_pairs(torch.tensor([2, 0, 0, 1])) == [(0, 1), (0, 2), (0, 3), (3, 1), (3, 2)]
    assert severity_pairs(torch.tensor([2, -1, 0])) == [(0, 2)]
    loss, n, accuracy = ranking_loss(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([2, 0, 0]))
    assert loss.item() == pytest.approx(0.813262, abs=1e-6) and n == 2 and accuracy == 0.5
    equal, _, _ = ranking_loss(torch.zeros(2), torch.tensor([1, 0]))
    assert equal.item() == pytest.approx(math.log(2))
    none, n, _ = ranking_loss(torch.zeros(2), torch.tensor([1, 1]))
    assert none.item() == 0.0 and n == 0


def test_alpha_one_leaves_only_nt_xent():
    nt, margin, rank = torch.tensor(0.7), torch.tensor(float("nan")), torch.tensor(3.0)
    assert combined_loss(nt, margin, rank, alpha=1.0).item() == pytest.approx(0.7)
    assert combined_loss(nt, torch.tensor(1.0), rank, alpha=0.5).item() == pytest.approx(0.35 + 2.0)


def test_groups_ef_and_grades():
    assert [acdc_group(f"patient{n:03d}") for n in (1, 20, 21, 60, 61, 80, 81, 100)] == \
        ["DCM", "DCM", "HCM", "MINF", "NOR", "NOR", "RV", "RV"]
    with pytest.raises(DataError, match="patient101"):
        acdc_group("patient101")
    ed = np.zeros((2, 4, 4), np.uint8)
    ed.flat[:10] = 3
    ed.flat[10:14] = 1  # RV and myocardium voxels do not count
    ed.flat[14:16] = 2
    voxel = 10 * 1.5 * 1.5 / 1000  # mL
    assert float(np.count_nonzero(ed == 3)) * voxel == pytest.approx(0.225)
    for es_voxels, ef, grade in ((6, 0.40, 1), (5, 0.50, 0), (7, 0.30, 2)):
        es = np.zeros_like(ed)
        es.flat[:es_voxels] = 3
        assert ejection_fraction(ed, es, voxel) == pytest.approx(ef) and ef_grade(ejection_fraction(ed, es)) == grade
    with pytest.raises(DataError, match="no LV cavity"):
        ejection_fraction(np.zeros_like(ed), ed)


@pytest.mark.real_data
def test_acdc_ejection_fractions_grades_and_the_graded_patients():
    root = real("ACDC")
    expected = {"patient026": 50.02, "patient002": 29.1, "patient019": 27.5, "patient099": 47.3, "patient038": 52.7,
                "patient050": 16.4, "patient072": 55.0, "patient094": 42.6}
    for patient, ef in expected.items():
        assert 100 * acdc_ejection_fraction(root, patient) == pytest.approx(ef, abs=0.06)
    patients = list(dict.fromkeys(n.split("_")[0] for n in read_list(root / "train.list")))
    grades = {p: ef_grade(acdc_ejection_fraction(root, p)) for p in patients}
    assert [sum(g == k for g in grades.values()) for k in (0, 1, 2)] == [36, 6, 28]
    assert graded_patients(root, grades) == ["patient099", "patient038", "patient050", "patient020", "patient072",
                                             "patient074", "patient094"]
