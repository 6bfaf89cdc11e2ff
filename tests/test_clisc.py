"""CLISC's label-free rules (spec/methods/clisc.md) on the spec's hand examples and a FLAIR-like phantom; stage 3's
UNet, crops and inference; the report's Dice / HD95 on cubes; the chain slice_labels -> cam -> sam -> unet -> s3f end
to end on a BraTS phantom: skipped when done, one stage rerun with what reads it, the same outputs with every label
file removed, the report from the label files, bad input in one sentence."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from datamodules.phantoms.brats import make_brats
from lemis.errors import ConfigError
from lemis.files import read_manifest, write_manifest
from lightning_modules import clisc
from lightning_modules.clisc import (
    amda_cam_guided,
    amda_intensity,
    cam_mask,
    dice,
    dilated_box,
    equalise,
    frame_scale,
    intensity_slice_labels,
    keep_large_components,
    largest_component,
    majority_vote,
    point_prompts,
    s3f_keep,
    slice_probability,
)
from lightning_modules.nets.unet3d import UNet3D


@pytest.mark.parametrize("fraction,p,certain", [(0.0, 0.0, True), (0.005, 0.2, True), (0.01, 0.5, False),
                                                (0.02, 0.8, True)])
def test_labeller_probability_and_certainty(fraction, p, certain):
    assert slice_probability(fraction) == pytest.approx(p)
    assert (max(p, 1 - p) >= 0.6 - 1e-12) == certain


def test_majority_vote_examples():
    z = list(range(12))
    assert majority_vote(z, [0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1]) == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1]
    assert majority_vote(z, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0])[6] == 0  # 10 voters, 5 vs 5: a tie gives 0
    far = [0, 1, 2, 3, 4, 20, 21, 22, 23, 24, 25, 26]  # a gap: voters more than 6 slices away do not vote
    assert majority_vote(far, [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1])[5] == 0


def phantom(tumour: bool) -> np.ndarray:
    rng = np.random.default_rng(0)
    d, h, w = 40, 48, 48
    zz, yy, xx = np.mgrid[:d, :h, :w]
    brain = ((zz - 20) / 18) ** 2 + ((yy - 24) / 20) ** 2 + ((xx - 24) / 20) ** 2 <= 1
    volume = np.where(brain, rng.normal(100, 5, brain.shape), 0.0)
    if tumour:
        sphere = (zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 22) ** 2 <= 36
        volume[sphere] = 180
    return volume


def test_intensity_labeller_on_a_phantom():
    rows = intensity_slice_labels(phantom(True))
    positive = [r["z"] for r in rows if r["raw"] == 1]
    assert positive and all(14 <= z <= 26 for z in positive) and 20 in positive
    assert all(r["raw"] == 0 for r in rows if r["certain"] and abs(r["z"] - 20) > 8)
    assert not any(r["raw"] == 1 for r in intensity_slice_labels(phantom(False)))
    assert not rows[0]["certain"]  # an almost brain-free end slice


def test_component_rules():
    mask = np.zeros((10, 10, 40), bool)
    for start, size in ((0, 9), (12, 4), (20, 3), (30, 2)):  # sizes 90, 40, 30, 20 (x10 rows)
        mask[:, 0, start:start + size] = True
    kept = keep_large_components(mask)
    assert sorted(np.bincount(ndimage.label(kept, np.ones((3, 3, 3)))[0].ravel())[1:]) == [30, 40, 90]
    assert largest_component(mask).sum() == 90
    cam = np.zeros((6, 6, 6))
    cam[1:5, 1:5, 1:5] = 0.5
    cam[0, 0, 0] = 0.9  # a lone voxel: removed by the opening
    assert cam_mask(cam).sum() == 64 and not cam_mask(cam)[0, 0, 0]


def test_boxes_frames_and_points():
    mask = np.zeros((240, 240), bool)
    mask[100:120, 80:110] = True
    assert dilated_box(mask, 0) == (80, 100, 109, 119) and dilated_box(mask) == (70, 90, 119, 129)
    corner = np.zeros((240, 240), bool)
    corner[3:21, 230:240] = True
    assert dilated_box(corner) == (220, 0, 240, 30) and dilated_box(np.zeros((4, 4), bool)) is None
    s, size = frame_scale((240, 240))
    assert s == pytest.approx(16 / 15) and size == (256, 256)
    assert np.allclose(np.array([50, 60, 120, 150]) * s, [53.333333, 64, 128, 160])
    s, size = frame_scale((170, 140))
    assert s == pytest.approx(1.505882, abs=1e-6) and size == (256, 211)
    assert np.allclose(np.array([10, 20, 100, 150]) * s, [15.0588, 30.1176, 150.5882, 225.8824], atol=1e-4)
    image = np.zeros((8, 8))
    image[2:6, 2:6] = np.arange(16).reshape(4, 4)
    points, labels = point_prompts(image > 0, image, (1, 1, 6, 6))
    assert labels.tolist() == [1] * 5 + [0] * 4 and points[5:].tolist() == [[1, 1], [6, 1], [1, 6], [6, 6]]
    assert all(image[y, x] >= 0.6 * 15 for x, y in points[:5])


def test_equalisation_spreads_a_narrow_histogram():
    image = np.repeat(np.linspace(10, 11, 64)[None], 4, 0)
    out = equalise(image)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_s3f_keep_rule():
    scores = {"A": 0.91, "B": 0.35, "C": 0.78, "D": 0.88, "E": 0.60}
    assert s3f_keep(scores) == ["A", "D", "C", "E"]
    assert s3f_keep({"x": 0.5, "a": 0.5}, 0.1) == ["a"]
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0 and dice(a & False, a & False) == 0.0


# ---- stage 3 pieces ------------------------------------------------------------------------------------------------

def test_unet3d_shapes_gradients_and_published_size():
    assert sum(p.numel() for p in UNet3D().parameters()) == 5_884_050  # channels 16..256, 1 in, 2 out, conv biases
    torch.manual_seed(0)
    net = UNet3D(1, 2, channels=(2, 4, 4)).train()
    logits = net(torch.randn(2, 1, 16, 16, 8))
    assert logits.shape == (2, 2, 16, 16, 8)
    F.cross_entropy(logits, torch.randint(2, (2, 16, 16, 8))).backward()
    # every parameter is reached (a conv bias right before instance norm gets a gradient of ~0: the norm removes it)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(p.grad.abs().sum() > 0 for name, p in net.named_parameters() if name.endswith("weight"))
    with torch.no_grad():
        x = torch.randn(1, 1, 8, 8, 8)
        assert torch.equal(net.eval()(x), net(x))  # dropout (centre, last decoder block) is off in eval mode
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 1, 16, 16, 10))


def test_crop_padding_random_crop_and_rot_flip():
    # the authors' rule: when an axis is <= crop, every axis gets max((crop - s) // 2 + 3, 0) zeros a side
    assert clisc.crop_padding((100, 160, 129), 128) == [17, 0, 2]
    assert clisc.crop_padding((129, 160, 200), 128) == [0, 0, 0] and clisc.crop_padding((128,) * 3, 128) == [3] * 3
    assert clisc.crop_padding((10, 20, 30), 16) == [6, 1, 0]
    rng = np.random.default_rng(0)
    image = np.arange(10 * 20 * 30, dtype=np.float32).reshape(10, 20, 30) + 1
    label = image.astype(np.int64)
    for _ in range(20):  # padded to (22, 22, 30): starts in [0, 6) x [0, 6) x [0, 14)
        x, y = clisc.random_crop(*clisc.rot_flip(image, label, rng), 16, rng)
        assert x.shape == y.shape == (16, 16, 16) and np.array_equal(x, y)  # one window for both
        assert (x == 0).any() and set(np.unique(x[x > 0])) <= set(np.unique(image))
    turned = [clisc.rot_flip(image, label, np.random.default_rng(s))[0] for s in range(40)]
    assert {t.shape for t in turned} == {(10, 20, 30), (20, 10, 30)}  # rot90 in axes (0, 1)
    assert all(t[..., 0].sum() == image[..., 0].sum() for t in turned)  # axis 2 is never turned or flipped


def test_inference_resizes_nearest_and_back():
    class Threshold(torch.nn.Module):  # class 1 where the input is positive
        def forward(self, x):
            return torch.cat([torch.zeros_like(x), x], 1)

    volume = -np.ones((10, 20, 30), np.float32)
    volume[:, :10] = 1
    out = clisc.predict_volume(Threshold(), volume, 16)
    assert out.shape == volume.shape and out.dtype == bool and np.array_equal(out, volume > 0)
    sliding = clisc.predict_volume(Threshold(), volume, 8, infer="sliding")  # windows smaller than the volume
    assert sliding.shape == volume.shape and np.array_equal(sliding, volume > 0)


def test_train_input_resize_feeds_the_whole_volume_at_crop_size(monkeypatch):
    seen = []
    real = clisc.rot_flip

    def recording(image, label, rng):
        seen.append((image, label))
        return real(image, label, rng)

    monkeypatch.setattr(clisc, "rot_flip", recording)
    volume = np.zeros((12, 20, 28), np.float32)
    volume[:, :10] = 1  # the first half of axis 1
    label = volume > 0
    o = clisc.UNetOptions(crop=8, epochs=1, batch=2, channels=[2, 4], train_input="resize", infer="resize")
    clisc.train_unet([volume, volume], [label, label], o)
    assert len(seen) == 2
    for image, mask in seen:  # nearest resize to 8^3: the first 4 of 8 rows along axis 1 stay foreground
        assert image.shape == mask.shape == (8, 8, 8) and mask.dtype == bool
        assert mask[:, :4].all() and not mask[:, 4:].any() and np.array_equal(image > 0, mask)
    # scipy's zoom maps corner onto corner: output i reads input round(i (4 - 1) / (2 - 1))
    assert clisc.resize_nearest(np.arange(4.0).reshape(1, 1, 4), (1, 1, 2)).tolist() == [[[0.0, 3.0]]]


def test_unet_and_s3f_options():
    o = clisc.stage_options(clisc.split_overrides(["unet:--channels=[2,4,4]", "unet:--crop=16", "--device=cpu",
                                                  "s3f:--keep_ratio=0.6"], clisc.STAGES))
    assert o["unet"].channels == [2, 4, 4] and o["unet"].crop == 16 and o["unet"].epochs == 400
    assert o["s3f"].keep_ratio == 0.6 and o["s3f"].margin == 0 and o["sam"].margin == 10
    assert o["unet"].device == o["s3f"].device == "cpu"
    for bad in (["unet:--channels=16"], ["unet:--channels=[2,4.5]"], ["unet:--crop=20"], ["unet:--crop=4",
                "unet:--channels=[2,4,4]"], ["s3f:--keep_ratio=0"], ["s3f:--epochs=2"], ["unet:--train_input=whole"],
                ["unet:--train_input=resize", "unet:--infer=sliding"]):
        with pytest.raises(ConfigError):
            clisc.stage_options(clisc.split_overrides(bad, clisc.STAGES))


# ---- stage 1 pieces ------------------------------------------------------------------------------------------------

def test_amda_hides_the_top_of_the_cam_in_the_box_or_the_brightest_pixels():
    image = np.full((8, 8), 100, np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True  # box rows 1..2, cols 1..2 -> 2..4, 2..4 in the 8 frame (int(v * 8 / 4))
    cam = np.zeros((4, 4), np.float32)
    hidden = amda_cam_guided(image, mask, cam + np.eye(4, dtype=np.float32))
    assert (hidden[2:5, 2:5] == 0).any() and (hidden[:2] == 100).all() and (hidden[5:] == 100).all()
    bright = np.arange(64, dtype=np.uint8).reshape(8, 8)
    # no mask: I = 0 where I > min + 0.8 (max - min) = 50.4
    assert np.array_equal(amda_cam_guided(bright, mask & False, cam), np.where(bright > 50.4, 0, bright))
    assert np.array_equal(amda_intensity(bright), np.where(bright > 50.4, 0, bright))


def test_classifier_loads_a_weights_file_strictly_and_layercam_gates_on_the_prediction(tmp_path):
    torch.manual_seed(0)
    imagenet_like = clisc.slice_classifier(10)
    from monai.networks.nets import resnet

    source = resnet.resnet10(spatial_dims=2, n_input_channels=3, num_classes=1000, conv1_t_stride=2,
                             bias_downsample=False)
    torch.save(source.state_dict(), tmp_path / "r10.pt")
    net = clisc.slice_classifier(10, str(tmp_path / "r10.pt"))
    assert torch.equal(net.conv1.weight, source.conv1.weight) and net.fc[-1].out_features == 2
    torch.save({"conv1.weight": source.conv1.weight}, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match="partial.pt does not fit"):
        clisc.slice_classifier(10, str(tmp_path / "partial.pt"))
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    cams = clisc.layercam(imagenet_like.eval(), images)
    with torch.no_grad():
        positive = imagenet_like(clisc.as_input(torch.from_numpy(images))).argmax(1).numpy() == 1
    assert cams.shape == (3, 32, 32) and cams.min() >= 0 and cams.max() <= 1
    assert all((cams[i].max() > 0) == positive[i] for i in range(3))  # only predicted-positive slices get a CAM


def test_thresholds_splits_and_options():
    values = np.concatenate([np.full(50, 0.1), np.full(50, 0.7)])
    assert 0.1 <= clisc.otsu(values) < 0.7
    assert clisc.cam_threshold(np.zeros((2, 3, 3)), 0.27) == 0.27
    assert clisc.split_cases(["a", "b", "c", "d"], 0.125) == (["a", "b", "c"], ["d"])
    assert clisc.split_cases(["a"], 0.125) == (["a"], []) and clisc.split_cases(["a", "b"], 0) == (["a", "b"], [])
    o = clisc.stage_options(clisc.split_overrides(["cam:--depth=18", "--device=cpu", "cam:--cam_threshold=otsu"],
                                                  clisc.STAGES))
    assert o["cam"].depth == 18 and o["cam"].cam_threshold == "otsu" and o["sam"].device == "cpu"
    for bad in (["cam:--depth=7"], ["cam:--epochs=two"], ["--nope=1"], ["sam:--depth=18"], ["junk"]):
        with pytest.raises(ConfigError):
            clisc.stage_options(clisc.split_overrides(bad, clisc.STAGES))


# ---- the chain on a BraTS phantom -----------------------------------------------------------------------------------

FAST = ["cam:--depth=10", "cam:--input_size=64", "cam:--epochs=20", "cam:--lr=0.001", "cam:--val_fraction=0",
        "unet:--channels=[4,8,8]", "unet:--crop=16", "unet:--epochs=30", "unet:--lr=0.1"]


def flair_phantom(root):
    """Two BraTS-2020-layout cases, 40 x 40 x 16 voxels (every second slice of a 32-slice phantom, as 2 mm slices),
    the whole tumour hyperintense on FLAIR as on real FLAIR (the shared phantom brightens only its oedema shell)."""
    root = make_brats(root, n_cases=2, shape=(40, 40, 32), seed=0)
    for case in sorted(p for p in root.iterdir()):
        seg = np.asarray(nib.load(str(case / f"{case.name}_seg.nii.gz")).dataobj)
        for path in sorted(case.glob("*.nii.gz")):
            image = nib.load(str(path))
            array = np.asarray(image.dataobj)
            if path.name.endswith("_flair.nii.gz"):
                array = np.where((seg > 0) & (seg != 2), array + 250, array).astype(array.dtype)
            affine = image.affine.copy()
            affine[:, 2] *= 2
            nib.save(nib.Nifti1Image(array[:, :, ::2], affine), str(path))
    return root


def digests(out):
    """{stage/file: sha256} of every declared output of the chain (masks, CAMs, labels, prompts, classifiers)."""
    return {f"{stage}/{name}": digest for stage in clisc.STAGES
            for name, digest in read_manifest(out / stage)["files"].items()}


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory):
    """The chain on the phantom with every label file moved out of the data folder first: a stage reading a label
    fails. Returns (raw root, out, {case: moved label path})."""
    base = tmp_path_factory.mktemp("clisc")
    raw, hidden = flair_phantom(base / "raw"), base / "labels"
    hidden.mkdir()
    labels = {}
    for seg in sorted(raw.rglob("*_seg.nii.gz")):
        labels[seg.parent.name] = shutil.move(str(seg), hidden / seg.name)
    assert not list(raw.rglob("*seg*")) and clisc.main([str(raw), str(base / "out"), *FAST]) == 0
    return raw, base / "out", labels


def test_chain_end_to_end_without_labels(unlabelled_run):
    raw, out, labels = unlabelled_run
    record = json.loads((out / "slice_labels" / "slice_labels.json").read_text())["cases"]
    assert sorted(record) == sorted(labels) and all("final" in row for rows in record.values() for row in rows)
    prompted = json.loads((out / "sam" / "cases.json").read_text())["labelled"]
    scores = {}
    for case, label in labels.items():
        truth = np.asarray(nib.load(str(label)).dataobj) > 0  # read only here, after the pipeline, to report
        for stage in ("cam", "sam"):
            mask = np.asarray(nib.load(str(out / stage / "masks" / f"{case}.nii.gz")).dataobj) > 0
            assert mask.shape == truth.shape
            scores[(case, stage)] = clisc.dice(mask, truth)
        assert len(list((out / "sam" / "emb_cache").glob(f"{case}.litemedsam.*.pt"))) == (case in prompted)
    print("Dice vs phantom ground truth:", {f"{c}/{s}": round(d, 3) for (c, s), d in scores.items()})
    assert prompted and np.mean([d for (c, s), d in scores.items() if s == "sam"]) > 0.1
    rows = (out / "s3f" / "s3f_scores.csv").read_text().splitlines()
    kept = (out / "s3f" / "kept.txt").read_text().split()
    assert rows[0] == "case,score,status" and len(rows) == 1 + len(labels)
    assert kept == [rows[1].split(",")[0]] and rows[1].endswith(",kept")  # floor(0.8 x 2) = 1: the best score
    assert json.loads((out / "s3f" / "round2" / "history.json").read_text())["cases"] == kept
    assert json.loads((out / "unet" / "round1" / "history.json").read_text())["cases"] == prompted
    for case, label in labels.items():
        shape = nib.load(str(label)).shape
        for masks in ("unet/round1/masks", "s3f/round2/masks"):
            assert nib.load(str(out / masks / f"{case}.nii.gz")).shape == shape


def test_second_invocation_skips_and_one_stage_reruns_alone(unlabelled_run, capsys):
    raw, out, _ = unlabelled_run
    before = digests(out)
    manifests = {s: (out / s / "manifest.json").read_text() for s in clisc.STAGES}
    capsys.readouterr()
    assert clisc.main([str(raw), str(out), *FAST]) == 0
    assert capsys.readouterr().out.count("done before, skipped") == len(clisc.STAGES) == 5
    assert manifests == {s: (out / s / "manifest.json").read_text() for s in clisc.STAGES}
    assert clisc.main([str(raw), str(out), "--rerun", "sam", *FAST]) == 0  # embeddings from the cache
    log = capsys.readouterr().out  # the stages reading sam run again, with the same results (seeded)
    assert all(f"stage {s}: done" in log for s in ("sam", "unet", "s3f")) and log.count("skipped") == 2
    assert digests(out) == before
    assert clisc.main([str(raw), str(out), *FAST, "s3f:--keep_ratio=1"]) == 0  # a changed option reruns its stage
    log = capsys.readouterr().out
    assert "stage s3f: done" in log and log.count("skipped") == 4
    assert len((out / "s3f" / "kept.txt").read_text().split()) == 2
    assert clisc.main([str(raw), str(out), *FAST]) == 0  # back to the defaults for the other tests
    assert digests(out) == before


def test_labels_present_or_absent_give_the_same_outputs(unlabelled_run, tmp_path):
    """The same chain with the label files back: every output is byte-identical. The encoder's embeddings are
    copied from the label-free run's cache (computed there without any label file), to keep the test short."""
    raw, out, labels = unlabelled_run
    labelled = tmp_path / "raw"
    shutil.copytree(raw, labelled)
    for case, label in labels.items():
        shutil.copy(label, labelled / case / label.name)
    shutil.copytree(out / "sam" / "emb_cache", tmp_path / "out" / "sam" / "emb_cache")
    assert clisc.main([str(labelled), str(tmp_path / "out"), *FAST]) == 0
    assert digests(tmp_path / "out") == digests(out)


