"""The SEMISE CPU check of docs/results/semise_acdc.md: per seed, three arms on ACDC (grades for the 7 training
patients of experiments/acdc/semise_classify.yaml only), each scored on val.list:
- ``scratch``: semise_classify.yaml and semise_segment.yaml from random weights;
- ``simclr``: the SEMISE chain with alpha = 1 (NT-Xent only), its encoder loaded into both downstream nets;
- ``semise``: the SEMISE chain as configured (alpha 0.5: NT-Xent + margin + rank);
and for each arm a linear probe (semise_classify.yaml with the arm's encoder frozen; scratch: the random encoder).

    python docs/results/semise_acdc.py --seeds 1 [--arms scratch simclr semise]   # runs what is missing
    python docs/results/semise_acdc.py --seeds 1 2 --report                        # table + curves only
    python docs/results/semise_acdc.py --seeds 1 --ablation only_margin            # SEMISE with one supervised term

Runs live in ``runs/semise_acdc/<arm>_seed<S>/{pretrain,classify,segment,probe}`` (a stage with a ``DONE`` marker, or a
chain stage with its manifest, is skipped). The report takes the last validation of each run: severity macro F1,
macro recall, MAE over the validation patients, segmentation mean Dice over classes and cases, and draws the
segmentation validation curves (``runs/semise_acdc/curves.png``).
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np

OUT = Path("runs/semise_acdc")
CONFIGS = {"classify": "experiments/acdc/semise_classify.yaml", "segment": "experiments/acdc/semise_segment.yaml"}
ARMS = ("scratch", "simclr", "semise")
# SEMISE with one supervised term (--ablation): segmentation only, so the chain's classifier gets 1 epoch
ABLATIONS = {"only_margin": "pretrain:--model.init_args.w_rank=0", "only_rank": "pretrain:--model.init_args.w_margin=0"}
CONFUSION = tuple(f"val/confusion/{t}{p}" for t in range(3) for p in range(3))  # true grade t, predicted p
KEYS = {"classify": ("val/f1", "val/recall", "val/mae", "val/maee", *CONFUSION),
        "segment": ("val/dice/mean", "val/dice/RV", "val/dice/Myo", "val/dice/LV")}


def fit(config: str, folder: Path, seed: int, *overrides: str) -> None:
    """``lemis fit`` of one config into ``folder``, skipped when its ``DONE`` marker is there."""
    if not (folder / "DONE").is_file():
        subprocess.run([sys.executable, "-m", "experiments", "fit", "--config", config, f"--seed_everything={seed}",
                        f"--trainer.logger.init_args.save_dir={folder}", "--trainer.enable_progress_bar=false",
                        *overrides], check=True)
        (folder / "DONE").touch()


def run_arm(arm: str, seed: int) -> None:
    """The arm's classify and segment runs (for the pre-trained arms, the SEMISE chain)."""
    folder = OUT / f"{arm}_seed{seed}"
    if arm == "scratch":
        for stage, config in CONFIGS.items():
            fit(config, folder / stage, seed)
    else:
        alpha = ["pretrain:--model.init_args.alpha=1.0"] if arm == "simclr" else []
        subprocess.run([sys.executable, "-m", "lightning_modules.semise", str(folder), f"--seed_everything={seed}",
                        "--trainer.enable_progress_bar=false", *alpha], check=True)


def run_ablation(name: str, seed: int) -> None:
    subprocess.run([sys.executable, "-m", "lightning_modules.semise", str(OUT / f"{name}_seed{seed}"),
                    f"--seed_everything={seed}", "--trainer.enable_progress_bar=false", ABLATIONS[name],
                    "classify:--trainer.max_epochs=1"], check=True)


def run_probe(arm: str, seed: int) -> None:
    """The arm's linear probe: the classifier with the encoder frozen (scratch's encoder is the random one)."""
    folder = OUT / f"{arm}_seed{seed}"
    encoder = [] if arm == "scratch" else [f"--model.init_args.init_weights.path={folder / 'pretrain' / 'encoder.pt'}",
                                           "--model.init_args.init_weights.into=encoder"]
    fit(CONFIGS["classify"], folder / "probe", seed, "--model.init_args.freeze_encoder=true", *encoder)


