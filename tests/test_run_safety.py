"""Bad input and everyday mistakes (issue "Trust"): one sentence naming the path or option, exit 2, nothing
written and no earlier file changed; checkpoints, run directories, file modes and step numbers that agree."""
import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from datamodules.budget import budget_count
from experiments.__main__ import main
from experiments.cli import LemisCLI
from lemis.errors import ConfigError
from tests.conftest import REPO
from tests.test_experiments import phantom_args

MT = REPO / "experiments" / "acdc" / "mean_teacher.yaml"


def snapshot(root: Path) -> dict:
    """Every file and folder under ``root``: content hash and mode (folders: None)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mode) \
            if p.is_file() else None
    return out


def refused(capsys, args: list[str], *needles: str) -> str:
    """Runs the CLI; asserts exit 2 with exactly one `lemis: error:` sentence holding every needle, and no
    traceback. Returns the sentence."""
    code = main(args)
    err = capsys.readouterr().err
    sentences = [line for line in err.splitlines() if line.startswith("lemis: error: ")]
    assert code == 2, err[-2000:]
    assert len(sentences) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in sentences[0], sentences[0]
    return sentences[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, acdc_phantom, la_phantom):
    """A finished 2-step Mean Teacher run in ``runs/``: the earlier files every refusal must leave alone."""
    runs = tmp_path_factory.mktemp("runs")
    args = phantom_args(MT, acdc_phantom, la_phantom, runs) + ["--trainer.log_every_n_steps=1"]
    assert main(["fit", *args]) == 0
    ckpt = runs / "acdc_mean_teacher" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return {"runs": runs, "args": args, "ckpt": ckpt}


@pytest.fixture
def untouched(finished):
    """Asserts, after the test, that nothing under the finished run's folder changed or appeared."""
    before = snapshot(finished["runs"])
    yield finished
    assert snapshot(finished["runs"]) == before


def phantom_copy(acdc_phantom: Path, tmp_path: Path) -> Path:
    root = tmp_path / "acdc"
    shutil.copytree(acdc_phantom, root)
    return root


# ---- checkpoints ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["fit", "validate", "predict"])
@pytest.mark.parametrize("kind", ["missing", "truncated", "text"])
def test_bad_checkpoint_is_one_sentence_naming_it(command, kind, untouched, tmp_path, capsys):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(untouched["ckpt"].read_bytes()[:50000])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    refused(capsys, [command, *untouched["args"], f"--ckpt_path={path}"], str(path))


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluation_needs_a_checkpoint_or_the_opt_in(command, untouched, acdc_phantom, la_phantom, tmp_path,
                                                     capsys):
    refused(capsys, [command, *untouched["args"]], "--ckpt_path", "--allow_untrained")
    args = phantom_args(MT, acdc_phantom, la_phantom, tmp_path)
    assert main([command, *args, "--allow_untrained=true"]) == 0


def test_command_line_evaluation_options_win_over_the_checkpoint(finished, acdc_phantom, la_phantom, tmp_path):
    """sw_batch_size and empty_convention from the command line, the net from the checkpoint (the config asks
    for another decoder, whose weights would not load), and config.yaml records both."""
    args = phantom_args(MT, acdc_phantom, la_phantom, tmp_path)
    cli = LemisCLI(args=["validate", *args, f"--ckpt_path={finished['ckpt']}", "--model.init_args.sw_batch_size=3",
                         "--model.init_args.empty_convention=legacy_zero",
                         "--model.init_args.net.init_args.upsample=deconv"])
    assert cli.model.hparams.sw_batch_size == 3 and cli.model.hparams.empty_convention == "legacy_zero"
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["init_args"]["sw_batch_size"] == 3
    assert saved["model"]["init_args"]["empty_convention"] == "legacy_zero"
    assert saved["model"]["init_args"]["net"]["init_args"]["upsample"] == "bilinear"
    assert saved["ckpt_path"] == str(finished["ckpt"])


