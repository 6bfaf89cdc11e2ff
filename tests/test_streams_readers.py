"""Declared streams and pluggable readers: labels of unlabeled items are never read, the targets hook runs
before the label check, NIfTI files are read with their geometry (a third stream: tests/test_example_method.py)."""
import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.acdc import ACDCDataModule
from datamodules.readers import H5Reader, NiftiReader
from lemis.errors import DataError


class SpyReader(H5Reader):
    """Records the keys asked for each file."""

    def __init__(self):
        self.asked = {}

    def read(self, location, keys):
        self.asked.setdefault(str(location), set()).update(keys)
        return super().read(location, keys)


def test_unlabeled_labels_are_never_read(acdc_phantom):
    dm = ACDCDataModule(str(acdc_phantom), labeled=2, batch_size=4, labeled_batch_size=2, patch_size=(32, 32),
                        num_workers=0, cache=False)
    dm.reader = SpyReader()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))[0]
    assert "label" in batch["labeled"] and "label" not in batch["unlabeled"]
    unlabeled = {str(dm.train_path(i)) for i in dm.datasets["unlabeled"].items}
    assert unlabeled and all(dm.reader.asked[path] == {"image"} for path in unlabeled)


class Stored4(ACDCDataModule):
    """Labels as a BraTS file stores them, {0, 1, 2, 4}: the phantom's class 3 read back as 4."""

    def targets(self, stream, data, location):
        return {**data, "label": np.where(data["label"] == 3, 4, data["label"])} if "label" in data else data


class Remapped(Stored4):
    """The targets hook maps 4 -> 3 before the range check."""

    def targets(self, stream, data, location):
        data = super().targets(stream, data, location)
        return {**data, "label": np.where(data["label"] == 4, 3, data["label"])} if "label" in data else data


def test_targets_hook_runs_before_the_label_check(acdc_phantom):
    kw = dict(labeled=2, batch_size=4, labeled_batch_size=2, patch_size=(32, 32), num_workers=0)
    with pytest.raises(DataError, match=r"label values \[4\] outside 0\.\.3"):
        Stored4(str(acdc_phantom), **kw).setup("fit")
    dm = Remapped(str(acdc_phantom), **kw)
    dm.setup("fit")
    assert dm.datasets["labeled"][0]["label"].max() == 3


def _nifti(path, array, spacing=(0.8, 0.8, 3.0), affine=None):
    affine = np.diag([*spacing, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def test_nifti_reader_channels_spacing_and_geometry(tmp_path):
    rng = np.random.default_rng(0)
    a = _nifti(tmp_path / "c_0000.nii.gz", rng.random((6, 5, 4)).astype(np.float32))
    b = _nifti(tmp_path / "c_0001.nii.gz", rng.random((6, 5, 4)).astype(np.float32))
    label = _nifti(tmp_path / "c.nii.gz", (rng.random((6, 5, 4)) > 0.5).astype(np.uint8))
    data = NiftiReader().read({"image": [a, b], "label": label}, ("image", "label"))
    assert data["image"].shape == (2, 6, 5, 4) and data["label"].shape == (6, 5, 4)
    assert data["attrs"]["spacing"] == pytest.approx((0.8, 0.8, 3.0))
    np.testing.assert_allclose(data["image"][1], nib.load(str(b)).get_fdata(), rtol=1e-6)
    four_d = _nifti(tmp_path / "m.nii.gz", rng.random((6, 5, 4, 2)).astype(np.float32))
    assert NiftiReader().read({"image": four_d}, ("image",))["image"].shape == (2, 6, 5, 4)  # MSD: channels last
    shifted = _nifti(tmp_path / "s.nii.gz", np.zeros((6, 5, 4), np.uint8), affine=np.diag([0.8, 0.8, 2.0, 1.0]))
    with pytest.raises(DataError, match="s.nii.gz has shape .* its geometry does not match"):
        NiftiReader().read({"image": [a], "label": shifted}, ("image", "label"))
    (tmp_path / "broken.nii.gz").write_bytes(b"not nifti")
    with pytest.raises(DataError, match="cannot read .*broken.nii.gz as NIfTI"):
        NiftiReader().read({"image": tmp_path / "broken.nii.gz"}, ("image",))
    assert NiftiReader().files({"image": [a, b], "label": label}) == [a, b, label]
    torch.testing.assert_close(torch.from_numpy(data["image"][0]), torch.from_numpy(np.asarray(
        nib.load(str(a)).dataobj)))
