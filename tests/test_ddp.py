"""2-process DDP on CPU (gloo): identical teachers on every rank; validation equals a single-process evaluation."""
import csv
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import REPO
from tests.test_experiments import phantom_args

pytestmark = pytest.mark.slow


class SaveTeacherPerRank(L.Callback):
    """Writes each rank's full teacher state (parameters and buffers) at the end of training."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_end(self, trainer, pl_module):
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.teacher.state_dict(), self.folder / f"teacher_rank{trainer.global_rank}.pt")


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return sorted(({k: v for k, v in r.items() if k != "step"} for r in csv.DictReader(f)),
                      key=lambda r: (r["case"], r["class"]))


@pytest.mark.parametrize("method,extra", [("mean_teacher", []),
                                          # double EMA also averages BN statistics; training-sample pictures
                                          ("sgrs", ["--trainer.callbacks+=callbacks.image_logger.ImageLogger",
                                                    "--trainer.callbacks.every_n_train_steps=1"])])
def test_ddp_teacher_methods_two_ranks(method, extra, acdc_phantom, la_phantom, tmp_path):
    # 3 validation cases on 2 ranks: the distributed sampler pads one, which must be de-duplicated.
    cases = (acdc_phantom / "val.list").read_text().split() + (acdc_phantom / "test.list").read_text().split()[:1]
    (acdc_phantom / "odd.list").write_text("\n".join(cases) + "\n")
    config = REPO / "experiments" / "acdc" / f"{method}.yaml"
    if method == "sgrs":
        cfg = yaml.safe_load(config.read_text())
        next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EMATeacher"))["init_args"] = {
            "mode": "double"}
        config = tmp_path / "sgrs_double.yaml"
        config.write_text(yaml.safe_dump(cfg))
    odd = ["--data.init_args.val_list=odd.list", *extra]
    args = phantom_args(config, acdc_phantom, la_phantom, tmp_path) + odd + [
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.devices=2",
        "--trainer.strategy=ddp", "--trainer.callbacks+=tests.test_ddp.SaveTeacherPerRank",
        f"--trainer.callbacks.folder={tmp_path / 'teachers'}"]
    done = subprocess.run([sys.executable, "-m", "experiments", "fit", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    t0, t1 = (torch.load(tmp_path / "teachers" / f"teacher_rank{r}.pt") for r in (0, 1))
    assert t0.keys() == t1.keys()
    for key in t0:
        assert torch.equal(t0[key], t1[key]), key  # bit-identical, buffers included

    (run,) = [p.parent for p in tmp_path.rglob("per_case_val.csv")]
    assert list(tmp_path.glob("*/version_*")) == [run]  # rank 1 claimed no directory of its own
    if method == "sgrs":  # rank 0 drew the training sample at every step without leaving rank 1 waiting
        drawn = sorted(p.name for p in (run / "images").glob("train_step*.png"))
        assert drawn == [f"train_step{i}.png" for i in (1, 2, 3)]
    ckpt = run / "checkpoints" / "last.ckpt"
    single = subprocess.run([sys.executable, "-m", "experiments", "validate",
                             *phantom_args(config, acdc_phantom, la_phantom, tmp_path / "single"), *odd,
                             f"--ckpt_path={ckpt}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    (single_csv,) = (tmp_path / "single").rglob("per_case_val.csv")
    ddp_rows, single_rows = rows(run / "per_case_val.csv"), rows(single_csv)
    assert len(ddp_rows) == len(single_rows) == 3 * len(cases)
    assert ddp_rows == single_rows
