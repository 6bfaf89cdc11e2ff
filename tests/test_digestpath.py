"""DigestPath DataModule (datamodules/digestpath.py) on a phantom of the task-2 layout: stratified image split
kept in splits/, crop labels derived from the masks, no mask in a training batch, JPEG masks thresholded."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from datamodules.digestpath import DigestPathDataModule
from datamodules.phantoms.digestpath import make_digestpath
from lemis.errors import DataError

SMALL = dict(crop_size=64, crop_stride=64, patch_size=(32, 32), batch_size=4, num_workers=0)


@pytest.fixture()
def phantom(tmp_path):
    return make_digestpath(tmp_path / "dp")


def test_split_crops_and_labels(phantom):
    dm = DigestPathDataModule(str(phantom), **SMALL)
    dm.setup("fit")
    splits = json.loads((phantom / "splits" / "digestpath_seed0.json").read_text())
    assert splits == dm.splits and {len(v) for v in splits.values()} == {6, 2}
    for names in splits.values():  # stratified: both classes in every split
        assert any(n.startswith("tissue-train-pos") for n in names) and any(n.startswith("tissue-train-neg")
                                                                          for n in names)
    labels = [dm.crops[c]["label"] for c in dm.crops if dm.crops[c]["image"] in splits["train"]]
    assert 0 in labels and 1 in labels
    assert all(c["label"] == 0 for c in dm.crops.values() if c["image"].startswith("tissue-train-neg"))
    sample = dm.datasets["labeled"][0]
    assert set(sample) == {"image", "bag_label", "case"} and sample["image"].shape == (3, 32, 32)
    assert set(next(iter(dm.train_dataloader()))) == {"image", "bag_label", "case"}
    for i, case in enumerate(dm.eval_cases("val")):
        label = dm.datasets["val"][i]["label"]
        assert set(np.unique(label.numpy())) <= {0, 1}
        assert (dm.crops[case]["label"] == 1) <= bool(label.any())
    again = DigestPathDataModule(str(phantom), split_seed=0, **SMALL)
    assert again.splits == splits  # read back from splits/


def test_positive_crop_label_follows_the_mask_fraction(phantom):
    dm = DigestPathDataModule(str(phantom), **SMALL)
    dm.setup("fit")
    name = next(n for n in dm.splits["train"] if n.startswith("tissue-train-pos"))
    mask = np.asarray(Image.open(phantom / f"{name}_mask.jpg")) > 127
    data = dm._read(dm.location(name), (), "crops")
    for i, (y, x) in enumerate(data["origin"]):
        fraction = mask[y:y + 64, x:x + 64].mean()
        assert data["fraction"][i] == pytest.approx(fraction)


def test_a_missing_mask_is_one_sentence(phantom):
    mask = next((phantom / "tissue-train-pos-v1").glob("*_mask.jpg"))
    mask.unlink()
    with pytest.raises(DataError, match=mask.name):
        DigestPathDataModule(str(phantom), **SMALL).setup("fit")
