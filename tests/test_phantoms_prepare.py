"""Generated phantoms (layouts, anatomy, determinism, caching) and the official-ACDC converter."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from datamodules.phantoms import LA_FOLDER, MARKER, ensure_phantoms, make_acdc, make_la
from datamodules.prepare import main
from datamodules.prepare.acdc import prepare_acdc
from datamodules.readers import read_list
from datamodules.writers import write_h5

REPO = Path(__file__).resolve().parents[1]
SQUARE = np.ones((3, 3), bool)  # 8-connected one-pixel dilation


def read_h5(path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def patients_in_order(names: list[str]) -> list[str]:
    return list(dict.fromkeys(n.split("_")[0] for n in names))


def acdc_volumes(root: Path) -> dict[str, np.ndarray]:
    """label (D, H, W) of every val/test volume and of every train frame, stacked from its slices."""
    labels = {n: read_h5(root / "data" / f"{n}.h5")[0]["label"]
              for split in ("val", "test") for n in read_list(root / f"{split}.list")}
    for name in read_list(root / "train.list"):
        files = sorted((root / "data" / "slices").glob(f"{name}_slice_*.h5"), key=lambda p: int(p.stem.split("_")[-1]))
        labels[name] = np.stack([read_h5(p)[0]["label"] for p in files])
    return labels


@pytest.fixture(scope="module")
def acdc(tmp_path_factory) -> Path:
    return make_acdc(tmp_path_factory.mktemp("acdc"))


@pytest.fixture(scope="module")
def la(tmp_path_factory) -> Path:
    return make_la(tmp_path_factory.mktemp("la"), present=5)


# ---------------------------------------------------------------- ACDC phantom

def test_acdc_layout(acdc):
    splits = {s: read_list(acdc / f"{s}.list") for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [12, 4, 4]
    patients = {s: patients_in_order(v) for s, v in splits.items()}
    assert len(set().union(*patients.values())) == 10, "patients are distinct across splits"
    for names in splits.values():
        assert all(re.fullmatch(r"patient\d{3}_frame0[12]", n) for n in names)
        assert names == [f"{p}_frame0{k}" for p in patients_in_order(names) for k in (1, 2)]
    for name in splits["val"] + splits["test"]:
        arrays, _ = read_h5(acdc / "data" / f"{name}.h5")
        assert set(arrays) == {"image", "label"}
        assert arrays["image"].dtype == np.float32 and arrays["label"].dtype == np.uint8
        assert arrays["image"].shape == arrays["label"].shape and arrays["image"].shape[1:] == (64, 64)
        assert 6 <= arrays["image"].shape[0] <= 9
        assert arrays["image"].min() == 0 and arrays["image"].max() == 1  # per-volume min-max
    for name in splits["train"]:
        assert not (acdc / "data" / f"{name}.h5").exists(), "the shipped layout has no training volumes"
    slice_names = read_list(acdc / "train_slices.list")
    labels_seen = set()
    for name in slice_names:
        arrays, _ = read_h5(acdc / "data" / "slices" / f"{name}.h5")
        assert arrays["image"].shape == arrays["label"].shape == (64, 64)
        assert arrays["image"].dtype == np.float32 and arrays["label"].dtype == np.uint8
        assert 0 <= arrays["image"].min() and arrays["image"].max() <= 1
        labels_seen |= set(np.unique(arrays["label"]).tolist())
    assert labels_seen == {0, 1, 2, 3}
    assert len(list((acdc / "data" / "slices").glob("*.h5"))) == len(slice_names)
    assert not list(acdc.rglob("*.tmp"))


def test_acdc_train_slices_grouped_shuffled_and_one_based(acdc):
    slice_names = read_list(acdc / "train_slices.list")
    train = read_list(acdc / "train.list")
    order = patients_in_order(slice_names)
    assert order == patients_in_order(train) and order != sorted(order)
    runs = [p for i, p in enumerate(n.split("_")[0] for n in slice_names) if i == 0 or not slice_names[i - 1].startswith(p)]
    assert runs == order, "each patient's slices are contiguous"
    volumes = [n.rsplit("_slice_", 1)[0] for n in slice_names]
    assert list(dict.fromkeys(volumes)) == train, "frame01 then frame02 of each patient"
    shuffled = False
    for name in train:
        index = [int(n.rsplit("_", 1)[1]) for n in slice_names if n.startswith(name + "_")]
        assert sorted(index) == list(range(1, len(index) + 1))
        shuffled |= index != sorted(index)
    assert shuffled


def test_acdc_anatomy_is_consistent(acdc):
    volumes = acdc_volumes(acdc)
    for name, label in volumes.items():
        assert (label[-1] != 1).all(), f"{name}: the apical slice has no RV"
        assert (label[0] == 3).sum() > (label[-1] == 3).sum(), f"{name}: the LV narrows towards the apex"
        for z, sl in enumerate(label):
            lv, myo, rv = sl == 3, sl == 2, sl == 1
            grown = ndi.binary_dilation(lv, SQUARE)
            assert not (grown & ~(lv | myo)).any(), f"{name} slice {z}: myocardium encloses the LV"
            assert not (grown & rv).any(), f"{name} slice {z}: RV never touches the LV"
            if rv.any():
                assert (ndi.binary_dilation(rv, SQUARE) & myo).any(), f"{name} slice {z}: RV lies against the septum"
                assert ndi.label(rv)[1] == 1
    for pid in patients_in_order(list(volumes)):
        ed, es = volumes[f"{pid}_frame01"], volumes[f"{pid}_frame02"]
        assert ed.shape == es.shape
        assert (es == 3).sum() < 0.8 * (ed == 3).sum(), f"{pid}: the ES cavity is smaller"
        assert (es == 2).sum() / (es == 3).sum() > 1.3 * (ed == 2).sum() / (ed == 3).sum(), f"{pid}: thicker ES wall"


def test_acdc_image_contrast(acdc):
    for name in read_list(acdc / "val.list"):
        arrays, _ = read_h5(acdc / "data" / f"{name}.h5")
        image, label = arrays["image"], arrays["label"]
        blood, muscle = np.median(image[label == 3]), np.median(image[label == 2])
        assert blood > 1.5 * muscle, name


# ---------------------------------------------------------------- LA phantom

def test_la_layout(la):
    train, test, present = (read_list(la / f"{s}.list") for s in ("train", "test", "present"))
    assert len(train) == 6 and len(test) == 2 and train == sorted(train)
    assert all(re.fullmatch(r"[A-Z0-9]{20}", case) for case in train + test)
    assert len(set(train + test)) == 8
    assert len(present) == 5 and present == [c for c in train + test if c in present]
    assert set(present) & set(test) and set(present) & set(train)
    on_disk = {p.parent.name for p in (la / LA_FOLDER).glob("*/mri_norm2.h5")}
    assert on_disk == set(present)
    for case in present:
        arrays, _ = read_h5(la / LA_FOLDER / case / "mri_norm2.h5")
        image, label = arrays["image"], arrays["label"]
        assert set(arrays) == {"image", "label"}
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape == (48, 48, 40)
        assert set(np.unique(label).tolist()) == {0, 1}
        assert np.isfinite(image).all() and 0 < image.mean() < 1.5 and 0.7 < image.std() < 1.5  # as UA-MT's crops
        assert image[label == 1].mean() > image[label == 0].mean() + 1.5
        assert ndi.label(label)[1] == 1, "one atrium"
        assert not label[[0, -1]].any() and not label[:, [0, -1]].any(), "the crop holds the whole atrium in-plane"


def test_la_present_none_writes_every_case(tmp_path):
    root = make_la(tmp_path, n_train=2, n_test=1, shape=(24, 24, 16))
    cases = read_list(root / "train.list") + read_list(root / "test.list")
    assert read_list(root / "present.list") == cases
    assert all((root / LA_FOLDER / c / "mri_norm2.h5").exists() for c in cases)


# ---------------------------------------------------------------- determinism and caching

def tree(root: Path) -> dict[str, bytes | dict]:
    """Every list file's text and every h5 file's arrays under root."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.suffix == ".list":
            out[str(path.relative_to(root))] = path.read_bytes()
        elif path.suffix == ".h5":
            out[str(path.relative_to(root))] = read_h5(path)[0]
    return out


