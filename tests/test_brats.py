"""BraTS (issue "Bring your own data"): both layouts, labels remapped before the range check, regions, modalities,
brain z-score and crop, predictions pasted back at full size; real cases from ../shared/data."""
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.brats import BraTSDataModule
from datamodules.phantoms.brats import AFFINE, make_brats
from experiments.__main__ import main
from lemis.errors import ConfigError, DataError
from tests.conftest import REPO, real
from tests.test_experiments import phantom_args

PATCH = [32, 32, 32]


@pytest.fixture(scope="module", params=["2020", "2015"])
def phantom(request, tmp_path_factory) -> Path:
    return make_brats(tmp_path_factory.mktemp(f"brats{request.param}"), layout=request.param)


def datamodule(root, **kw) -> BraTSDataModule:
    options = {"labeled": 2, "batch_size": 2, "labeled_batch_size": 1, "patch_size": PATCH, "num_workers": 0}
    return BraTSDataModule(str(root), **{**options, **kw})


def raw_label(folder: Path) -> np.ndarray:
    path = next(p for p in folder.iterdir() if p.name.endswith(("_seg.nii.gz", "OTMultiClass.nii.gz")))
    return np.asarray(nib.load(str(path)).dataobj)


def test_labels_modalities_zscore_and_crop(phantom):
    """Labels 4 -> 3 (and 2015's 3 -> 1) before the range check; channels in ``modalities`` order, z-scored in
    the brain and 0 outside; the volume cropped to the brain's box, which ``crop`` records."""
    dm = datamodule(phantom, modalities=["flair", "t1ce"])
    dm.setup("fit")
    case = dm.datasets["val"][0]
    folder = next(p for p in phantom.iterdir() if p.name == case["case"])
    raw = raw_label(folder)
    brain = np.asarray(nib.load(str(next(folder.glob("*flair*")) if "2020" in str(phantom) else
                                    folder / "Flair_subtrMeanDivStd.nii.gz")).dataobj) != 0
    where = np.nonzero(brain)
    box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)
    offset, full = case["crop"]
    assert offset == [b.start for b in box] and full == list(raw.shape)
    expected = {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}
    remapped = np.vectorize(expected.get)(np.rint(raw).astype(int))[box]
    assert torch.equal(case["label"], torch.from_numpy(remapped.astype(np.int64)))
    assert set(np.unique(raw)) == ({0, 1, 2, 4} if "2020" in str(phantom) else {0, 1, 2, 3, 4})
    flair_file = next(f for f in folder.iterdir() if "flair" in f.name.lower())
    flair = np.asarray(nib.load(str(flair_file)).dataobj).astype(np.float64)[box]
    inside = brain[box]
    expected_flair = np.where(inside, (flair - flair[inside].mean()) / flair[inside].std(), 0)
    np.testing.assert_allclose(case["image"][0].numpy(), expected_flair, atol=1e-4)
    assert case["image"].shape[0] == 2 and not torch.equal(case["image"][0], case["image"][1])
    assert np.allclose(case["affine"], AFFINE)


@pytest.mark.parametrize("target,classes", [("wt", (1, 2, 3)), ("tc", (1, 3)), ("et", (3,))])
def test_region_targets_are_binary(phantom, target, classes):
    full = datamodule(phantom)
    full.setup("fit")
    region = datamodule(phantom, target=target)
    region.setup("fit")
    assert region.num_classes == 2 and region.class_names == (target.upper(),)
    expected = np.isin(full.datasets["val"][0]["label"].numpy(), classes)
    assert np.array_equal(region.datasets["val"][0]["label"].numpy(), expected)


def test_unlabeled_root_is_never_read_for_labels(phantom, tmp_path):
    pool = tmp_path / "validation"
    for case in sorted(p for p in phantom.iterdir() if p.is_dir())[:1]:
        target = pool / (case.name + "_unl")
        shutil.copytree(case, target)
        for label in target.iterdir():
            if label.name.endswith(("_seg.nii.gz", "OTMultiClass.nii.gz")):
                label.write_bytes(b"damaged")
        for f in target.iterdir():
            if f.name.startswith(case.name):
                f.rename(target / f.name.replace(case.name, target.name))
    dm = datamodule(phantom, unlabeled_root=str(pool))
    dm.setup("fit")
    assert len(dm.datasets["unlabeled"]) == 2 and dm.datasets["unlabeled"].items[-1].endswith("_unl")
    assert all("label" not in dm.datasets["unlabeled"][(i, 0)] for i in range(2))


