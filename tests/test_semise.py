"""SEMISE (spec/methods/semise.md): NT-Xent, margin and Bradley-Terry losses and pair sampling on the spec's
hand-computed examples; ACDC groups, ejection fraction and its grade, the graded-patient rule on real data; the
pre-training module (alpha = 1 uses no label), the encoder file loaded into a segmentation UNet, graded labels
that never reach other cases, the classifier's patient-level metrics, the chain on the phantom, bad CSVs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.readers import read_list
from datamodules.severity import (
    ACDCSeverityDataModule,
    acdc_ejection_fraction,
    acdc_group,
    band,
    balanced,
    contrastive_view,
    ef_grade,
    ejection_fraction,
    graded_patients,
    read_severity_csv,
)
from datamodules.streams import seeded
from experiments.cli import LemisCLI
from lemis.errors import ConfigError, DataError
from lemis.files import read_manifest
from lightning_modules.nets.unet2d import UNet2D
from lightning_modules.segmentation import WeightsFile
from lightning_modules.semise import (
    SemiseNet,
    SemisePretrain,
    balanced_weights,
    classification_summary,
    combined_loss,
    healthy_anomaly_loss,
    main as chain_main,
    margin_loss,
    nt_xent,
    per_patient,
    ranking_loss,
    severity_pairs,
)
from lightning_modules.supervised import Supervised
from tests.conftest import REPO, real
from tests.test_experiments import phantom_args
from tests.test_run_safety import refused

PRETRAIN = REPO / "experiments" / "acdc" / "semise_pretrain.yaml"
SMALL = (4, 8, 16, 32, 64)

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


# ---- pieces of the data and the metrics ----------------------------------------------------------------------------

def test_band_balanced_and_views():
    assert band(10) == [2, 3, 4, 5, 6, 7] and band(4) == [1, 2, 3] and band(1) == [0]  # empty band: middle slice
    assert balanced({"a": ["a1", "a2", "a3"], "b": ["b1"]}) == ["a1", "a2", "a3", "b1", "b1", "b1"]
    image = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    with seeded(3):
        v1, v2 = contrastive_view(image, (32, 32)), contrastive_view(image, (32, 32))
    with seeded(3):
        again = contrastive_view(image, (32, 32))
    assert v1.shape == (1, 32, 32) and 0 <= v1.min() and v1.max() <= 1
    assert not torch.equal(v1, v2) and torch.equal(v1, again)  # two independent draws; a pure function of the seed


def test_classification_summary_and_patients():
    s = classification_summary(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]), 3)
    # F1 per class 1, 0, 2*1/(2+2) = 0.5; recall 1, 0, 0.5; |errors| 0, 1, 0, 1
    assert s["f1"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.5) and s["accuracy"] == 0.5
    assert s["mae"] == 0.5 and s["maee"] == pytest.approx((2 + 2 * math.e) / 4)
    assert s["confusion/12"] == 1 and s["confusion/21"] == 1 and s["confusion/22"] == 1
    absent = classification_summary(np.array([0, 0]), np.array([0, 0]), 3, ordinal=False)
    assert absent["f1"] == pytest.approx(1 / 3) and "mae" not in absent  # labels 1, 2 score 0 (zero_division 0)
    rows = [{"case": "p1_frame01", "patient": "p1", "target": 2, "n_slices": 1, "prob/0": 1.0},
            {"case": "p1_frame02", "patient": "p1", "target": 2, "n_slices": 3, "prob/0": 0.0}]
    assert per_patient(rows, ["prob/0"]) == [{"case": "p1", "target": 2, "n_slices": 4, "prob/0": 0.25}]
    assert balanced_weights([2, 0, 6]).tolist() == pytest.approx([1.5, 0.0, 0.5])


# ---- the pre-training module ---------------------------------------------------------------------------------------

def pretrain_batch(grades: list[int], healthy: list[int]) -> dict:
    torch.manual_seed(0)
    n = len(grades)
    return {"unlabeled": {"image": torch.rand(3, 1, 32, 32), "view2": torch.rand(3, 1, 32, 32)},
            "graded": {"image": torch.rand(n, 1, 32, 32), "view2": torch.rand(n, 1, 32, 32),
                       "grade": torch.tensor(grades), "healthy": torch.tensor(healthy)}}


def value(x) -> float:
    return float(torch.as_tensor(x).detach())


def step_terms(alpha: float, grades: list[int], healthy: list[int]) -> tuple[torch.Tensor, dict, SemisePretrain]:
    torch.manual_seed(1)
    module = SemisePretrain(net=SemiseNet(channels=SMALL, projection_dim=16), alpha=alpha)
    logged = {}
    module.log_step = logged.update  # no trainer: keep what the step logs
    torch.manual_seed(2)  # the same dropout masks in every call
    loss = module.training_step(pretrain_batch(grades, healthy), 0)
    return loss, logged, module


def test_alpha_one_gives_zero_supervised_terms_through_the_module():
    loss, logged, module = step_terms(1.0, [2, 0, 1], [0, 1, 0])
    assert logged["loss/margin"] == 0 and logged["loss/rank"] == 0 and logged["loss/supervised"] == 0
    assert logged["rank/n_pairs"] == 0 and loss.item() == pytest.approx(value(logged["loss/nt_xent"]))
    loss.backward()
    assert all(float(p.grad.abs().sum()) == 0 for p in module.net.rank_head.parameters())
    other, _, _ = step_terms(1.0, [0, 0, 0], [1, 1, 1])  # other labels, the same loss: labels are not read
    assert other.item() == loss.item()
    joint, logged, module = step_terms(0.5, [2, 0, 1], [0, 1, 0])
    assert logged["rank/n_pairs"] == 12 and value(logged["loss/supervised"]) > 0  # 3 grade pairs x 4 view pairs
    assert joint.item() == pytest.approx(0.5 * value(logged["loss/nt_xent"]) + value(logged["loss/supervised"]))
    joint.backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in module.net.rank_head.parameters())


# ---- data: severity labels -----------------------------------------------------------------------------------------

def phantom_patients(root: Path) -> tuple[list[str], list[str]]:
    train = list(dict.fromkeys(n.split("_")[0] for n in read_list(root / "train_slices.list")))
    lists = read_list(root / "val.list") + read_list(root / "test.list")
    evaluated = list(dict.fromkeys(n.split("_")[0] for n in lists))
    return train, evaluated


def write_csv(path: Path, rows: list[tuple[str, int]], header: str = "case,grade") -> Path:
    path.write_text("\n".join([header, *(f"{c},{g}" for c, g in rows)]) + "\n")
    return path


def test_graded_labels_never_reach_the_model_for_other_cases(acdc_phantom, tmp_path):
    train, evaluated = phantom_patients(acdc_phantom)
    table = write_csv(tmp_path / "grades.csv", [(p, i % 3) for i, p in enumerate(train + evaluated)])
    graded = train[:2]  # every training patient has a grade in the table: a leak would show it
    grades = read_severity_csv(table)[0]
    dm = ACDCSeverityDataModule(str(acdc_phantom), severity_csv=str(table), graded_cases=graded, batch_size=4,
                                graded_batch_size=4, patch_size=(32, 32), num_workers=0)
    dm.setup("fit")
    seen = {"unlabeled": set(), "graded": set()}
    for _ in range(3):  # three epochs of both streams
        for batch, _, _ in dm.train_dataloader():  # CombinedLoader: (batch, index, loader index)
            for name, stream in batch.items():
                for case, grade, healthy, group in zip(stream["case"], stream["grade"], stream["healthy"],
                                                       stream["group"]):
                    patient = case.split("_")[0]
                    seen[name].add(patient)
                    if patient in graded:
                        assert int(grade) == grades[patient].grade and int(healthy) == grades[patient].healthy
                    else:
                        assert (int(grade), int(healthy), int(group)) == (-1, -1, -1), case
    assert seen["graded"] == set(graded) and seen["unlabeled"] == set(train)
    classify = ACDCSeverityDataModule(str(acdc_phantom), mode="classify", severity_csv=str(table),
                                      graded_cases=graded, batch_size=4, patch_size=(32, 32), num_workers=0)
    classify.setup("fit")
    items = classify._streams[0].items
    assert {i.split("_")[0] for i in items} == set(graded)
    assert sum(classify.class_counts()) == len(items)
    case = classify.datasets["val"][0]  # evaluation carries the true values, for metrics only
    assert case["grade"] == grades[case["patient"]].grade and case["image"].shape[1] == case["label"].shape[0]


# ---- bad severity tables -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage,needle", [
    ("missing", "not found"),
    ("unknown", "patient999"),
    ("range", "grade 3 is outside 0..2"),
    ("integer", "'two' is not an integer"),
    ("duplicate", "appears a second time"),
    ("column", "no column 'grade'"),
    ("ungraded", "has no row in"),
])
def test_bad_severity_csv_is_one_sentence_naming_the_file(damage, needle, acdc_phantom, la_phantom, tmp_path,
                                                         capsys):
    train, evaluated = phantom_patients(acdc_phantom)
    rows = [(p, 0) for p in train + evaluated]
    path = tmp_path / "grades.csv"
    if damage == "unknown":
        rows.append(("patient999", 1))
    elif damage == "range":
        rows[1] = (rows[1][0], 3)
    elif damage == "integer":
        rows[1] = (rows[1][0], "two")
    elif damage == "duplicate":
        rows.append(rows[0])
    elif damage == "ungraded":
        rows = rows[1:]  # the rule picks the first training patient, which has no row now
    if damage != "missing":
        write_csv(path, rows, header="case,severity" if damage == "column" else "case,grade")
    args = phantom_args(PRETRAIN, acdc_phantom, la_phantom, tmp_path / "runs")
    refused(capsys, ["fit", *args, f"--data.init_args.severity_csv={path}"], str(path), needle)
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


# ---- the encoder into a segmentation UNet, and the chain ----------------------------------------------------------

def test_init_encoder_round_trip(acdc_phantom, la_phantom, tmp_path):
    """pre-train -> encoder.pt -> the UNet's encoder equals the pre-trained one (and from the checkpoint)."""
    cli = LemisCLI(args=["fit", *phantom_args(PRETRAIN, acdc_phantom, la_phantom, tmp_path)])
    run = Path(cli.trainer.log_dir)
    trained = cli.model.net.encoder.state_dict()
    saved = torch.load(run / "encoder.pt", weights_only=True)
    assert saved["meta"]["steps"] == 2 and saved["meta"]["graded_cases"] == cli.datamodule.graded
    for spec in (WeightsFile(str(run / "encoder.pt"), into="encoder"),
                 WeightsFile(str(run / "checkpoints" / "last.ckpt"), prefix="net.encoder.", into="encoder")):
        unet = Supervised(net=UNet2D(1, 4), num_classes=4, init_weights=spec).net
        loaded = unet.encoder.state_dict()
        assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k].cpu()) for k in trained)
    with pytest.raises(ConfigError, match="does not fit the net") as err:  # strict: another encoder is refused
        Supervised(net=UNet2D(1, 4, channels=SMALL), num_classes=4,
                   init_weights=WeightsFile(str(run / "encoder.pt"), into="encoder"))
    assert str(run / "encoder.pt") in str(err.value)
    with pytest.raises(ConfigError, match="no submodule 'trunk'"):
        Supervised(net=UNet2D(1, 4), num_classes=4, init_weights=WeightsFile(str(run / "encoder.pt"), into="trunk"))