def logged(stage_folder: Path) -> list[dict]:
    """Rows of the stage's run metrics.csv (the newest version)."""
    (path,) = sorted(stage_folder.glob("*/version_*/metrics.csv"))[-1:]
    return list(csv.DictReader(path.open(newline="")))


def logged_values(stage_folder: Path, key: str) -> list[float]:
    """Every logged value of ``key`` in the stage's run, [] when the stage has not run or logged yet."""
    try:
        return [float(r[key]) for r in logged(stage_folder) if r.get(key)]
    except (ValueError, FileNotFoundError):
        return []


def last_validation(stage_folder: Path, keys: tuple[str, ...]) -> dict[str, float]:
    rows = [r for r in logged(stage_folder) if r.get(keys[0])]
    return {k: float(rows[-1][k]) for k in keys}


def last_case_rows(stage_folder: Path) -> list[dict]:
    """The rows of the run's per_case_val.csv at its last validation step."""
    (path,) = sorted(stage_folder.glob("*/version_*/per_case_val.csv"))[-1:]
    rows = list(csv.DictReader(path.open(newline="")))
    last = max(int(r["step"]) for r in rows)
    return [r for r in rows if int(r["step"]) == last]


def case_dice(stage_folder: Path) -> dict[str, float]:
    """Mean Dice over the classes of each validation case at the run's last validation (its per_case_val.csv)."""
    cases: dict[str, list[float]] = {}
    for r in last_case_rows(stage_folder):
        cases.setdefault(r["case"], []).append(float(r["dice"]))
    return {case: float(np.mean(v)) for case, v in cases.items()}


def paired(arm: str, seeds: list[int], base: str = "scratch") -> None:
    """Per-case segmentation Dice of ``arm`` minus ``base``'s on the same seed: mean +- standard error over all
    (seed, case) pairs, and how many pairs ``arm`` wins."""
    d = []
    for seed in seeds:
        try:
            a, b = (case_dice(OUT / f"{x}_seed{seed}" / "segment") for x in (arm, base))
        except (ValueError, FileNotFoundError):
            continue
        d += [a[c] - b[c] for c in sorted(a.keys() & b.keys())]
    if d:
        print(f"{arm} - {base}, per-case seg Dice: {100 * np.mean(d):+.1f} +- {100 * np.std(d, ddof=1) / np.sqrt(len(d)):.1f}"
              f" (points, n={len(d)}), {sum(x > 0 for x in d)}/{len(d)} cases better")


def patient_grades(stage_folder: Path) -> str:
    """``<patient><group>:t<true grade>p<predicted grade>`` per validation patient at the classifier's last validation
    (predicted = argmax of the mean of its frames' probabilities; groups by ACDC's blocks of 20)."""
    from datamodules.severity import GROUPS

    patients: dict[str, tuple[int, list]] = {}
    for r in last_case_rows(stage_folder):
        probs = [float(v) for k, v in r.items() if k.startswith("prob/")]
        patients.setdefault(r["patient"], (int(r["target"]), []))[1].append(probs)
    return " ".join(f"{p[-3:]}{GROUPS[(int(p[-3:]) - 1) // 20]}:t{t}p{int(np.argmax(np.mean(probs, axis=0)))}"
                    for p, (t, probs) in sorted(patients.items()))


def confusion(v: dict[str, float]) -> str:
    """The 3x3 validation confusion matrix, rows (true grade) separated by slashes."""
    return " / ".join(" ".join(str(int(v[f"val/confusion/{t}{p}"])) for p in range(3)) for t in range(3))


def curves(seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for color, arm in zip(("C0", "C1", "C2"), ARMS):
        for seed in seeds:
            folder = OUT / f"{arm}_seed{seed}" / "segment"
            try:
                points = [(int(r["step"]), 100 * float(r["val/dice/mean"])) for r in logged(folder)
                          if r.get("val/dice/mean")]
            except (ValueError, FileNotFoundError):  # not run or not logged yet
                continue
            if not points:
                continue
            ax.plot(*zip(*points), color=color, marker=".", lw=1, label=arm if seed == seeds[0] else None)
    ax.set(xlabel="step", ylabel="val Dice % (mean of RV/Myo/LV)", title="SEMISE downstream segmentation, ACDC val")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "curves.png", dpi=110)


