"""Camelyon16 DataModule (datamodules/camelyon16.py) on a phantom of the official layout: slide labels and
splits, the cached patch index, derived patch labels, no mask in a training batch, masks from the XML for
evaluation, zipped annotations, both slide readers, bad input."""
from __future__ import annotations

import shutil
import zipfile

import pytest
import torch

from datamodules.camelyon16 import Camelyon16DataModule, read_reference
from datamodules.phantoms.slides import make_camelyon16
from lemis.errors import DataError

SMALL = dict(level=1, patch_size=(32, 32), stride=32, batch_size=4, num_workers=0,
             val_slides=("tumor_002", "normal_002"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_camelyon16(tmp_path_factory.mktemp("c16"))


def test_reference_table_by_position(tmp_path):
    (tmp_path / "a.csv").write_text("test_001,Tumor,Macro\ntest_002,normal\n")
    (tmp_path / "b.csv").write_text("image,type,size\ntest_001.tif,tumor,macro\n")
    assert read_reference(tmp_path / "a.csv") == {"test_001": 1, "test_002": 0}
    assert read_reference(tmp_path / "b.csv") == {"test_001": 1}


def test_splits_index_and_labels(phantom, tmp_path):
    dm = Camelyon16DataModule(str(phantom), index_cache=str(tmp_path / "index"), **SMALL)
    dm.setup("fit")
    slides = dm.slides
    assert {k: (s["split"], s["label"]) for k, s in slides.items()} == {
        "normal_001": ("train", 0), "normal_002": ("val", 0), "tumor_001": ("train", 1), "tumor_002": ("val", 1),
        "test_001": ("test", 1), "test_002": ("test", 0)}
    labels = {(dm.patches[c]["slide"], dm.patches[c]["label"]) for c in dm.patches}
    assert ("tumor_001", 1) in labels and ("tumor_001", 0) in labels and ("normal_001", 1) not in labels
    cache = tmp_path / "index" / "c16_L1_P32_S32.csv"
    lines = cache.read_text().splitlines()
    assert lines[0].startswith("# key=") and lines[1] == "slide,x0,y0,tissue_frac,tumour_frac"
    again = Camelyon16DataModule(str(phantom), index_cache=str(tmp_path / "index"), **SMALL)
    again.setup("fit")
    assert again.patches == dm.patches  # the same selection from the cached index
    sample = dm.datasets["labeled"][0]
    assert set(sample) == {"image", "bag_label", "case"} and sample["image"].shape == (3, 32, 32)
    assert set(next(iter(dm.train_dataloader()))) == {"image", "bag_label", "case"}
    masks = {case: dm.datasets["val"][i]["label"] for i, case in enumerate(dm.eval_cases("val"))}
    positives = [c for c in masks if dm.patches[c]["label"] == 1]
    assert positives and all(masks[c].float().mean() > 0.02 for c in positives)  # rasterised at full resolution
    assert all(not masks[c].any() for c in masks if c.startswith("normal_"))


def test_patch_labels_from_the_slide(phantom):
    dm = Camelyon16DataModule(str(phantom), patch_label="from_slide", **SMALL)
    dm.setup("fit")
    assert all(p["label"] == dm.slides[p["slide"]]["label"] for p in dm.patches.values())


def test_both_readers_give_the_same_training_samples(phantom):
    a = Camelyon16DataModule(str(phantom), reader="tifffile", **SMALL)
    b = Camelyon16DataModule(str(phantom), reader="openslide", **SMALL)
    a.setup("fit")
    b.setup("fit")
    for i in range(0, len(a.datasets["labeled"]), 7):
        assert torch.equal(a.datasets["labeled"][i]["image"], b.datasets["labeled"][i]["image"])


def test_zipped_annotations_and_missing_ones(phantom, tmp_path):
    root = tmp_path / "c16"
    shutil.copytree(phantom, root)
    folder = root / "training" / "lesion_annotations"
    with zipfile.ZipFile(folder.with_suffix(".zip"), "w") as z:
        for xml in folder.glob("*.xml"):
            z.write(xml, f"lesion_annotations/{xml.name}")
    shutil.rmtree(folder)
    dm = Camelyon16DataModule(str(root), index_cache=str(tmp_path / "cache"), **SMALL)
    dm.setup("fit")
    assert dm.slides["tumor_001"]["xml"] == tmp_path / "cache" / "annotations" / "tumor_001.xml"
    folder.with_suffix(".zip").unlink()
    with pytest.raises(DataError, match="tumour slide tumor_001 has no lesion annotation XML"):
        Camelyon16DataModule(str(root), **SMALL).setup("fit")


def test_a_damaged_slide_is_one_sentence(phantom, tmp_path):
    root = tmp_path / "c16"
    shutil.copytree(phantom, root)
    (root / "training" / "normal" / "normal_001.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match="cannot read .*normal_001.tif as a slide"):
        Camelyon16DataModule(str(root), **SMALL).setup("fit")
