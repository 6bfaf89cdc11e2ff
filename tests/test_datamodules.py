"""DataModules: label budgets, streams, batch keys, and one-sentence errors for bad input."""
import shutil

import h5py
import numpy as np
import pytest
import torch

from datamodules.acdc import ACDCDataModule
from datamodules.budget import select_labeled
from datamodules.la import LADataModule
from lemis.errors import ConfigError, DataError
from tests.conftest import real


def acdc(root, **kw):
    kw = {"labeled": 2, "batch_size": 4, "labeled_batch_size": 2, "patch_size": (32, 32), "num_workers": 0, **kw}
    return ACDCDataModule(str(root), **kw)


def test_select_labeled_first_keeps_file_order():
    groups = ["p9", "p9", "p3", "p5", "p5", "p1"]
    assert select_labeled(groups, 2) == ["p9", "p3"]
    assert select_labeled(groups, 0.5) == ["p9", "p3"]
    drawn = select_labeled(groups, 2, "random", seed=1)
    assert drawn == select_labeled(groups, 2, "random", seed=1) and set(drawn) <= {"p9", "p3", "p5", "p1"}


@pytest.mark.parametrize("budget", [0, 5, -1])
def test_impossible_budget_names_the_option(budget):
    with pytest.raises(ConfigError, match=r"data\.init_args\.labeled="):
        select_labeled(["a", "b", "c", "d"], budget)


@pytest.mark.real_data
@pytest.mark.parametrize("patients,slices", [(3, 68), (7, 136), (14, 256), (21, 396), (28, 512), (35, 664), (70, 1312)])
def test_budget_reproduces_ssl4mis_slice_counts(patients, slices):
    dm = ACDCDataModule(str(real("ACDC")), labeled=patients, num_workers=0)
    groups, labeled, unlabeled = dm.split()
    assert len(groups) == patients and len(labeled) == slices and len(labeled) + len(unlabeled) == 1312
    assert groups[:3] == ["patient099", "patient038", "patient050"]


def test_two_stream_batches(acdc_phantom):
    dm = acdc(acdc_phantom)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    lab, unl = batch[0]["labeled"], batch[0]["unlabeled"]
    assert lab["image"].shape == (2, 1, 32, 32) and lab["label"].shape == (2, 32, 32)
    assert lab["label"].dtype == torch.int64 and "label" not in unl and unl["image"].shape == (2, 1, 32, 32)
    labeled_patients = {c.split("_")[0] for c in dm.datasets["labeled"].items}
    assert labeled_patients.isdisjoint({c.split("_")[0] for c in dm.datasets["unlabeled"].items})


def test_single_stream_batch_and_whole_volume_cases(acdc_phantom):
    dm = acdc(acdc_phantom, labeled_batch_size=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "case"} and batch["image"].shape == (4, 1, 32, 32)
    case = next(iter(dm.val_dataloader()))
    d, h, w = case["label"].shape[1:]
    assert case["image"].shape == (1, 1, d, h, w) and (h, w) == (64, 64) and case["spacing"] == [None]


def test_unlabeled_labels_are_never_read(acdc_phantom, tmp_path):
    root = tmp_path / "acdc"
    shutil.copytree(acdc_phantom, root)
    dm = acdc(root)
    _, _, unlabeled = dm.split()
    with h5py.File(root / "data" / "slices" / f"{unlabeled[0]}.h5", "a") as f:
        del f["label"]  # a file without labels is fine for the unlabeled stream
    dm.setup("fit")


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"data root .*nope does not exist"):
        acdc(tmp_path / "nope").setup("fit")


def test_missing_list_file(acdc_phantom, tmp_path):
    root = tmp_path / "acdc"
    shutil.copytree(acdc_phantom, root)
    (root / "train_slices.list").unlink()
    with pytest.raises(DataError, match=r"split list .*train_slices\.list not found"):
        acdc(root).setup("fit")


def _copy_with(acdc_phantom, tmp_path, edit):
    root = tmp_path / "acdc"
    shutil.copytree(acdc_phantom, root)
    dm = acdc(root)
    _, labeled, _ = dm.split()
    path = root / "data" / "slices" / f"{labeled[0]}.h5"
    edit(path)
    return dm, path


def test_missing_h5_key(acdc_phantom, tmp_path):
    def drop_label(path):
        with h5py.File(path, "a") as f:
            del f["label"]
    dm, path = _copy_with(acdc_phantom, tmp_path, drop_label)
    with pytest.raises(DataError, match=rf"{path.name} has no key 'label'"):
        dm.setup("fit")


