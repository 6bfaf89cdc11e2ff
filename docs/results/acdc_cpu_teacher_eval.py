"""Diagnostic for acdc_cpu.md revision 4: score a Mean Teacher run's teacher (its EMA weights) on val.list, the
same way the run scored its student (eval mode, the run's own config), from the run's last.ckpt.

    python docs/results/acdc_cpu_teacher_eval.py RUN_DIR [RUN_DIR ...]   # RUN_DIR = .../labeled3_seed1/version_0

The teacher's weights replace the student's in a copy of the checkpoint (the teacher's BatchNorm statistics are
its own, from its train-mode forwards on noisy unlabeled batches), then `lemis validate` scores it; prints the
student's and the teacher's mean Dice (%) from the two per_case_val.csv files.
"""
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def mean_dice(per_case: Path, step: str | None = None) -> float:
    rows = [r for r in csv.DictReader(per_case.open()) if step is None or r.get("step") == step]
    last = max(int(r["step"]) for r in rows) if step is None else int(step)
    values = [float(r["dice"]) for r in rows if int(r["step"]) == last and r["class"] != "mean"]
    return 100 * sum(values) / len(values)


def teacher_checkpoint(run: Path, out: Path) -> Path:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    for key in [k for k in state if k.startswith("net.")]:
        state[key] = state["teacher." + key[len("net."):]].clone()
    path = out / "teacher.ckpt"
    torch.save(ckpt, path)
    return path


def main(runs: list[str]) -> None:
    for run in map(Path, runs):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = teacher_checkpoint(run, Path(tmp))
            subprocess.run([sys.executable, "-m", "experiments", "validate", "--config", str(run / "config.yaml"),
                            "--ckpt_path", str(ckpt), f"--trainer.logger.init_args.save_dir={tmp}",
                            "--trainer.logger.init_args.name=teacher", "--trainer.enable_progress_bar=false"],
                           check=True, capture_output=True)
            (teacher,) = Path(tmp).glob("teacher/version_*/per_case_val.csv")
            print(f"{run}: student {mean_dice(run / 'per_case_val.csv'):.1f}  teacher {mean_dice(teacher):.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