def test_a_run_s_config_yaml_serves_every_subcommand(finished, tmp_path, capsys):
    """The config.yaml a fit wrote is a valid --config for validate (it records fit's flags too), and a flag set
    where it means nothing is one sentence."""
    saved = finished["runs"] / "acdc_mean_teacher" / "version_0" / "config.yaml"
    logger = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.name=again"]
    assert main(["validate", "--config", str(saved), f"--ckpt_path={finished['ckpt']}", *logger]) == 0
    (run,) = (tmp_path / "again").glob("version_*")
    assert (run / "per_case_val.csv").is_file()
    refused(capsys, ["validate", "--config", str(saved), f"--ckpt_path={finished['ckpt']}", *logger,
                     "--allow_config_change=true"], "--allow_config_change", "lemis validate")
    refused(capsys, ["fit", "--config", str(saved), *logger, "--allow_untrained=true"], "--allow_untrained")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [run.name]  # the refusals wrote nothing


def test_evaluating_another_method_s_checkpoint_is_refused(untouched, capsys):
    sgrs = REPO / "experiments" / "acdc" / "sgrs.yaml"
    args = [a if not a.startswith("--config") and a != str(MT) else a for a in untouched["args"]]
    args[args.index(str(MT))] = str(sgrs)
    refused(capsys, ["validate", *args, f"--ckpt_path={untouched['ckpt']}"], "MeanTeacher", "model.class_path")


def test_resume_under_another_configuration_is_refused(untouched, capsys):
    sentence = refused(capsys, ["fit", *untouched["args"], "--ckpt_path=last",
                                "--model.init_args.optimizer.init_args.lr=0.02", "--data.init_args.labeled=3"],
                       str(untouched["ckpt"]), "model.init_args.optimizer.init_args.lr: 0.01 -> 0.02",
                       "data.init_args.labeled: 2 -> 3", "--allow_config_change=true")
    assert "num_workers" not in sentence


