"""`python -m experiments.summarize RUN_DIR [RUN_DIR ...] [--stage val]`: per-class Dice/HD95 of finished runs.

Each RUN_DIR is a run directory (runs/<experiment>/version_N) holding per_case_<stage>.csv; rows of the last
evaluated step are used (the last checkpoint, never a selected one). Runs are grouped by experiment name and
reported as mean and spread (min..max) over the runs (seeds) of each group, as benchmarks.md asks.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from lightning_modules.metrics import summarize


def last_rows(run_dir: Path, stage: str) -> list[dict]:
    """Per-case rows of the last evaluated step in run_dir/per_case_<stage>.csv, numbers parsed."""
    path = run_dir / f"per_case_{stage}.csv"
    if not path.is_file():
        raise SystemExit(f"lemis: error: {path} not found (has the run finished an evaluation?).")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    last = max(int(r["step"]) for r in rows)
    numeric = lambda v: float(v) if v not in ("", "nan") else float("nan")  # noqa: E731
    return [{k: (v if k in ("case", "class") else numeric(v)) for k, v in r.items()}
            for r in rows if int(r["step"]) == last]


def table(groups: dict[str, list[dict]], metrics=("dice", "hd95")) -> str:
    """Markdown table: one row per (experiment, metric), columns per class + mean, 'mean (min..max)'."""
    classes = sorted({k.split("/")[1] for s in next(iter(groups.values())) for k in s if k.startswith("dice/")}
                     - {"mean"}) + ["mean"]
    lines = ["| experiment | metric | runs | " + " | ".join(classes) + " |",
             "|---|---|---|" + "---|" * len(classes)]
    for name, summaries in groups.items():
        for metric in metrics:
            scale = 100.0 if metric in ("dice", "jaccard") else 1.0
            cells = []
            for c in classes:
                values = np.array([s[f"{metric}/{c}"] for s in summaries]) * scale
                cells.append(f"{values.mean():.1f} ({values.min():.1f}..{values.max():.1f})")
            lines.append(f"| {name} | {metric}{' %' if scale == 100 else ''} | {len(summaries)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--stage", default="val")
    args = parser.parse_args(argv)
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in args.runs:
        groups[run.parent.name].append(summarize(last_rows(run, args.stage)))
    print(table(dict(groups)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
