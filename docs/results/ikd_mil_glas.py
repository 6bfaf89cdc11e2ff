"""The IKD-MIL CPU check of docs/results/ikd_mil_glas.md: per seed, one run of experiments/glas/ikd_mil_cpu.yaml on
GlaS-half, then testA scores of the MIL teacher, the distilled student and the student after one role reversal.

    python docs/results/ikd_mil_glas.py [--seeds 1 2] [--out runs/ikd_mil_glas]   # runs what is missing, then reports

A run is fitted in two legs of one schedule: up to the stage switch (``stage1_epochs``), whose last checkpoint holds
the MIL teacher in its ``teacher`` slot (kept as ``mil_teacher.ckpt``), then resumed (bit-exact) to the end. Weights
scored on testA by ``lemis test`` (the run's own config; each set copied into ``net`` of a checkpoint copy):
- MIL teacher: the best stage-1 weights by validation F1 (the teacher of the switch);
- distilled student: the best student by validation F1 before the reversal (the teacher of the final checkpoint:
  ``teacher_from: best``);
- after reversal (best): RoleReversal's best-student record in the final checkpoint, the best student by validation
  F1 over all of stage 2 (the record is not reset at a reversal, so it may be the pre-reversal student);
- after reversal (last): the student's last weights.
Writes ``<out>/scores.csv`` (seed, weights, f1, iou, dice_pixel, hd_cv) and ``<out>/curves.png`` (validation F1 per
epoch), and prints the table with paired differences per seed.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

CONFIG = Path("experiments/glas/ikd_mil_cpu.yaml")
ROOT = "../shared/data/GlaS-half"
WEIGHTS = ("MIL teacher", "distilled student", "after reversal (best)", "after reversal (last)")


def lemis(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "experiments", *args, "--trainer.enable_progress_bar=false"], check=True)


def last_checkpoint(run: Path) -> Path:
    (path,) = sorted(run.glob("version_*/checkpoints/last.ckpt"), key=lambda p: int(p.parts[-3].split("_")[1]))[-1:]
    return path


def fit(config: Path, out: Path, seed: int, stage1_epochs: int) -> Path:
    """Both legs of one seed's run (each skipped when done); returns the run folder."""
    run = out / f"seed{seed}"
    common = [f"--config={config}", f"--data.init_args.root={ROOT}", f"--seed_everything={seed}",
              f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name=seed{seed}"]
    if not (run / "mil_teacher.ckpt").is_file():
        lemis("fit", *common, f"--trainer.max_epochs={stage1_epochs}")
        ckpt = last_checkpoint(run)
        if int(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]["stage"]) != 2:
            raise SystemExit(f"{ckpt} was saved before the stage switch: the MIL teacher is not in it.")
        shutil.copy(ckpt, run / "mil_teacher.ckpt")
    if not (run / "DONE").is_file():
        lemis("fit", *common, "--ckpt_path=last", "--allow_config_change=true")  # max_epochs back to the config's
        (run / "DONE").touch()
    return run


def reversal_state(ckpt: dict) -> dict:
    (state,) = [s for s in ckpt["callbacks"].values() if isinstance(s, dict) and "initial" in s and "best" in s]
    return state