def same_tree(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] if isinstance(a[k], bytes) else all(np.array_equal(a[k][x], b[k][x]) for x in a[k]) for k in a)


@pytest.mark.parametrize("make, kw", [(make_acdc, dict(n_train=2, n_val=1, n_test=1, size=(32, 40))),
                                      (make_la, dict(n_train=2, n_test=1, shape=(24, 28, 16)))])
def test_generation_is_deterministic(tmp_path, make, kw):
    first, again, other = (tree(make(tmp_path / name, seed=seed, **kw)) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert same_tree(first, again)
    assert not same_tree(first, other)


def test_ensure_phantoms_caches(tmp_path):
    kw = dict(n_train=2, n_val=1, n_test=1, size=(32, 32))
    root = ensure_phantoms("acdc", tmp_path / "acdc", **kw)
    assert (root / MARKER).exists()
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_phantoms("acdc", root, **kw, seed=0) == root  # same parameters, defaults spelled out
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    with pytest.raises(ValueError, match="other root"):
        ensure_phantoms("acdc", root, **{**kw, "n_train": 3})
    with pytest.raises(ValueError, match="unknown phantom kind"):
        ensure_phantoms("kvasir", tmp_path / "c")


def test_ensure_phantoms_redoes_an_unfinished_root(tmp_path):
    root = tmp_path / "la"
    (root / LA_FOLDER).mkdir(parents=True)  # as left by an interrupted run: no marker
    ensure_phantoms("la", root, n_train=1, n_test=1, shape=(24, 24, 16))
    assert (root / MARKER).exists() and len(read_list(root / "present.list")) == 2


def test_write_h5_never_replaces_a_finished_file_with_a_broken_one(tmp_path):
    path = tmp_path / "x.h5"
    write_h5(path, {"image": np.zeros(3, np.float32)})
    with pytest.raises(TypeError):
        write_h5(path, {"image": np.array([object()])})
    assert np.array_equal(read_h5(path)[0]["image"], np.zeros(3)) and not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- prepare: official ACDC -> SSL4MIS layout

ZOOMS = (1.5, 1.25, 10.0)  # x, y, z in mm: all different, so a wrong axis order shows
SHAPE = (20, 24, 5)        # NIfTI (x, y, z)
FRAMES = {"patient001": (1, 12), "patient002": (4, 11), "patient003": (1, 9)}  # (ED, ES); ED is not always 1


def save_nifti(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([*ZOOMS, 1.0])), path)