def test_bad_cases_are_one_sentence_naming_the_file(tmp_path):
    root = make_brats(tmp_path / "b", n_cases=3)
    case = root / "BraTS20_Training_002"
    (case / "BraTS20_Training_002_t2.nii.gz").unlink()
    with pytest.raises(DataError, match=str(case / "BraTS20_Training_002_t2.nii.gz")):
        datamodule(root, labeled=1).setup("fit")
    datamodule(root, modalities=["flair", "t1"], labeled=1).setup("fit")  # without t2 the case is complete
    seg = root / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz"  # the labeled one of labeled=1
    label = np.asarray(nib.load(str(seg)).dataobj).copy()
    label[0, 0, 0] = 3  # unused since 2017
    nib.save(nib.Nifti1Image(label, AFFINE), str(seg))
    with pytest.raises(DataError, match=rf"{seg} has label values \[3\]"):
        datamodule(root, modalities=["flair"], labeled=1).setup("fit")
    seg.unlink()
    with pytest.raises(DataError, match="unlabeled_root"):
        datamodule(root, modalities=["flair"], labeled=1).setup("fit")
    with pytest.raises(ConfigError, match="modalities"):
        datamodule(root, modalities=["dwi"])


def test_predictions_are_pasted_back_at_full_size(tmp_path):
    root = make_brats(tmp_path / "b")
    args = phantom_args(REPO / "experiments" / "brats" / "supervised.yaml", tmp_path, tmp_path, tmp_path / "runs")
    args += [f"--data.init_args.root={root}"]
    assert main(["fit", *args]) == 0
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    assert main(["predict", *args, f"--ckpt_path={ckpt}"]) == 0
    (written,) = (tmp_path / "runs").rglob("predictions/*.nii.gz")
    scan = nib.load(str(root / written.name.replace(".nii.gz", "") / written.name.replace(".nii", "_flair.nii")))
    mask = nib.load(str(written))
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
    brain = np.asarray(scan.dataobj) != 0
    where = np.nonzero(brain)
    outside = np.ones(scan.shape, bool)
    outside[tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)] = False
    assert not np.asarray(mask.dataobj)[outside].any()  # nothing predicted outside the crop


# ---- real cases (../shared/data) --------------------------------------------------------------------------

@pytest.mark.real_data
@pytest.mark.parametrize("folder,modalities,val_cases", [("BraTS2018-subset", ["t1", "t1ce", "t2", "flair"], 1),
                                                         ("BraTS2015-subset", ["flair", "t1ce"], 0)])
def test_real_cases_train_a_step_and_validate_a_volume(folder, modalities, val_cases, tmp_path):
    root = real(folder)
    dm = datamodule(root, modalities=modalities, val_cases=val_cases, labeled=None, labeled_batch_size=None,
                    dim=2, patch_size=[128, 128])
    dm.setup("fit")
    case = dm.datasets["val"][0]
    assert case["image"].shape[0] == len(modalities) and case["image"].shape[1] == 155  # 2D: slices first
    assert set(np.unique(case["label"].numpy())) == {0, 1, 2, 3}
    assert all(n < 240 for n in case["image"].shape[2:])  # cropped to the brain
    args = ["--config", str(REPO / "experiments" / "brats" / "supervised.yaml"), f"--data.init_args.root={root}",
            f"--data.init_args.modalities=[{','.join(modalities)}]", f"--data.init_args.val_cases={val_cases}",
            "--data.init_args.dim=2", "--data.init_args.patch_size=[128,128]", "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0", "--model.init_args.net=lightning_modules.nets.unet2d.UNet2D",
            f"--model.init_args.net.init_args.in_channels={len(modalities)}",
            "--model.init_args.net.init_args.num_classes=4", "--model.init_args.infer_mode=slices",
            "--model.init_args.sw_batch_size=32", "--trainer.max_steps=1", "--trainer.val_check_interval=1",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main(["fit", *args]) == 0
    (rows,) = tmp_path.rglob("per_case_val.csv")
    assert {line.split(",")[2] for line in rows.read_text().splitlines()[1:]} == {"NCR", "ED", "ET"}


def test_prepared_cache_reads_as_the_folders_do(phantom, tmp_path):
    """``python -m datamodules.prepare brats``: the DataModule on the cache yields the same tensors, crop and
    geometry as on the case folders; a modality the cache lacks is a sentence naming the file."""
    from datamodules.prepare import main as prepare

    cache = tmp_path / "cache"
    prepare(["brats", str(phantom), str(cache)])
    assert (cache / "brats_cache.json").is_file() and len(list(cache.glob("*.h5"))) == 4
    for kw in ({"modalities": ["flair", "t1ce"]}, {"target": "wt", "modalities": ["t2"]}):
        direct, cached = datamodule(phantom, **kw), datamodule(cache, **kw)
        direct.setup("fit")
        cached.setup("fit")
        a, b = direct.datasets["val"][0], cached.datasets["val"][0]
        assert a["case"] == b["case"] and torch.equal(a["label"], b["label"]) and a["crop"] == b["crop"]
        torch.testing.assert_close(a["image"], b["image"])
        assert np.allclose(a["affine"], b["affine"]) and a["spacing"] == pytest.approx(b["spacing"])
        assert torch.equal(direct.datasets["labeled"][(0, 3)]["label"], cached.datasets["labeled"][(0, 3)]["label"])
    import h5py
    with h5py.File(next(cache.glob("*.h5")), "r+") as f:
        f.attrs["modalities"] = ["flair"]
    with pytest.raises(DataError, match="caches the modalities"):
        datamodule(cache, modalities=["t1"], labeled=1, labeled_batch_size=None).setup("fit")
