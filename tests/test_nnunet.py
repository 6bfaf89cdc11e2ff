"""Your own data (issue "Bring your own data"): nnU-Net v2 raw and MSD folders as a DataModule, and predictions
written as NIfTI that overlay their scans."""
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.nnunet import NnUNetDataModule, normalise
from datamodules.phantoms.nnunet import SPACING, make_nnunet, phantom_affine
from experiments.__main__ import main
from lemis.errors import ConfigError, DataError
from lightning_modules import losses
from lightning_modules.supervised import Supervised
from tests.conftest import REPO
from tests.test_experiments import phantom_args

PATCH = [32, 32, 16]


@pytest.fixture(scope="module", params=["nnunet", "msd"])
def phantom(request, tmp_path_factory) -> Path:
    return make_nnunet(tmp_path_factory.mktemp(request.param) / "Dataset001_Phantom", layout=request.param)


def datamodule(root, **kw) -> NnUNetDataModule:
    options = {"labeled": 2, "batch_size": 2, "labeled_batch_size": 1, "patch_size": PATCH, "num_workers": 0}
    return NnUNetDataModule(str(root), **{**options, **kw})


def copy(phantom: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(phantom, tmp_path / phantom.name))


def image_files(root: Path, case: str) -> list[Path]:
    """The channel files of a case in either layout: [c0, c1] (nnU-Net) or [4D file] (MSD)."""
    files = sorted((root / "imagesTr").glob(f"{case}_*.nii.gz"))
    return files or [root / "imagesTr" / f"{case}.nii.gz"]


# ---- reading the folder ------------------------------------------------------------------------------------------

def test_cases_channels_labels_and_spacing(phantom):
    """Cases sorted by id; the last validates; channels in dataset.json order, each z-scored; K and the class
    names from dataset.json; spacing from the header; the MSD `._` file is skipped."""
    dm = datamodule(phantom)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.class_names == ("lesion", "core")
    assert list(dm.labeled_cases()) == [f"case_tr{i:03d}" for i in range(5)]
    assert dm.eval_cases("val") == ["case_tr004"]
    case = dm.datasets["val"][0]
    files = image_files(phantom, "case_tr004")
    raw = np.stack([np.asarray(nib.load(str(f)).dataobj) for f in files]) if len(files) == 2 else \
        np.moveaxis(np.asarray(nib.load(str(files[0])).dataobj), -1, 0)
    expected = np.stack([(c - c.mean()) / c.std() for c in raw.astype(np.float32)])
    assert case["image"].shape == (2, 24, 24, 10)
    np.testing.assert_allclose(case["image"].numpy(), expected, rtol=1e-4, atol=1e-4)
    label = np.asarray(nib.load(str(phantom / "labelsTr" / "case_tr004.nii.gz")).dataobj)
    assert torch.equal(case["label"], torch.from_numpy(label.astype(np.int64)))
    assert case["spacing"] == pytest.approx(SPACING) and np.allclose(case["affine"], phantom_affine())


def test_budget_and_unlabeled_pool_never_read_labels(phantom, tmp_path):
    """labeled=2 of the 4 training cases: the other 2 and imagesUnlabeled/ form the unlabeled stream, images
    only; their label files are never read (damaged ones pass)."""
    root = copy(phantom, tmp_path)
    for case in ("case_tr002", "case_tr003"):
        (root / "labelsTr" / f"{case}.nii.gz").write_bytes(b"not a nifti")
    dm = datamodule(root)
    dm.setup("fit")
    assert dm.datasets["labeled"].items == ["case_tr000", "case_tr001"]
    assert dm.datasets["unlabeled"].items == ["case_tr002", "case_tr003", "case_unl000", "case_unl001"]
    for index in range(4):
        assert "label" not in dm.datasets["unlabeled"][(index, 0)]
    sample = dm.datasets["labeled"][(0, 0)]
    assert sample["image"].shape == (2, *PATCH) and sample["label"].shape == tuple(PATCH)