def fake_release(raw: Path) -> dict[str, np.ndarray]:
    """An official-layout ACDC release of 3 patients (two in training/, one in testing/); returns the
    NIfTI arrays (x, y, z) by file stem."""
    rng = np.random.default_rng(0)
    arrays = {}
    for pid, (ed, es) in FRAMES.items():
        folder = raw / ("testing" if pid == "patient003" else "training") / pid
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
        save_nifti(folder / f"{pid}_4d.nii.gz", rng.integers(0, 500, (*SHAPE, 3)).astype(np.int16))
        for frame in (ed, es):
            stem = f"{pid}_frame{frame:02d}"
            arrays[stem] = rng.integers(20, 900, SHAPE).astype(np.int16)
            arrays[f"{stem}_gt"] = rng.integers(0, 4, SHAPE).astype(np.uint8)
            save_nifti(folder / f"{stem}.nii.gz", arrays[stem])
            save_nifti(folder / f"{stem}_gt.nii.gz", arrays[f"{stem}_gt"])
    return arrays


@pytest.fixture
def raw(tmp_path) -> tuple[Path, dict]:
    return tmp_path / "raw", fake_release(tmp_path / "raw")


def test_prepare_acdc_layout_axes_and_spacing(raw, tmp_path):
    raw_dir, arrays = raw
    out = tmp_path / "out"
    assert prepare_acdc(raw_dir, out) == {"patients": 3, "volumes": 6, "slices": 30}
    train = read_list(out / "train.list")
    assert train == [f"{p}_frame0{k}" for p in FRAMES for k in (1, 2)]
    assert read_list(out / "val.list") == read_list(out / "test.list") == []
    slices = read_list(out / "train_slices.list")
    assert slices == [f"{name}_slice_{i}" for name in train for i in range(1, 6)]
    for pid, (ed, es) in FRAMES.items():
        for k, frame in ((1, ed), (2, es)):
            data, attrs = read_h5(out / "data" / f"{pid}_frame0{k}.h5")
            source = f"{pid}_frame{frame:02d}"
            assert data["image"].shape == (5, 24, 20) and data["image"].dtype == np.float32
            assert data["image"].min() == 0 and data["image"].max() == 1
            expected = arrays[source].transpose(2, 1, 0).astype(np.float64)
            np.testing.assert_allclose(data["image"], (expected - expected.min()) / np.ptp(expected), atol=1e-6)
            assert data["label"].dtype == np.uint8
            assert np.array_equal(data["label"], arrays[f"{source}_gt"].transpose(2, 1, 0))
            np.testing.assert_allclose(attrs["spacing"], (10.0, 1.25, 1.5))  # (z, y, x) like the array
            assert (attrs["frame"], attrs["ED"], attrs["ES"], attrs["Group"]) == (frame, ed, es, "DCM")
            assert (attrs["Height"], attrs["Weight"]) == (184.0, 95.0) and "NbFrame" not in attrs
            for i in (1, 5):
                sl, _ = read_h5(out / "data" / "slices" / f"{pid}_frame0{k}_slice_{i}.h5")
                assert np.array_equal(sl["image"], data["image"][i - 1])
                assert np.array_equal(sl["label"], data["label"][i - 1])
    assert not list(out.rglob("*_slice_0.h5")) and not list(out.rglob("*.tmp"))