def weights(run: Path) -> dict[str, tuple[Path, dict]]:
    """{name: (checkpoint, net state dict)} of the four weight sets."""
    final = last_checkpoint(run)
    end = torch.load(final, map_location="cpu", weights_only=False)["state_dict"]
    start = torch.load(run / "mil_teacher.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    slot = lambda state, prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    best_after = reversal_state(torch.load(final, map_location="cpu", weights_only=False))["best"]
    return {"MIL teacher": (run / "mil_teacher.ckpt", slot(start, "teacher.")),
            "distilled student": (final, slot(end, "teacher.")),
            "after reversal (best)": (final, best_after),
            "after reversal (last)": (final, slot(end, "net."))}


def test_scores(run: Path, ckpt_path: Path, net: dict, tmp: Path, name: str) -> dict:
    """testA summary of ``net`` put into a copy of ``ckpt_path``: mean F1, IoU, Hausdorff (rank rule) and pooled
    pixel Dice over the 9 images."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    for key, value in net.items():
        ckpt["state_dict"]["net." + key] = value.clone()
    path = tmp / f"{name}.ckpt"
    torch.save(ckpt, path)
    lemis("test", "--config", str(sorted(run.glob("version_*/config.yaml"))[0]), "--ckpt_path", str(path),
          f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.logger.init_args.name={name}")
    (per_case,) = tmp.glob(f"{name}/version_*/per_case_test.csv")
    rows = list(csv.DictReader(per_case.open()))
    tp, fp, fn = (sum(float(r[k]) for r in rows) for k in ("tp", "fp", "fn"))
    mean = lambda k: float(np.mean([float(r[k]) for r in rows if r.get(k) not in (None, "")]))  # noqa: E731
    return {"images": len(rows), "f1": mean("f1"), "iou": mean("iou"), "hd_cv": mean("hd_cv"),
            "dice_pixel": 2 * tp / (2 * tp + fp + fn)}


def curves(runs: dict[int, Path], out: Path, stage1_epochs: int, first: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for seed, run in runs.items():
        points = {}  # step -> F1; one validation an epoch, so the k-th validated step ends epoch k
        for version in sorted(run.glob("version_*")):
            with open(version / "metrics.csv", newline="") as f:
                points.update({int(r["step"]): float(r["val/f1/mean"]) for r in csv.DictReader(f)
                               if r.get("val/f1/mean")})
        ax.plot(range(len(points)), [points[s] for s in sorted(points)], marker=".", label=f"seed {seed}")
    ax.axvline(stage1_epochs - 0.5, color="grey", ls="--", lw=1)
    ax.axvline(first + 0.5, color="grey", ls=":", lw=1)
    ax.set(xlabel="epoch (dashed: stage switch; dotted: role reversal)", ylabel="val F1 (5 images)",
           title="IKD-MIL on GlaS-half, validation F1 of the net being trained")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=Path("runs/ikd_mil_glas"))
    parser.add_argument("--fit-only", action="store_true")
    args = parser.parse_args()
    schedule = next(c["init_args"] for c in yaml.safe_load(args.config.read_text())["trainer"]["callbacks"]
                    if c["class_path"].endswith("RoleReversal"))
    runs = {seed: fit(args.config, args.out, seed, schedule["stage1_epochs"]) for seed in args.seeds}
    if args.fit_only:
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed, run in runs.items():
            for name, (ckpt, net) in weights(run).items():
                rows.append({"seed": seed, "weights": name, **test_scores(run, ckpt, net, Path(tmp), f"s{seed}_"
                                                                           + name.replace(" ", "_").strip("()"))})
    with open(args.out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    curves(runs, args.out / "curves.png", schedule["stage1_epochs"], schedule["first"])
    print("| weights | " + " | ".join(f"F1 seed {s}" for s in runs) + " | F1 mean | IoU mean | pixel Dice mean |")
    for name in WEIGHTS:
        mine = [r for r in rows if r["weights"] == name]
        print(f"| {name} | " + " | ".join(f"{100 * r['f1']:.1f}" for r in mine)
              + f" | {100 * np.mean([r['f1'] for r in mine]):.1f} | {100 * np.mean([r['iou'] for r in mine]):.1f}"
              + f" | {100 * np.mean([r['dice_pixel'] for r in mine]):.1f} |")
    for a, b in (("distilled student", "MIL teacher"), ("after reversal (best)", "distilled student")):
        diffs = [100 * (x["f1"] - y["f1"]) for x, y in zip(*([r for r in rows if r["weights"] == w] for w in (a, b)))]
        print(f"{a} - {b}: F1 per seed " + ", ".join(f"{d:+.1f}" for d in diffs))


if __name__ == "__main__":
    main()