def test_two_dimensional_items_are_axial_slices(phantom):
    dm = datamodule(phantom, dim=2, patch_size=[32, 32])
    dm.setup("fit")
    assert dm.datasets["labeled"].items[:2] == ["case_tr000/0", "case_tr000/1"] and len(dm.datasets["labeled"]) == 20
    sample = dm.datasets["labeled"][(3, 0)]
    assert sample["image"].shape == (2, 32, 32) and sample["label"].shape == (32, 32)
    case = dm.datasets["val"][0]  # the slice axis first, for infer_mode slices
    assert case["image"].shape == (2, 10, 24, 24) and case["axes"] == (2, 0, 1)
    assert case["spacing"] == pytest.approx((SPACING[2], SPACING[0], SPACING[1]))


def test_normalisation_schemes_by_channel_name():
    image = np.stack([np.arange(8, dtype=np.float32) * 10, np.arange(8, dtype=np.float32)])[:, :, None, None]
    ct = normalise(image, ["CT", "rescale_to_0_1"], {0: (10.0, 50.0, 30.0, 10.0)})
    np.testing.assert_allclose(ct[0].ravel(), [-2, -2, -1, 0, 1, 2, 2, 2])  # clip to [10, 50], (x - 30) / 10
    np.testing.assert_allclose(ct[1].ravel(), np.arange(8) / 7)
    np.testing.assert_allclose(normalise(image, ["noNorm", "rgb_to_0_1"])[1].ravel(), np.arange(8) / 255)


def test_ct_statistics_come_from_the_labeled_foreground(tmp_path):
    root = make_nnunet(tmp_path / "ct", n_unlabeled=0)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "ADC"}
    (root / "dataset.json").write_text(json.dumps(meta))
    dm = datamodule(root, labeled_batch_size=None, labeled=None)
    dm.setup("fit")
    values = []
    for case in [f"case_tr{i:03d}" for i in range(4)]:  # the training cases (case_tr004 validates)
        image = np.asarray(nib.load(str(root / "imagesTr" / f"{case}_0000.nii.gz")).dataobj)
        label = np.asarray(nib.load(str(root / "labelsTr" / f"{case}.nii.gz")).dataobj)
        values.append(image[label > 0])
    values = np.concatenate(values).astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    assert dm._ct_stats[0] == pytest.approx((low, high, values.mean(), values.std()))


# ---- bad input: one sentence naming the file ----------------------------------------------------------------