def test_prepare_acdc_copies_a_split(raw, tmp_path):
    raw_dir, _ = raw
    split = tmp_path / "split"
    split.mkdir()
    lists = {"train": "patient002_frame01\npatient002_frame02\npatient001_frame01\npatient001_frame02\n",
             "val": "patient003_frame01\npatient003_frame02\n", "test": ""}
    for name, text in lists.items():
        (split / f"{name}.list").write_text(text)
    out = tmp_path / "out"
    main(["acdc", str(raw_dir), str(out), "--split-from", str(split)])
    for name, text in lists.items():
        assert (out / f"{name}.list").read_text() == text
    assert patients_in_order(read_list(out / "train_slices.list")) == ["patient002", "patient001"]
    assert (out / "data" / "patient003_frame01.h5").exists()
    assert not list((out / "data" / "slices").glob("patient003_*"))


def test_prepare_accepts_patient_folders_directly(tmp_path, raw):
    raw_dir, _ = raw
    flat = tmp_path / "flat"
    flat.mkdir()
    (raw_dir / "training" / "patient001").rename(flat / "patient001")
    assert prepare_acdc(flat, tmp_path / "out")["volumes"] == 2


def run_main(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lemis: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_prepare_errors(raw, tmp_path, capsys):
    raw_dir, _ = raw
    out = str(tmp_path / "out")
    assert str(tmp_path / "nowhere") in run_main(["acdc", str(tmp_path / "nowhere"), out], capsys)
    (tmp_path / "empty").mkdir()
    assert "no patientXXX folders" in run_main(["acdc", str(tmp_path / "empty"), out], capsys)
    assert "no converter for 'la' (there are: acdc, brats, la-nnunet)" in run_main(["la", str(raw_dir), out], capsys)
    split = tmp_path / "split"
    split.mkdir()
    for name in ("train", "val", "test"):
        (split / f"{name}.list").write_text("patient077_frame01\n" if name == "train" else "")
    assert "patient077_frame01" in run_main(["acdc", str(raw_dir), out, "--split-from", str(split)], capsys)
    gt = raw_dir / "training" / "patient002" / "patient002_frame11_gt.nii.gz"
    gt.unlink()
    assert "patient002_frame11.nii.gz" in run_main(["acdc", str(raw_dir), out], capsys)
    info = raw_dir / "training" / "patient001" / "Info.cfg"
    info.write_text(info.read_text().replace("Group: DCM", "Group: NOR"))
    assert f"{info} gives Group NOR, but ACDC's training set puts patient001 in the DCM block" in run_main(
        ["acdc", str(raw_dir), out], capsys)


def test_prepare_command_line_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "datamodules.prepare", "acdc", str(tmp_path / "none"),
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.startswith("lemis: error: ") and result.stderr.count("\n") == 1