# ---- the report -----------------------------------------------------------------------------------------------------

def nifti(path, array, spacing=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))
    return path


def test_report_scores_cubes_in_mm_and_empty_predictions(tmp_path):
    """Truth: a 6^3 cube; CAM: the cube shifted one voxel along x (2.5 mm): Dice 2*180/432 = 5/6, and the far faces lie
    one x-step from the other cube's border while no border distance exceeds it, so HD95 = 2.5 mm. SAM: the truth
    itself for case a, nothing for case b (Dice 0, HD95 NaN, counted)."""
    spacing = (2.5, 1.0, 1.0)
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[2:8, 2:8, 2:8] = 2  # a BraTS label value: WT = label > 0
    out = tmp_path / "out"
    labels = {c: nifti(tmp_path / "labels" / f"{c}.nii.gz", truth, spacing) for c in ("a", "b")}
    for case in ("a", "b"):
        nifti(out / "cam" / "masks" / f"{case}.nii.gz", np.roll(truth > 0, 1, axis=0), spacing)
        nifti(out / "sam" / "masks" / f"{case}.nii.gz", (truth > 0) & (case == "a"), spacing)
    write_manifest(out / "cam", ["masks/a.nii.gz", "masks/b.nii.gz"], {"wall_s": 1.5})
    write_manifest(out / "sam", ["masks/a.nii.gz", "masks/b.nii.gz"], {"wall_s": 2.0})
    rows = {(r["case"], r["stage"]): r for r in clisc.write_report(out, labels)}
    assert set(rows) == {(c, s) for c in "ab" for s in ("CAM", "SAM")}  # unet, s3f not run: no rows
    assert rows["a", "CAM"]["Dice"] == pytest.approx(5 / 6) and rows["a", "CAM"]["HD95"] == pytest.approx(2.5)
    assert rows["a", "SAM"]["Dice"] == 1.0 and rows["a", "SAM"]["HD95"] == 0.0 and rows["a", "SAM"]["empty"] == 0
    assert rows["b", "SAM"]["Dice"] == 0.0 and np.isnan(rows["b", "SAM"]["HD95"]) and rows["b", "SAM"]["empty"] == 1
    csv = (out / "metrics.csv").read_text().splitlines()
    assert csv[0] == "case,stage,Dice,HD95,empty" and "b,SAM,0.0,nan,1" in csv and len(csv) == 5
    timings = json.loads((out / "timings.json").read_text())
    assert timings["stages_s"] == {"cam": 1.5, "sam": 2.0} and timings["total_s"] == 3.5
    with pytest.raises(clisc.DataError, match="no finished CLISC stage"):
        clisc.write_report(tmp_path / "nothing", labels)


