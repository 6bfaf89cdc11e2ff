"""`make demo`: Mean Teacher vs the labeled-only baseline on a generated ACDC-like phantom, on the CPU.

Generates the phantom once into .cache/phantoms/acdc, trains both configs (experiments/demo.yaml and
experiments/demo_supervised.yaml: same data, budget, steps and net), prints per-class Dice of the last
checkpoints on the phantom's val.list and writes runs/demo/demo.png (image / ground truth / both predictions).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from callbacks.image_logger import middle_slices, panel, save_png
from datamodules.phantoms import ensure_phantoms
from experiments.cli import LemisCLI
from lemis.errors import LemisError

ROOT = Path(".cache/phantoms/acdc")
PHANTOM = dict(n_train=20, n_val=4, n_test=2, size=(64, 64), seed=0)
RUNS = {"labeled-only": "experiments/demo_supervised.yaml", "Mean Teacher": "experiments/demo.yaml"}
OUT = Path("runs/demo")


def train(config: str) -> LemisCLI:
    return LemisCLI(args=["fit", "--config", config, f"--data.init_args.root={ROOT}"])


def dice_table(summaries: dict[str, dict], class_names: tuple[str, ...]) -> str:
    """Rows: methods; columns: per-class Dice and their mean (in %)."""
    header = f"{'method':<14}" + "".join(f"{c:>8}" for c in (*class_names, "mean"))
    lines = [header, "-" * len(header)]
    for method, summary in summaries.items():
        values = [summary[f"dice/{c}"] for c in class_names] + [summary["dice/mean"]]
        lines.append(f"{method:<14}" + "".join(f"{100 * v:8.1f}" for v in values))
    return "\n".join(lines)


def picture(clis: dict[str, LemisCLI]) -> Path:
    """Image / ground truth / each method's prediction on the middle slices of the first val case.

    Each module keeps its last validation's first case (``example``), so nothing is predicted again.
    """
    first = next(iter(clis.values())).model.example
    idx = middle_slices(first["image"], 3)
    columns = {"ground truth": first["label"][idx]}
    columns.update({method: cli.model.example["prediction"][idx] for method, cli in clis.items()})
    path = OUT / "demo.png"
    save_png(panel(first["image"][idx], columns), path)
    return path


def main() -> int:
    start = time.time()
    ensure_phantoms("acdc", ROOT, **PHANTOM)
    clis = {}
    try:
        for method, config in RUNS.items():
            print(f"\n== {method}: lemis fit --config {config} --data.init_args.root={ROOT}", flush=True)
            clis[method] = train(config)
    except LemisError as err:
        print(f"lemis: error: {err}", file=sys.stderr)
        return 2
    summaries = {m: cli.model.last_summary["val"] for m, cli in clis.items()}
    names = next(iter(clis.values())).datamodule.class_names
    n_cases = int(next(iter(summaries.values()))["n_cases"])
    print(f"\nDice (%) of the last checkpoints on the phantom's val.list ({n_cases} volumes), "
          f"3 labeled patients of 20, 600 steps, 64x64, seed 1337:\n")
    print(dice_table(summaries, names))
    print(f"\npicture: {picture(clis)}   per-case rows: runs/demo_*/version_*/per_case_val.csv   "
          f"wall time: {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
