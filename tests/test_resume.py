"""A Mean Teacher run SIGKILLed mid-training and resumed ends bit-identical to an uninterrupted run (CPU).

Geometry (ACDC phantom, 2 labeled patients): batches of 2 labeled + 4 unlabeled slices, so an epoch is the labeled
stream's 10 batches and the unlabeled stream (38 slices) cycles every 9; validation after 3, 6, 9 and 12 steps.
Every run writes last.ckpt after every step, under one configuration (a resume refuses another one); the killed
run keeps a copy of the checkpoint after 9 steps and is SIGKILLed as the 11th step starts, so two resumes are
checked against the uninterrupted run:
- after 10 steps, with ``--ckpt_path last``: an epoch boundary, written at the end of a training batch;
- after 9 steps: mid-epoch, written after validation, the unlabeled pass just used up; resumed with two loader
  workers, since batches do not depend on the worker count.
"""
import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

# Not imported from tests.conftest: the killed run imports this module for KillAt, and conftest sets torch's
# thread count, which would change its arithmetic against the other runs'.
REPO = Path(__file__).resolve().parents[1]
STEPS = 12


KILL = "LEMIS_TEST_KILL"  # "<step>:<keep step>:<keep path>"; unset in the runs that are not killed


class KillAt(L.Callback):
    """With $LEMIS_TEST_KILL set: copies last.ckpt to the keep path when the keep step starts, SIGKILLs its own
    process when the kill step starts (no handler runs, nothing is flushed: a kill at a deterministic point, not
    after a sleep). Without it, nothing: every run has this callback, so all share one configuration."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if KILL not in os.environ:
            return
        step, keep_step, keep = os.environ[KILL].split(":", 2)
        if trainer.global_step == int(keep_step):
            shutil.copy(trainer.checkpoint_callback.last_model_path, keep)
        if trainer.global_step == int(step):
            os.kill(os.getpid(), signal.SIGKILL)


def config(tmp_path: Path, experiment: str = "acdc/mean_teacher.yaml") -> Path:
    """An experiment YAML (experiments/acdc/mean_teacher.yaml) with last.ckpt every step and KillAt."""
    cfg = yaml.safe_load((REPO / "experiments" / experiment).read_text())
    for callback in cfg["trainer"]["callbacks"]:
        if callback.get("init_args", {}).get("save_last"):
            callback["init_args"]["every_n_train_steps"] = 1
    cfg["trainer"]["callbacks"].append({"class_path": "tests.test_resume.KillAt"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(cfg: Path, root: Path, out: Path, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
    args = ["--config", str(cfg), f"--data.init_args.root={root}", "--data.init_args.patch_size=[32, 32]",
            "--data.init_args.labeled=2", "--data.init_args.batch_size=6", "--data.init_args.labeled_batch_size=2",
            "--data.init_args.num_workers=0",
            "--model.init_args.optimizer.init_args.lr=0.001",  # keeps validation Dice above 0
            f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1",
            "--trainer.accelerator=cpu", "--trainer.deterministic=true", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={out}", *extra]
    # One thread in every run (the same arithmetic; OpenMP threads spin-waiting on a shared 2-core machine
    # also make each step 40x slower).
    env = {k: v for k, v in os.environ.items() if k != KILL} | {"OMP_NUM_THREADS": "1"} | ({KILL: kill} if kill else {})
    return subprocess.run([sys.executable, "-m", "experiments", "fit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def final(out: Path) -> tuple[dict, list[dict]]:
    """The newest run under ``out``: its last checkpoint and its metrics.csv rows."""
    run = max(out.glob("*/version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(run / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False), rows


def loader_positions(checkpoint: dict) -> list[tuple[int, int, int]]:
    states = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return [(s["epoch"], s["cycle"], s["batches"]) for s in states]


def identical(a, b) -> bool:
    """Bit-for-bit equality of nested checkpoint entries (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(identical, a, b))
    return a == b


def assert_same_end(resumed: tuple[dict, list[dict]], whole: tuple[dict, list[dict]], start: int,
                    callbacks: tuple[str, ...] = ("EMATeacher", "RNGState")) -> None:
    """The resumed run started after ``start`` steps (not from scratch, which would also end equal) and ended
    equal to the uninterrupted run."""
    (a, a_rows), (b, b_rows) = resumed, whole
    assert int(a_rows[0]["step"]) == start + 1  # its first row is the (start + 1)-th step
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in b["state_dict"]:  # student, teacher, BatchNorm buffers
        assert identical(a["state_dict"][key], b["state_dict"][key]), key
    assert identical(a["optimizer_states"], b["optimizer_states"])  # momentum buffers and LR
    assert identical(a["lr_schedulers"], b["lr_schedulers"])
    for callback in callbacks:
        assert identical(a["callbacks"][callback], b["callbacks"][callback]), callback
    # Every row the resumed run logged (losses, consistency weight, LR, validation Dice) equals the uninterrupted
    # run's row for that step.
    assert a_rows == [row for row in b_rows if int(row["step"]) > start]
    assert float(a_rows[-1]["val/dice/mean"]) > 0


def test_sigkill_then_resume_equals_uninterrupted(acdc_phantom, tmp_path):
    cfg = config(tmp_path)
    whole = fit(cfg, acdc_phantom, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = fit(cfg, acdc_phantom, tmp_path / "runs", kill=f"10:9:{tmp_path / 'step9.ckpt'}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    at_kill = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=False)
    kept = torch.load(tmp_path / "step9.ckpt", weights_only=False)
    assert at_kill["global_step"] == 10 and kept["global_step"] == 9
    # (epoch, pass, batches) of the labeled and unlabeled streams
    assert loader_positions(at_kill) == [(0, 0, 10), (0, 1, 1)]  # the epoch's last batch
    assert loader_positions(kept) == [(0, 0, 9), (0, 0, 9)]  # mid-epoch, the unlabeled pass used up

    resumed = fit(cfg, acdc_phantom, tmp_path / "runs", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_end(final(tmp_path / "runs"), final(tmp_path / "whole"), start=10)

    mid_epoch = fit(cfg, acdc_phantom, tmp_path / "from9",
                    f"--ckpt_path={tmp_path / 'step9.ckpt'}", "--data.init_args.num_workers=2")
    assert mid_epoch.returncode == 0, mid_epoch.stderr[-3000:]
    assert_same_end(final(tmp_path / "from9"), final(tmp_path / "whole"), start=9)