def report(seeds: list[int]) -> None:
    table = {}
    for arm in ARMS:
        for seed in seeds:
            folder = OUT / f"{arm}_seed{seed}"
            try:
                table[arm, seed] = {**last_validation(folder / "classify", KEYS["classify"]),
                                    **last_validation(folder / "segment", KEYS["segment"])}
            except (ValueError, FileNotFoundError):
                continue
    print("| arm | seed | severity F1 | recall | MAE | MAEE | confusion (rows: true 0/1/2) | seg Dice % | RV | Myo | LV |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (arm, seed), v in table.items():
        print(f"| {arm} | {seed} | {v['val/f1']:.3f} | {v['val/recall']:.3f} | {v['val/mae']:.3f} | {v['val/maee']:.3f} | "
              f"{confusion(v)} | " + " | ".join(f"{100 * v[k]:.1f}" for k in KEYS["segment"]) + " |")
    print("| linear probe | seed | severity F1 | recall | MAE | MAEE | confusion (rows: true 0/1/2) |")
    print("|---|---|---|---|---|---|---|")
    for arm in ARMS:
        for seed in seeds:
            try:
                v = last_validation(OUT / f"{arm}_seed{seed}" / "probe", KEYS["classify"])
            except (ValueError, FileNotFoundError):
                continue
            print(f"| {arm} | {seed} | {v['val/f1']:.3f} | {v['val/recall']:.3f} | {v['val/mae']:.3f} | "
                  f"{v['val/maee']:.3f} | {confusion(v)} |")
    for arm in ARMS:
        for seed in seeds:
            try:
                print(f"{arm} seed {seed}, per validation patient: " + patient_grades(OUT / f"{arm}_seed{seed}" / "classify"))
            except (ValueError, FileNotFoundError):
                continue
    for arm in ARMS[1:]:
        for seed in seeds:
            if accuracy := logged_values(OUT / f"{arm}_seed{seed}" / "pretrain", "val/rank_accuracy"):
                print(f"{arm} seed {seed}, pre-training val rank accuracy (validation patient pairs) per validation: "
                      + ", ".join(f"{x:.3f}" for x in accuracy))
    for arm in ARMS:
        rows = [v for (a, _), v in table.items() if a == arm]
        if rows:
            print(f"{arm}, mean +- std over {len(rows)} seeds: " + ", ".join(
                f"{k.removeprefix('val/')} {np.mean([r[k] for r in rows]):.3f} +- {np.std([r[k] for r in rows], ddof=1) if len(rows) > 1 else 0:.3f}"
                for k in ("val/f1", "val/recall", "val/mae", "val/dice/mean")))
    for arm in ARMS[1:]:
        common = [s for s in seeds if (arm, s) in table and ("scratch", s) in table]
        if common:
            for key in ("val/f1", "val/dice/mean"):
                d = [table[arm, s][key] - table["scratch", s][key] for s in common]
                print(f"{arm} - scratch, {key}: per seed " + ", ".join(f"{x:+.3f}" for x in d)
                      + f", mean {np.mean(d):+.3f}")
        paired(arm, seeds)
    paired("semise", seeds, base="simclr")
    for arm in (*ARMS, *ABLATIONS):
        for seed in seeds:
            if curve := [100 * x for x in logged_values(OUT / f"{arm}_seed{seed}" / "segment", "val/dice/mean")]:
                print(f"{arm} seed {seed}, segmentation val Dice every 100 steps: " + ", ".join(f"{x:.1f}" for x in curve)
                      + f" (mean of the last 4, the plateau: {np.mean(curve[-4:]):.1f})")
    for arm in ABLATIONS:
        for base in ("scratch", "semise"):
            paired(arm, seeds, base)
    curves(seeds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--ablation", choices=ABLATIONS, help="run this SEMISE ablation for --seeds, then report")
    args = parser.parse_args()
    if args.ablation:
        for seed in args.seeds:
            run_ablation(args.ablation, seed)
    elif not args.report:
        for seed in args.seeds:
            for arm in args.arms:
                run_arm(arm, seed)
        for seed in args.seeds:  # the probes last: the arms' own runs are what the issue asks for
            for arm in args.arms:
                run_probe(arm, seed)
    report(args.seeds)


if __name__ == "__main__":
    main()