def test_chain_pretrain_then_classify_and_segment(acdc_phantom, tmp_path):
    """One command runs the three stages on the phantom (a few steps each) and skips them when done."""
    train, evaluated = phantom_patients(acdc_phantom)
    table = write_csv(tmp_path / "grades.csv", [(p, i % 3) for i, p in enumerate(train + evaluated)])
    severity = [f"--data.init_args.severity_csv={table}", f"--data.init_args.graded_cases=[{train[0]},{train[1]}]",
                "--data.init_args.graded_batch_size=4"]
    argv = [str(tmp_path / "chain"), f"--data.init_args.root={acdc_phantom}", "--data.init_args.patch_size=[32,32]",
            "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--trainer.max_steps=2",
            "--trainer.val_check_interval=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--seed_everything=1",
            "pretrain:--model.init_args.lr_scheduler.init_args.warmup_steps=1",
            *(f"{stage}:{arg}" for stage in ("pretrain", "classify") for arg in severity),
            "segment:--data.init_args.labeled=2"]
    assert chain_main(argv) == 0
    root = tmp_path / "chain"
    for stage in ("pretrain", "classify", "segment"):
        assert read_manifest(root / stage) is not None
    classify = json.loads((root / "classify" / "summary.json").read_text())["val"]
    assert 0 <= classify["f1"] <= 1 and classify["n_cases"] == 1 and "maee" in classify
    segment = json.loads((root / "segment" / "summary.json").read_text())["val"]
    assert 0 <= segment["dice/mean"] <= 1
    encoder = torch.load(root / "pretrain" / "encoder.pt", weights_only=True)["state_dict"]
    config = next((root / "segment").rglob("config.yaml")).read_text()
    assert str(root / "pretrain" / "encoder.pt") in config and "into: encoder" in config
    assert len(encoder) == len(UNet2D(1, 4).encoder.state_dict())
    assert chain_main(argv) == 0  # done: every stage skipped
    assert len(list(root.rglob("config.yaml"))) == 3