def test_resume_override_and_unchanged_configuration(finished, capsys):
    """The same configuration resumes (loader workers may change); --allow_config_change continues it."""
    runs, args = finished["runs"], finished["args"]
    assert main(["fit", *args, "--ckpt_path=last", "--trainer.max_steps=3"]) == 2
    assert main(["fit", *args, "--ckpt_path=last", "--trainer.max_steps=3", "--allow_config_change=true"]) == 0
    resumed = max((runs / "acdc_mean_teacher").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3
    assert state["lemis_config"]["trainer"]["max_steps"] == 3


# ---- run directories -------------------------------------------------------------------------------------------

def test_explicit_version_that_exists_is_refused(untouched, capsys):
    run = untouched["runs"] / "acdc_mean_teacher" / "version_0"
    refused(capsys, ["fit", *untouched["args"], "--trainer.logger.init_args.version=0"], str(run),
            "trainer.logger.init_args.version")


def _default_sigint() -> None:
    """In the child before exec: a shell without job control (CI, nohup, `cmd &`) starts background commands
    with SIGINT ignored, the child inherits that, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fit_process(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments", "fit", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_default_sigint)


def test_two_runs_started_together_get_their_own_directories(acdc_phantom, la_phantom, tmp_path):
    args = phantom_args(MT, acdc_phantom, la_phantom, tmp_path) + ["--trainer.log_every_n_steps=1"]
    runs = [_fit_process(args), _fit_process(args)]
    for run in runs:
        out = run.communicate(timeout=600)[0]
        assert run.returncode == 0, out[-2000:]
    versions = sorted(p.name for p in (tmp_path / "acdc_mean_teacher").iterdir())
    assert versions == ["version_0", "version_1"]
    for version in versions:
        run = tmp_path / "acdc_mean_teacher" / version
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "per_case_val.csv").is_file()
        steps = [row["step"] for row in csv.DictReader(open(run / "metrics.csv"))]
        assert steps == ["1", "2", "2"]  # one run's rows only: two training steps and one validation


def test_two_runs_into_one_explicit_version_one_is_refused(acdc_phantom, la_phantom, tmp_path):
    args = phantom_args(MT, acdc_phantom, la_phantom, tmp_path) + ["--trainer.logger.init_args.version=7"]
    runs = [_fit_process(args), _fit_process(args)]
    outs = [run.communicate(timeout=600)[0] for run in runs]
    assert sorted(run.returncode for run in runs) == [0, 2], outs
    assert any("run directory" in out and "exists already" in out for out in outs)
    assert [p.name for p in (tmp_path / "acdc_mean_teacher").iterdir()] == ["version_7"]


@pytest.mark.parametrize("override,needle", [
    ("--data.init_args.root=/no/such/dir", "/no/such/dir"),
    ("--data.init_args.labeled=99", "data.init_args.labeled=99"),
    ("--model.init_args.num_classes=3", "model.init_args.num_classes=3"),
    ("--data.init_args.labeled_batch_size=null", "needs an unlabeled stream"),
    ("--model.init_args.optimizer.init_args.lr=-1", "Invalid learning rate: -1"),
])
def test_failed_start_leaves_no_run_directory(override, needle, acdc_phantom, la_phantom, tmp_path, capsys):
    args = phantom_args(MT, acdc_phantom, la_phantom, tmp_path)
    refused(capsys, ["fit", *args, override], needle)
    assert not list(tmp_path.rglob("version_*"))


def test_result_files_follow_the_umask(finished, acdc_phantom, la_phantom, tmp_path):
    old = os.umask(0o022)
    try:
        args = phantom_args(MT, acdc_phantom, la_phantom, tmp_path)
        assert main(["fit", *args]) == 0
        assert main(["predict", *args, f"--ckpt_path={finished['ckpt']}"]) == 0
    finally:
        os.umask(old)
    written = [p for pattern in ("per_case_*.csv", "images/*.png", "predictions/*.h5", "metrics.csv", "config.yaml")
               for p in tmp_path.rglob(pattern)]
    assert {p.suffix for p in written} == {".csv", ".png", ".h5", ".yaml"}
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}


def test_step_numbers_agree_across_files(finished):
    """Step N = the N-th optimizer step: its losses and LR, the validation after it, its PNG and checkpoint."""
    run = finished["ckpt"].parent.parent
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    train = [r for r in rows if r.get("loss/total")]
    val = [r for r in rows if r.get("val/dice/mean")]
    assert [r["step"] for r in train] == ["1", "2"] and all(float(r["lr"]) > 0 for r in train)
    assert [r["step"] for r in val] == ["2"]
    assert {r["step"] for r in csv.DictReader(open(run / "per_case_val.csv"))} == {"2"}
    assert [p.name for p in (run / "images").glob("val_step*.png")] == ["val_step2.png"]
    assert torch.load(finished["ckpt"], weights_only=False)["global_step"] == 2


def checkpoint_every_step(tmp_path: Path) -> Path:
    """The Mean Teacher config with last.ckpt written after every step."""
    cfg = yaml.safe_load(MT.read_text())
    for callback in cfg["trainer"]["callbacks"]:
        if callback.get("init_args", {}).get("save_last"):
            callback["init_args"]["every_n_train_steps"] = 1
    config = tmp_path / "every_step.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def test_checkpoint_saves_do_not_parse_the_config(acdc_phantom, la_phantom, tmp_path, monkeypatch):
    """The config is resolved once per run, not in every save: a Ctrl-C inside jsonargparse's dump surfaces as
    its ValueError (exit 1), so training must not run it."""
    import experiments.cli as cli

    calls = []
    resolve = cli.config_as_dict
    monkeypatch.setattr(cli, "config_as_dict", lambda *a: calls.append(1) or resolve(*a))
    args = phantom_args(checkpoint_every_step(tmp_path), acdc_phantom, la_phantom, tmp_path)
    assert main(["fit", *args, "--trainer.max_steps=3"]) == 0
    state = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    assert state["global_step"] == 3 and state["lemis_config"]["trainer"]["max_steps"] == 3
    assert len(calls) == 1


def test_interrupt_says_where_the_last_checkpoint_is(acdc_phantom, la_phantom, tmp_path):
    config = checkpoint_every_step(tmp_path)
    args = phantom_args(config, acdc_phantom, la_phantom, tmp_path) + ["--trainer.max_steps=100000",
                                                                       "--trainer.val_check_interval=100000"]
    run = _fit_process(args)
    try:
        deadline = time.monotonic() + 600  # a bound on the wait, not a measurement
        while not list(tmp_path.rglob("last.ckpt")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        run.send_signal(signal.SIGINT)
        out = run.communicate(timeout=300)[0]
    finally:
        run.kill()
    lines = [line for line in out.splitlines() if line.startswith("lemis: interrupted")]
    assert run.returncode == 130, out[-2000:]
    assert len(lines) == 1 and "Traceback" not in out and "Detected KeyboardInterrupt" not in out
    assert "last checkpoint is " + str(next(tmp_path.rglob("last.ckpt"))) in lines[0]
    assert lines[0].rstrip().endswith("--ckpt_path last")


# ---- bad input found at setup ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override,needle", [
    ("--model.init_args.num_classes=3", "model.init_args.num_classes=3 but data.init_args.num_classes=4"),
    ("--model.init_args.net.init_args.num_classes=3", "outputs 3 channels but model.init_args.num_classes=4"),
    ("--model.init_args.net.init_args.in_channels=2", "model.init_args.net"),
    ("--model.init_args.optimizer.init_args.lr=-1", "model.init_args.optimizer / lr_scheduler: Invalid learning rate"),
    ("--model.init_args.optimizer.init_args.momentum=-0.5", "Invalid momentum value: -0.5"),
    ("--trainer.max_steps=-1", "Poly needs total_steps > 0"),
    ("--model.init_args.init_weights.path=/no/such/weights.pt", "/no/such/weights.pt not found"),
    ("--data.init_args.labeled=2.5", "data.init_args.labeled=2.5"),
    ("--trainer.max_step=3", "--trainer.max_step=3"),
])
def test_bad_option_is_one_sentence(override, needle, untouched, capsys):
    refused(capsys, ["fit", *untouched["args"], override], needle)


def test_budget_count_types():
    assert budget_count(7, 70) == 7 and budget_count(0.1, 70) == 7 and budget_count(1.0, 70) == 70
    assert budget_count(None, 70) == 70
    for bad in (2.5, 7.0, 0.0, -0.5, True, "7"):
        with pytest.raises(ConfigError, match="data.init_args.labeled"):
            budget_count(bad, 70)


def test_yaml_syntax_error_names_the_file(untouched, tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text(MT.read_text().replace("max_steps: 30000", "max_steps: [30000"))
    args = [a if a != str(MT) else str(bad) for a in untouched["args"]]
    refused(capsys, ["fit", *args], str(bad), "line")


def _first_volume(root: Path) -> Path:
    return root / "data" / f"{(root / 'val.list').read_text().split()[0]}.h5"


def _rewrite(path: Path, **arrays) -> None:
    with h5py.File(path) as f:
        data = {k: f[k][()] for k in f}
    data.update(arrays)
    path.unlink()
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)


@pytest.mark.parametrize("damage", ["shape", "nan_val", "nan_train"])
def test_bad_case_is_found_at_setup(damage, acdc_phantom, la_phantom, tmp_path, capsys):
    root = phantom_copy(acdc_phantom, tmp_path)
    if damage == "nan_train":
        path = root / "data" / "slices" / f"{(root / 'train_slices.list').read_text().split()[0]}.h5"
    else:
        path = _first_volume(root)
    with h5py.File(path) as f:
        image, label = f["image"][()], f["label"][()]
    if damage == "shape":
        _rewrite(path, label=label[:, :, :-3])
    else:
        image[0, 0] = np.nan
        _rewrite(path, image=image)
    args = phantom_args(MT, root, la_phantom, tmp_path / "runs")
    refused(capsys, ["fit", *args], str(path), "shape" if damage == "shape" else "NaN")
    assert not (tmp_path / "runs").exists()


def test_empty_training_list_is_not_a_budget_error(acdc_phantom, la_phantom, tmp_path, capsys):
    root = phantom_copy(acdc_phantom, tmp_path)
    (root / "train_slices.list").write_text("")
    refused(capsys, ["fit", *phantom_args(MT, root, la_phantom, tmp_path / "runs")], "train_slices.list is empty")


def test_missing_test_volumes_name_the_option_that_selects_another_split(finished, acdc_phantom, la_phantom,
                                                                         tmp_path, capsys):
    root = phantom_copy(acdc_phantom, tmp_path)
    for case in (root / "test.list").read_text().split():
        (root / "data" / f"{case}.h5").unlink()
    args = phantom_args(MT, root, la_phantom, tmp_path / "runs")
    for command, option in (("test", "--data.init_args.test_list"), ("predict", "--data.init_args.predict_list")):
        refused(capsys, [command, *args, f"--ckpt_path={finished['ckpt']}"], option,
                "files named by test.list are missing")
    assert main(["test", *args, f"--ckpt_path={finished['ckpt']}", "--data.init_args.test_list=val.list"]) == 0
