"""GlaS DataModule (datamodules/glas.py): Grade.csv with CR endings, crops and derived weak labels, patient-level
validation split, no pixel mask in a training batch, both layouts, bad input; the real GlaS-half copy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.glas import GlaSDataModule, crop_origins, read_grades, weak_label
from datamodules.phantoms import make_glas
from lemis.errors import DataError
from tests.conftest import real

SMALL = dict(patch_size=(32, 32), crop_size=32, crop_stride=16, batch_size=4, num_workers=0)


@pytest.fixture(scope="module", params=["png", "bmp"])
def phantom(request, tmp_path_factory):
    return make_glas(tmp_path_factory.mktemp(f"glas_{request.param}"), layout=request.param)


def test_crop_origins_end_flush_with_the_border():
    assert crop_origins(775, 128, 64)[-3:] == [576, 640, 647]
    assert crop_origins(96, 32, 16) == [0, 16, 32, 48, 64]
    assert crop_origins(128, 128, 64) == [0] and crop_origins(100, 128, 64) == [0]


def test_weak_label_rule():
    assert [weak_label(r) for r in (0.0, 0.01, 0.0499, 0.05, 1.0)] == [0, None, None, 1, 1]


def test_grade_csv_with_cr_endings_and_leading_spaces(tmp_path):
    (tmp_path / "Grade.csv").write_bytes(b"name,patient ID, grade (GlaS), grade (S)\rtrain_1,2, malignant, x\r"
                                         b"testA_1,4, benign, y")
    assert read_grades(tmp_path / "Grade.csv") == {"train_1": ("2", "malignant"), "testA_1": ("4", "benign")}
    (tmp_path / "Grade.csv").write_text("id,grade\nx,1\n")
    with pytest.raises(DataError, match="is not GlaS's Grade.csv"):
        read_grades(tmp_path / "Grade.csv")


def test_training_crops_carry_a_derived_bag_label_and_no_mask(phantom):
    dm = GlaSDataModule(str(phantom), val_fraction=0.34, **SMALL)
    dm.setup("fit")
    names = dm.names
    assert names["train"] and names["val"] and not set(names["train"]) & set(names["val"])
    assert dm.eval_cases("test") == ["testA_1", "testA_2", "testA_3"]
    data = dm.datasets["labeled"]
    labels = [data[i]["bag_label"].item() for i in range(len(data))]
    assert 0 in labels and 1 in labels  # train_3 and train_6 hold no gland
    for i in range(len(data)):
        sample = data[i]
        assert set(sample) == {"image", "bag_label", "case"} and sample["image"].shape == (3, 32, 32)
        name, y, x = sample["case"].split(":")
        stem = f"labels/{name}.png" if (phantom / "labels").is_dir() else f"{name}_anno.bmp"
        window = np.asarray(Image.open(phantom / stem))[int(y):int(y) + 32, int(x):int(x) + 32] > 0
        assert sample["bag_label"].item() == weak_label(window.mean())
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "bag_label", "case"} and batch["image"].shape[0] == 4
    case = dm.datasets["val"][0]
    assert case["image"].shape == (3, 96, 128) and set(np.unique(case["label"].numpy())) <= {0, 1}
    assert abs(float(case["image"].mean())) < 3  # ImageNet-normalised


def test_missing_files_are_one_sentence(tmp_path):
    root = make_glas(tmp_path / "g")
    (root / "labels" / "train_2.png").unlink()
    with pytest.raises(DataError, match="train_2.png"):
        GlaSDataModule(str(root), **SMALL).setup("fit")
    (root / "Grade.csv").unlink()
    with pytest.raises(DataError, match="Grade.csv not found"):
        GlaSDataModule(str(root), **SMALL).setup("fit")
    root2 = make_glas(tmp_path / "h")
    (root2 / "images" / "train_1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read .*train_1.png as an image"):
        GlaSDataModule(str(root2), **SMALL).setup("fit")


@pytest.mark.real_data
def test_real_glas_half():
    root = real("GlaS-half")
    dm = GlaSDataModule(str(root), num_workers=0)
    dm.setup("fit")
    names = dm.names
    assert len(names["train"]) + len(names["val"]) == 13 and len(names["val"]) >= 1
    assert dm.eval_cases("test") == [f"testA_{i}" for i in (1, 2, 3, 4, 5, 6, 8, 12, 13)]
    sample = dm.datasets["labeled"][0]
    assert sample["image"].shape == (3, 256, 256) and "label" not in sample
    assert sum(dm.bag_labels.values()) > 0
    case = dm.datasets["val"][0]
    assert case["image"].shape[0] == 3 and case["label"].shape == case["image"].shape[1:]
    assert torch.isin(case["label"].unique(), torch.tensor([0, 1])).all()
