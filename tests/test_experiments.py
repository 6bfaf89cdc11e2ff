"""Every experiment YAML runs a few steps + whole-case validation on phantoms; the CLI's bad-input messages."""
import math
from pathlib import Path

import h5py
import lightning as L
import pytest
import torch
import yaml

from datamodules.phantoms import PHANTOMS, ensure_phantoms
from experiments.__main__ import main
from experiments.cli import LemisCLI
from tests.conftest import REPO

CONFIGS = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if not {"sweeps", "compare"} & set(p.parts))


def phantom_args(config: Path, acdc_root: Path, la_root: Path, out: Path) -> list[str]:
    """Overrides that shrink a published config to seconds on phantoms (DESIGN.md "Tests"): the data options
    from the table beside each phantom (datamodules.phantoms.PHANTOMS), two steps, validation after them."""
    cfg = yaml.safe_load(config.read_text())
    kind, _, size = PHANTOMS[cfg["data"]["class_path"]]
    two_streams = cfg["data"]["init_args"].get("labeled_batch_size") is not None
    roots = {"acdc": acdc_root, "la": la_root}
    root = roots[kind] if kind in roots else ensure_phantoms(kind, out / f"phantom_{kind}")
    args = ["--config", str(config), f"--data.init_args.root={root}",
            *(f"--{k if '.' in k else 'data.init_args.' + k}={v}" for k, v in size.items()
              if k != "labeled_batch_size" or two_streams),
            "--data.init_args.labeled=2", "--data.init_args.num_workers=0", "--trainer.max_steps=2",
            "--trainer.val_check_interval=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={out}"]
    return args


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_experiment_runs_on_phantoms(config, acdc_phantom, la_phantom, tmp_path):
    cli = LemisCLI(args=["fit", *phantom_args(config, acdc_phantom, la_phantom, tmp_path)])
    run = Path(cli.trainer.log_dir)
    summary = cli.model.last_summary["val"]
    assert cli.trainer.global_step == 2
    assert cli.model.roi_size == cli.datamodule.patch_size  # inference ROI follows a patch override
    # a segmentation, classification or ranking score (the last NaN when the phantom's val cases share a grade)
    scores = {k: summary[k] for k in ("dice/mean", "f1", "recall", "rank_accuracy") if k in summary}
    assert scores and summary["n_cases"] >= 1
    assert all(0.0 <= v <= 1.0 for k, v in scores.items() if not (k == "rank_accuracy" and math.isnan(v)))
    assert (run / "per_case_val.csv").is_file() and (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert any((run / "images").glob("*.png")) or "ImageLogger" not in config.read_text()


def test_validate_test_predict_from_checkpoint(acdc_phantom, la_phantom, tmp_path):
    config = REPO / "experiments" / "acdc" / "mean_teacher.yaml"
    args = phantom_args(config, acdc_phantom, la_phantom, tmp_path)
    fit = LemisCLI(args=["fit", *args])
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert any(k.startswith("teacher.") for k in state["state_dict"])
    assert state["callbacks"]["EMATeacher"]["last_step"] == 1
    for command in ("validate", "test", "predict"):
        assert main([command, *args, f"--ckpt_path={ckpt}"]) == 0
    predictions = list(tmp_path.rglob("predictions/*.h5"))
    cases = (acdc_phantom / "test.list").read_text().split()
    assert sorted(p.stem for p in predictions) == sorted(cases)
    with h5py.File(predictions[0]) as f, h5py.File(acdc_phantom / "data" / f"{predictions[0].stem}.h5") as g:
        assert f["prediction"].shape == g["label"].shape


def test_teacher_equals_student_after_first_step(acdc_phantom, la_phantom, tmp_path):
    """alpha_0 = 0: after optimizer step 0 the EMA teacher is an exact copy of the student."""
    config = REPO / "experiments" / "acdc" / "mean_teacher.yaml"
    args = phantom_args(config, acdc_phantom, la_phantom, tmp_path) + ["--trainer.max_steps=1",
                                                                       "--trainer.val_check_interval=1"]
    cli = LemisCLI(args=["fit", *args])
    for t, s in zip(cli.model.teacher.parameters(), cli.model.net.parameters()):
        torch.testing.assert_close(t, s)
        assert not t.requires_grad


@pytest.mark.parametrize("override,needle", [
    ("--model.init_args.consistncy=0.3", "consistncy"),
    ("--data.init_args.labeled=0", "data.init_args.labeled=0 is impossible"),
    ("--data.init_args.root=/no/such/dir", "data root /no/such/dir does not exist"),
    ("--trainer.no_such_key=1", "no_such_key"),
])
def test_cli_bad_input_is_one_sentence(override, needle, acdc_phantom, la_phantom, tmp_path, capsys):
    config = REPO / "experiments" / "acdc" / "mean_teacher.yaml"
    code = main(["fit", *phantom_args(config, acdc_phantom, la_phantom, tmp_path), override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lemis: error: ") and needle in err[-1]
    assert not any(line.startswith("Traceback") or line.startswith("usage:") for line in err)


def test_mean_teacher_refuses_a_single_stream(acdc_phantom, la_phantom, tmp_path, capsys):
    config = REPO / "experiments" / "acdc" / "mean_teacher.yaml"
    code = main(["fit", *phantom_args(config, acdc_phantom, la_phantom, tmp_path),
                 "--data.init_args.labeled_batch_size=null"])
    assert code == 2 and "needs an unlabeled stream" in capsys.readouterr().err


@pytest.mark.real_data
@pytest.mark.parametrize("config,overrides", [
    ("acdc/mean_teacher.yaml", ["--data.init_args.patch_size=[64, 64]", "--data.init_args.batch_size=4",
                                "--data.init_args.labeled_batch_size=2"]),
    ("la/mean_teacher.yaml", ["--data.init_args.present=present.list", "--data.init_args.labeled=4",
                              "--data.init_args.patch_size=[64, 64, 48]", "--model.init_args.sw_stride=[64, 64, 48]"]),
    ("la/sgrs.yaml", ["--data.init_args.present=present.list", "--data.init_args.labeled=4",
                      "--data.init_args.patch_size=[64, 64, 48]", "--model.init_args.sw_stride=[64, 64, 48]"]),
])
def test_real_data_training_step_and_whole_volume_validation(config, overrides, tmp_path):
    from tests.conftest import real
    root = real(config.split("/")[0].upper())
    args = ["fit", "--config", str(REPO / "experiments" / config), f"--data.init_args.root={root}",
            "--data.init_args.num_workers=0", "--data.init_args.cache=false", "--trainer.max_steps=1",
            "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}", *overrides]
    cli = LemisCLI(args=args)
    rows = (Path(cli.trainer.log_dir) / "per_case_val.csv").read_text().splitlines()
    n_classes = len(cli.datamodule.class_names)
    assert len(rows) == 1 + n_classes  # header + one whole case, one row per foreground class
    assert cli.model.last_summary["val"]["n_cases"] == 1


class _PoisonAt(L.Callback):
    """Fills the input batch of step ``step`` with NaN, so that step's loss (and update) is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["image"].fill_(float("nan"))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(acdc_phantom, la_phantom, tmp_path, capsys):
    config = REPO / "experiments" / "acdc" / "supervised.yaml"
    args = phantom_args(config, acdc_phantom, la_phantom, tmp_path) + [
        "--trainer.max_steps=6", "--trainer.val_check_interval=6",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true",
        "--trainer.callbacks+=tests.test_experiments._PoisonAt", "--trainer.callbacks.step=3"]
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training loss is nan at step 4" in err  # the 4th step, poisoned as it started after 3
    ckpt = next(tmp_path.rglob("last.ckpt"))
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 3 and all(torch.isfinite(v).all() for v in state["state_dict"].values()
                                                  if v.is_floating_point())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_every_experiment_has_the_callbacks_a_run_relies_on(config):
    """RNGState and NonFiniteGuard, exactly one ResumableCheckpoint writing last.ckpt, and the teacher callback
    for every teacher method (contracts.TeacherMethod)."""
    import importlib

    cfg = yaml.safe_load(config.read_text())
    callbacks = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert "callbacks.rng_state.RNGState" in callbacks and "callbacks.guards.NonFiniteGuard" in callbacks
    last = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ResumableCheckpoint")
            and c.get("init_args", {}).get("save_last")]
    assert len(last) == 1
    module_path, name = cfg["model"]["class_path"].rsplit(".", 1)
    model_class = getattr(importlib.import_module(module_path), name)
    if hasattr(model_class, "teacher_alpha"):
        assert "callbacks.ema_teacher.EMATeacher" in callbacks