def test_report_command_reads_the_labels_after_the_chain(unlabelled_run, tmp_path, capsys):
    raw, out, labels = unlabelled_run
    labelled = tmp_path / "raw"
    shutil.copytree(raw, labelled)
    for case, label in labels.items():
        shutil.copy(label, labelled / case / label.name)
    assert clisc.main([str(labelled), str(out), "--report"]) == 0
    assert "UNet+S3F: mean Dice" in capsys.readouterr().out
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert sorted((r.split(",")[0], r.split(",")[1]) for r in rows) == sorted(
        (c, s) for c in labels for s in ("CAM", "SAM", "UNet", "UNet+S3F"))
    assert set(json.loads((out / "timings.json").read_text())["stages_s"]) == set(clisc.STAGES)
    assert clisc.main([str(raw), str(out), "--report"]) == 2  # the label-free folder: the missing label is named
    assert "_seg.nii.gz" in capsys.readouterr().err
    assert clisc.main([str(labelled), str(out), "--report", "unet:--epochs=1"]) == 2
    assert "--report scores a finished run" in capsys.readouterr().err


def test_bad_input_is_one_sentence(tmp_path, capsys):
    assert clisc.main([str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'absent'} not found" in capsys.readouterr().err
    raw = make_brats(tmp_path / "raw", n_cases=1, shape=(16, 16, 8))
    assert clisc.main([str(raw), str(tmp_path / "out"), "cam:--depht=18"]) == 2
    assert "cam:--depht=18" in capsys.readouterr().err
    flair = next(raw.rglob("*_flair.nii.gz"))
    flair.unlink()
    assert clisc.main([str(raw), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{flair} not found" in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


# ---- stage 0's CLIP backend -------------------------------------------------------------------------------------------

def test_clip_labeller_rows_follow_the_certainty_rule(monkeypatch):
    """p per slice from CLIP (stubbed to chosen values): certain iff max(p, 1 - p) >= 0.6, raw = argmax (1 iff
    p > 0.5), and the vote runs over the certain slices only."""
    import lightning_modules.nets.clip_vit as clip_vit

    p = torch.tensor([0.1, 0.55, 0.9, 0.4, 0.6, 0.45])
    monkeypatch.setattr(clip_vit, "tumour_probability", lambda model, slices, text, mode, batch: p[:len(slices)])
    rows = clisc.label_case(np.zeros((6, 8, 8), np.float32), clisc.SliceLabelOptions(labeller="clip",
                                                                                  clip_checkpoint="unused"),
                            clip=(None, None, "minmax", 64))
    assert [r["certain"] for r in rows] == [True, False, True, False, True, False]
    assert [r["raw"] for r in rows] == [0, None, 1, None, 1, None]
    assert [r["final"] for r in rows] == [0, None, 1, None, 1, None]  # 2 voters < 9: labels kept


def test_clip_labeller_options_are_checked():
    with pytest.raises(ConfigError, match="clip_checkpoint"):
        clisc.SliceLabelOptions(labeller="clip")
    with pytest.raises(ConfigError, match="labeller=cnn"):
        clisc.SliceLabelOptions(labeller="cnn")
    with pytest.raises(ConfigError, match="clip_input=rgb"):
        clisc.SliceLabelOptions(labeller="clip", clip_checkpoint="x", clip_input="rgb")


def test_chain_stage0_with_a_tiny_clip_checkpoint(tmp_path):
    """slice_labels with labeller clip: a tiny random CLIP (written here) and a tiny BPE file give one row per slice
    of every case, p in [0, 1], the labeller recorded."""
    from tests.test_clip_vit import random_state, tiny_vocab

    raw = flair_phantom(tmp_path / "raw")
    torch.save(random_state(), tmp_path / "tiny_clip.pt")
    args = [str(raw), str(tmp_path / "out"), "--until", "slice_labels", "slice_labels:--labeller=clip",
            f"slice_labels:--clip_checkpoint={tmp_path / 'tiny_clip.pt'}",
            f"slice_labels:--clip_vocab={tiny_vocab(tmp_path)}"]
    assert clisc.main(args) == 0
    record = json.loads((tmp_path / "out" / "slice_labels" / "slice_labels.json").read_text())
    assert record["labeller"] == "clip" and len(record["cases"]) == 2
    for case, rows in record["cases"].items():
        assert len(rows) == clisc.read_flair(clisc.find_flair(raw)[case]).volume.shape[0]
        assert all(0 <= r["p"] <= 1 and r["certain"] == (max(r["p"], 1 - r["p"]) >= 0.6) for r in rows)


# ---- stage 2's sam_vit_b backend ---------------------------------------------------------------------------------------

def test_sam_options_defaults_and_refusals():
    assert clisc.SamOptions().prompt == "box"
    assert clisc.SamOptions(backend="sam_vit_b", checkpoint="x").prompt == "box+points"
    with pytest.raises(ConfigError, match="checkpoint"):
        clisc.SamOptions(backend="sam_vit_b")
    with pytest.raises(ConfigError, match="box only"):
        clisc.SamOptions(prompt="box+points")
    with pytest.raises(ConfigError, match="backend=sam_h"):
        clisc.SamOptions(backend="sam_h")


def test_sam_vit_b_backend_prompts_with_points_and_caches_by_checkpoint(tmp_path, monkeypatch):
    """A tiny random SAM ViT-B (the real loader, tiny sizes) as stage 2's backend: one mask a prompted slice, the
    code's 9 points passed with each box, embeddings cached under the backend and the file's digest, and a cached
    rerun gives the same mask."""
    from lightning_modules.nets import sam_vit_b
    from lightning_modules.nets.lite_medsam import file_sha256
    from tests.test_sam_vit_b import TINY, tiny_net

    path = tmp_path / "sam_tiny.pth"
    torch.save(tiny_net().state_dict(), path)
    real_loader, real_segment, seen = sam_vit_b.load_sam_vit_b, sam_vit_b.segment, []
    monkeypatch.setattr(sam_vit_b, "load_sam_vit_b", lambda p, device="cpu": real_loader(p, device, **TINY))

    def spy(net, images, boxes, points, batch_size, embeddings=None):
        seen.append(points)
        return real_segment(net, images, boxes, points, batch_size, embeddings=embeddings)

    monkeypatch.setattr(sam_vit_b, "segment", spy)
    sam = clisc.load_sam(clisc.SamOptions(backend="sam_vit_b", checkpoint=str(path), encoder_batch=2))
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(4, 24, 20)).astype(np.float32)
    flair = clisc.Flair(volume, (slice(None),) * 3, volume.shape, np.eye(4))
    prior = np.zeros(volume.shape, bool)
    prior[1:3, 8:14, 6:12] = True
    mask, boxes = clisc.sam_case(sam, tmp_path / "cache", "c1", flair, prior, margin=2)
    assert mask.shape == volume.shape and not mask[[0, 3]].any() and sorted(boxes) == [1, 2]
    assert boxes[1] == [4, 6, 13, 15]  # cols 6..11, rows 8..13, dilated by 2
    assert all(len(p) == 2 and p[0][0].shape == (9, 2) and list(p[0][1]) == [1] * 5 + [0] * 4 for p in seen)
    (cached,) = (tmp_path / "cache").glob("c1.sam_vit_b.*.pt")
    assert cached.name == f"c1.sam_vit_b.{file_sha256(path)[:16]}.pt"
    again, _ = clisc.sam_case(sam, tmp_path / "cache", "c1", flair, prior, margin=2)
    assert np.array_equal(mask, again)