def _break(root: Path, how: str) -> str:
    """Damage a copy of the nnU-Net phantom; returns what the sentence must name."""
    if how == "missing channel":
        (root / "imagesTr" / "case_tr001_0001.nii.gz").unlink()
        return str(root / "imagesTr" / "case_tr001_0001.nii.gz")
    if how == "missing label":
        (root / "labelsTr" / "case_tr001.nii.gz").unlink()
        return str(root / "labelsTr" / "case_tr001.nii.gz")
    if how == "geometry":
        path = root / "imagesTr" / "case_tr001_0001.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((24, 24, 9), np.float32), phantom_affine()), str(path))
        return str(path)
    if how == "label value":
        path = root / "labelsTr" / "case_tr000.nii.gz"
        label = np.asarray(nib.load(str(path)).dataobj).copy()
        label[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(label, phantom_affine()), str(path))
        return str(path)
    meta = json.loads((root / "dataset.json").read_text())
    if how == "json key":
        del meta["file_ending"]
    elif how == "json labels":
        meta["labels"] = {"background": 0, "lesion": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    return str(root / "dataset.json")


@pytest.mark.parametrize("how", ["missing channel", "missing label", "geometry", "label value", "json key",
                                 "json labels"])
def test_bad_folder_is_one_sentence_naming_the_file(how, tmp_path):
    root = make_nnunet(tmp_path / "Dataset001_Phantom")
    needle = _break(root, how)
    with pytest.raises(DataError) as err:
        datamodule(root).setup("fit")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_folder_through_the_cli_exits_2(tmp_path, capsys):
    root = make_nnunet(tmp_path / "Dataset001_Phantom")
    needle = _break(root, "missing channel")
    config = REPO / "experiments" / "nnunet" / "supervised.yaml"
    args = phantom_args(config, tmp_path, tmp_path, tmp_path) + [f"--data.init_args.root={root}"]
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_options_that_cannot_hold(phantom):
    with pytest.raises(ConfigError, match="num_classes=4"):
        datamodule(phantom, num_classes=4).setup("fit")
    with pytest.raises(ConfigError, match="val_cases=5"):
        datamodule(phantom, val_cases=5).setup("fit")
    with pytest.raises(ConfigError, match="patch_size"):
        datamodule(phantom, dim=2)


# ---- metrics in mm and predictions that overlay their scan -----------------------------------------------

def test_spacing_reaches_the_mm_metrics(phantom):
    """A prediction one slice off along z: HD95 is 1 voxel and SPACING[2] mm."""
    dm = datamodule(phantom)
    dm.setup("fit")
    case = next(iter(dm.val_dataloader()))
    gt = case["label"][0].numpy()
    pred = np.roll(gt, 1, axis=2)
    module = Supervised(net=torch.nn.Identity(), num_classes=3, roi_size=PATCH)
    module._class_names = lambda: dm.class_names  # no trainer here to ask for the DataModule
    rows = module.score_case(pred, gt, case, None)
    assert [r["hd95"] for r in rows] == pytest.approx([1.0, 1.0])
    assert [r["hd95_mm"] for r in rows] == pytest.approx([SPACING[2]] * 2)


@pytest.mark.parametrize("config,dim", [("supervised.yaml", 3), ("supervised.yaml", 2)])
def test_predictions_are_nifti_with_the_input_geometry(config, dim, tmp_path):
    """fit 2 steps, predict imagesTs: one uint8 NIfTI per scan with the scan's affine and shape, read back
    with nibabel; ``lemis test`` scores against labelsTs."""
    root = make_nnunet(tmp_path / "Dataset001_Phantom")
    args = phantom_args(REPO / "experiments" / "nnunet" / config, tmp_path, tmp_path, tmp_path / "runs")
    args += [f"--data.init_args.root={root}"]
    if dim == 2:
        args += ["--data.init_args.dim=2", "--data.init_args.patch_size=[32,32]", "--model.init_args.infer_mode=slices",
                 "--model.init_args.net=lightning_modules.nets.unet2d.UNet2D",
                 "--model.init_args.net.init_args.in_channels=2", "--model.init_args.net.init_args.num_classes=3"]
    assert main(["fit", *args]) == 0
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    assert main(["predict", *args, f"--ckpt_path={ckpt}"]) == 0
    assert main(["test", *args, f"--ckpt_path={ckpt}"]) == 0
    written = sorted((tmp_path / "runs").rglob("predictions/*.nii.gz"))
    assert [p.name for p in written] == ["case_ts000.nii.gz", "case_ts001.nii.gz"]
    for path in written:
        scan = nib.load(str(root / "imagesTs" / path.name.replace(".nii.gz", "_0000.nii.gz")))
        mask = nib.load(str(path))
        assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    assert len(list((tmp_path / "runs").rglob("per_case_test.csv"))) == 1
    pngs = sorted(p.name for p in (tmp_path / "runs").rglob("predictions/overview/*.png"))
    assert pngs == ["case_ts000.png", "case_ts001.png"]


def test_ignore_label_is_no_class_and_leaves_the_loss_and_metrics(tmp_path):
    """dataset.json's 'ignore' (the highest value): K counts the other labels; the voxels pass the label check;
    the module's loss and its per-case metrics leave them out; a method that cannot (SGRS) is refused."""
    root = make_nnunet(tmp_path / "Dataset001_Phantom")
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["ignore"] = 3
    (root / "dataset.json").write_text(json.dumps(meta))
    path = root / "labelsTr" / "case_tr004.nii.gz"  # the validation case
    label = np.asarray(nib.load(str(path)).dataobj).copy()
    label[:, :, :2] = 3
    nib.save(nib.Nifti1Image(label, phantom_affine()), str(path))
    dm = datamodule(root)
    dm.setup("fit")
    assert (dm.num_classes, dm.ignore_index, dm.class_names) == (3, 3, ("lesion", "core"))
    case = next(iter(dm.val_dataloader()))
    module = Supervised(net=torch.nn.Identity(), num_classes=3, roi_size=PATCH)
    module.take_ignore_index(dm)
    logits = torch.randn(1, 3, *case["label"].shape[1:])
    kept = case["label"][0] != 3  # the loss of the other voxels alone, as one [1, K, N, 1] "image"
    z, y = logits[0][:, kept][None, :, :, None], case["label"][0][kept][None, :, None]
    expected = losses.supervised_loss(z, y)
    assert module.supervised_loss(logits, case["label"]).item() == pytest.approx(expected.item(), rel=1e-5)
    gt = case["label"][0].numpy()
    module.predict_case = lambda image: torch.nn.functional.one_hot(  # predicts the core everywhere ignored
        torch.from_numpy(np.where(gt == 3, 2, gt)).long(), 3).movedim(-1, 0)[None].float()
    module._class_names = lambda: dm.class_names
    module._evaluate_case(case, 1)
    assert [r["dice"] for r in module._rows] == [1.0, 1.0]
    from lightning_modules.nets.unet2d import UNet2D
    from lightning_modules.sgrs import SGRS
    with pytest.raises(ConfigError, match="ignore label"):
        SGRS(net=UNet2D(2, 3), num_classes=3).take_ignore_index(dm)


def test_la_converts_to_an_nnunet_folder(la_phantom, tmp_path):
    """``python -m datamodules.prepare la-nnunet``: every present train.list case in imagesTr/labelsTr, test.list in
    imagesTs/labelsTs, 0.625 mm voxels, the arrays unchanged; the nnunet DataModule reads the result."""
    import h5py

    from datamodules.prepare import main as prepare

    out = tmp_path / "Dataset001_LA"
    prepare(["la-nnunet", str(la_phantom), str(out)])
    train = (la_phantom / "train.list").read_text().split()
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in train)
    case = train[0]
    scan = nib.load(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
    with h5py.File(la_phantom / "2018LA_Seg_Training Set" / case / "mri_norm2.h5") as f:
        assert np.array_equal(np.asarray(scan.dataobj), f["image"][()].astype(np.float32))
        assert np.array_equal(np.asarray(nib.load(str(out / "labelsTr" / f"{case}.nii.gz")).dataobj), f["label"][()])
    assert scan.header.get_zooms() == pytest.approx((0.625,) * 3)
    dm = datamodule(out, labeled=2, patch_size=[32, 32, 32])
    dm.setup("fit")
    assert dm.num_classes == 2 and len(dm.datasets["labeled"]) == 2


def test_predict_a_plain_folder_with_only_dataset_json(tmp_path):
    """``lemis predict`` on new scans: a root holding just dataset.json, and a folder of single-channel
    ``{case}.nii.gz`` files (no channel suffix) anywhere."""
    root = tmp_path / "Dataset002_One"
    root.mkdir()
    meta = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    scans = tmp_path / "new_scans"
    scans.mkdir()
    for case in ("patient_b", "patient_a"):
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 18, 6)).astype(np.float32),
                                 phantom_affine()), str(scans / f"{case}.nii.gz"))
    (scans / "notes.txt").write_text("not a scan")
    dm = datamodule(root, predict_folder=str(scans))
    dm.setup("predict")
    cases = [dm.datasets["predict"][i] for i in range(len(dm.datasets["predict"]))]
    assert [c["case"] for c in cases] == ["patient_a", "patient_b"]
    assert cases[0]["image"].shape == (1, 20, 18, 6) and "label" not in cases[0]