def test_corrupt_h5(acdc_phantom, tmp_path):
    def truncate(path):
        path.write_bytes(path.read_bytes()[:200])
    dm, path = _copy_with(acdc_phantom, tmp_path, truncate)
    with pytest.raises(DataError, match=rf"cannot read .*{path.name} as HDF5"):
        dm.setup("fit")


def test_missing_file(acdc_phantom, tmp_path):
    dm, path = _copy_with(acdc_phantom, tmp_path, lambda p: p.unlink())
    missing = rf"1 of the .* files named by train_slices.list are missing \(first: .*{path.name}\)"
    with pytest.raises(DataError, match=missing):
        dm.setup("fit")


def test_label_out_of_range(acdc_phantom, tmp_path):
    def poison(path):
        with h5py.File(path, "a") as f:
            label = f["label"][()]
            label[0, 0] = 7
            del f["label"]
            f["label"] = label
    dm, path = _copy_with(acdc_phantom, tmp_path, poison)
    with pytest.raises(DataError, match=r"label values \[7\] outside 0\.\.3"):
        dm.setup("fit")


@pytest.mark.parametrize("kw,message", [
    ({"labeled": 0}, r"data\.init_args\.labeled=0 is impossible"),
    ({"labeled": 99}, r"data\.init_args\.labeled=99 is impossible"),
    ({"labeled": 6}, r"leaves no unlabeled training data"),
    ({"labeled_batch_size": 9},
     r"data\.init_args\.labeled_batch_size=9 must be between 1 and data\.init_args\.batch_size=4"),
])
def test_impossible_budget_or_batch(acdc_phantom, kw, message):
    with pytest.raises(ConfigError, match=message):
        acdc(acdc_phantom, **kw).setup("fit")


def test_la_present_filter_and_budget(tmp_path):
    from datamodules.phantoms import make_la
    root = make_la(tmp_path / "la", n_train=6, n_test=2, shape=(40, 40, 36), seed=1, present=5)
    present = set((root / "present.list").read_text().split())
    dm = LADataModule(str(root), labeled=2, batch_size=2, labeled_batch_size=1, patch_size=(32, 32, 32),
                      num_workers=0, present="present.list")
    dm.setup("fit")
    train_ids = [i for i in (root / "train.list").read_text().split() if i in present]
    assert dm.labeled_groups == train_ids[:2]
    assert dm.datasets["unlabeled"].items == train_ids[2:]
    batch = next(iter(dm.train_dataloader()))[0]
    assert batch["labeled"]["image"].shape == (1, 1, 32, 32, 32)
    case = next(iter(dm.val_dataloader()))
    assert case["spacing"] == [(0.625, 0.625, 0.625)] and case["case"][0] in present
    without = LADataModule(str(root), labeled=2, num_workers=0)
    with pytest.raises(DataError, match=r"of the 2 files named by test.list are missing .*data.init_args.present"):
        without.setup("fit")


@pytest.mark.real_data
def test_real_acdc_shapes_and_labels():
    dm = ACDCDataModule(str(real("ACDC")), labeled=3, batch_size=4, labeled_batch_size=2, patch_size=(128, 128),
                        num_workers=0, cache=False)
    dm.setup("fit")
    assert len(dm.datasets["labeled"]) == 68 and len(dm.datasets["unlabeled"]) == 1312 - 68
    assert len(dm.datasets["val"]) == 20
    case = dm.datasets["val"][0]
    assert case["image"].ndim == 4 and case["image"].shape[1:] == case["label"].shape
    assert set(np.unique(case["label"].numpy())) <= {0, 1, 2, 3} and 0.0 <= case["image"].min() <= case["image"].max() <= 1.0
    sample = dm.datasets["labeled"][0]
    assert sample["image"].shape == (1, 128, 128) and set(np.unique(sample["label"].numpy())) <= {0, 1, 2, 3}


@pytest.mark.real_data
def test_real_la_present_cases():
    dm = LADataModule(str(real("LA")), labeled=4, batch_size=4, labeled_batch_size=2, patch_size=(64, 64, 48),
                      num_workers=0, present="present.list", cache=False)
    dm.setup("fit")
    assert len(dm.datasets["labeled"]) == 4 and len(dm.datasets["unlabeled"]) == 10 and len(dm.datasets["val"]) == 4
    sample = dm.datasets["labeled"][0]
    assert sample["image"].shape == (1, 64, 64, 48) and set(np.unique(sample["label"].numpy())) <= {0, 1}
