"""`python -m experiments.compare`: run a cross-method comparison and tabulate it; tabulate finished runs.

    python -m experiments.compare run experiments/compare/acdc_cpu.yaml [--jobs 2] [--seeds 1 2 3] [--methods ...]
    python -m experiments.compare run experiments/compare/acdc_gpu.yaml --devices 0 1 2 3  # a run per GPU
    python -m experiments.compare report experiments/compare/acdc_cpu.yaml      # tables + plots of what has run
    python -m experiments.compare summarize RUN_DIR [RUN_DIR ...] [--stage val]  # any runs, grouped by experiment

A spec (YAML) names the methods (a config and its overrides each), the seeds, the label budgets, overrides common
to every run, and the baseline. ``run`` starts every (method, budget, seed) that has not finished, ``--jobs`` at a
time (each with cores / jobs threads), as ``lemis fit ... --ckpt_path last``: a run killed with the comparison
resumes from its last checkpoint, a finished one (``DONE`` beside it) is skipped. Every run of one seed has the
same ``seed_everything``, so the same initial weights and the same order of each stream's passes across methods.
Run r lives in ``<out>/<method>/labeled<B>_seed<S>/version_*``.

The report scores the last checkpoint (the validation at the run's last step, ``per_case_<stage>.csv``):
- per method and budget, Dice per class and mean over seeds, ``mean (min..max)``, as ``summarize`` computes it;
- paired differences to the baseline, and for each of the spec's ``contrasts`` ([method, reference] pairs, e.g.
  a consistency weight on against it at 0) to its reference (same seed and budget): per seed (difference of mean
  Dice), and per case (difference of a case's mean Dice over classes, pooled over seeds), each with mean,
  standard deviation and range; with >= 3 seeds, a method is ``better`` (``worse``) when every seed's
  difference is > 0 (< 0) and the per-case mean difference exceeds twice its standard error, else
  ``within noise``; with fewer, ``undecided``;
- ``curves.png``: validation Dice over steps per method (each seed thin, the seed mean thick); with several
  budgets also ``budgets.png``: Dice of the last checkpoint against the number of labeled patients/cases.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from lemis.errors import ConfigError
from lemis.files import atomic_path
from lightning_modules.metrics import summarize

SPEC_KEYS = {"name", "out", "seeds", "budgets", "baseline", "contrasts", "stage", "common", "methods"}
MIN_SEEDS_FOR_VERDICT = 3  # fewer seeds cannot show that a difference holds across seeds
DONE = "DONE"


# ---- finished runs -----------------------------------------------------------------------------------------------

def versions(run: Path) -> list[Path]:
    """The version folders of one run (a resumed run continues in the next version), oldest first."""
    return sorted((p for p in run.glob("version_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))


def last_rows(run_dir: Path, stage: str) -> list[dict]:
    """Per-case rows of the last evaluated step in ``per_case_<stage>.csv`` of a version folder, or of the newest
    version holding one when ``run_dir`` is a run folder; numbers parsed."""
    candidates = [run_dir] + versions(run_dir)[::-1]
    path = next((p / f"per_case_{stage}.csv" for p in candidates if (p / f"per_case_{stage}.csv").is_file()), None)
    if path is None:
        raise ConfigError(f"{run_dir} holds no per_case_{stage}.csv (has the run finished an evaluation?).")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    last = max(int(r["step"]) for r in rows)
    numeric = lambda v: float(v) if v not in ("", "nan") else float("nan")  # noqa: E731
    return [{k: (v if k in ("case", "class") else numeric(v)) for k, v in r.items()}
            for r in rows if int(r["step"]) == last]


def curve(run: Path, key: str = "val/dice/mean") -> dict[int, float]:
    """step -> logged value over every version of a run (a later version's value wins at a step)."""
    points: dict[int, float] = {}
    for version in versions(run) or [run]:
        path = version / "metrics.csv"
        if path.is_file():
            with open(path, newline="") as f:
                points.update({int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)})
    return dict(sorted(points.items()))


def case_scores(rows: list[dict], metric: str = "dice") -> dict[str, float]:
    """case -> mean over classes of ``metric``."""
    by_case = defaultdict(list)
    for r in rows:
        by_case[r["case"]].append(r[metric])
    return {case: float(np.mean(v)) for case, v in by_case.items()}


def spread(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.1f} ({values.min():.1f}..{values.max():.1f})"


def table(groups: dict[str, list[dict]], metrics=("dice", "hd95")) -> str:
    """Markdown table: one row per (group, metric), columns per class + mean, 'mean (min..max)' over the runs."""
    classes = sorted({k.split("/")[1] for s in next(iter(groups.values())) for k in s if k.startswith("dice/")}
                     - {"mean"}) + ["mean"]
    lines = ["| experiment | metric | runs | " + " | ".join(classes) + " |",
             "|---|---|---|" + "---|" * len(classes)]
    for name, summaries in groups.items():
        for metric in metrics:
            scale = 100.0 if metric in ("dice", "jaccard") else 1.0
            cells = [spread([s[f"{metric}/{c}"] * scale for s in summaries]) for c in classes]
            lines.append(f"| {name} | {metric}{' %' if scale == 100 else ''} | {len(summaries)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the spec ----------------------------------------------------------------------------------------------------

@dataclass
class Spec:
    """A comparison: see the module docstring."""

    name: str
    methods: dict[str, dict]
    seeds: list[int]
    baseline: str
    budgets: list = field(default_factory=lambda: [None])
    common: list[str] = field(default_factory=list)
    stage: str = "val"
    out: Path = Path("runs/compare")
    file: Path | None = None
    contrasts: list[tuple[str, str]] = field(default_factory=list)  # extra (method, reference) pairs

    @classmethod
    def load(cls, path: Path) -> "Spec":
        if not path.is_file():
            raise ConfigError(f"comparison spec {path} not found.")
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - SPEC_KEYS
        if unknown:
            raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} (a spec has {sorted(SPEC_KEYS)}).")
        for key in ("name", "methods", "seeds", "baseline"):
            if key not in raw:
                raise ConfigError(f"{path}: missing key {key!r}.")
        if raw["baseline"] not in raw["methods"]:
            raise ConfigError(f"{path}: baseline {raw['baseline']!r} is not one of the methods {list(raw['methods'])}.")
        for method, entry in raw["methods"].items():
            if not isinstance(entry, dict) or "config" not in entry or set(entry) - {"config", "overrides"}:
                raise ConfigError(f"{path}: method {method!r} needs 'config' (and optionally 'overrides').")
        contrasts = [tuple(pair) for pair in raw.get("contrasts") or []]
        for pair in contrasts:
            if len(pair) != 2 or set(pair) - set(raw["methods"]):
                raise ConfigError(f"{path}: contrast {list(pair)} must name two of the methods {list(raw['methods'])}.")
        return cls(name=raw["name"], methods=raw["methods"], seeds=list(raw["seeds"]), baseline=raw["baseline"],
                   budgets=list(raw.get("budgets") or [None]), common=list(raw.get("common") or []),
                   stage=raw.get("stage", "val"), out=Path(raw.get("out", "runs/compare")) / raw["name"], file=path,
                   contrasts=contrasts)

    def run_dir(self, method: str, budget, seed: int) -> Path:
        return self.out / method / (f"seed{seed}" if budget is None else f"labeled{budget}_seed{seed}")

    def command(self, method: str, budget, seed: int) -> list[str]:
        entry, run = self.methods[method], self.run_dir(method, budget, seed)
        budget_arg = [] if budget is None else [f"--data.init_args.labeled={budget}"]
        return [sys.executable, "-m", "experiments", "fit", "--config", str(entry["config"]), *self.common,
                *(entry.get("overrides") or []), *budget_arg, f"--seed_everything={seed}",
                f"--trainer.logger.init_args.save_dir={run.parent}", f"--trainer.logger.init_args.name={run.name}",
                "--trainer.enable_progress_bar=false", "--ckpt_path=last"]

    def runs(self, methods=None, seeds=None) -> list[tuple[str, object, int]]:
        return [(m, b, s) for s in (seeds or self.seeds) for b in self.budgets for m in (methods or self.methods)]


# ---- running -----------------------------------------------------------------------------------------------------

def run_all(spec: Spec, jobs: int, methods=None, seeds=None, threads: int | None = None,
            devices: list[str] | None = None) -> int:
    """Start every unfinished run, ``jobs`` at a time with ``threads`` threads each (default: cores / jobs, so
    the runs never oversubscribe the cores: OpenMP threads spin-waiting on a busy core make a step ~15x slower);
    with ``devices`` (GPU ids), one run per device at a time, each seeing only its own (CUDA_VISIBLE_DEVICES).
    Return the number that failed."""
    if devices:
        jobs = len(devices)
    todo = [r for r in spec.runs(methods, seeds) if not (spec.run_dir(*r) / DONE).is_file()]
    skipped = len(spec.runs(methods, seeds)) - len(todo)
    print(f"lemis compare {spec.name}: {len(todo)} runs to do, {skipped} finished before", flush=True)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    slots = list(devices or range(jobs))  # a free device (or, on CPU, a free job number) per run to start
    running: list[tuple[subprocess.Popen, tuple, float, object]] = []
    failed = 0
    while todo or running:
        while todo and slots:
            method, budget, seed = todo.pop(0)
            run = spec.run_dir(method, budget, seed)
            run.mkdir(parents=True, exist_ok=True)
            slot = slots.pop(0)
            log = open(run / "compare.log", "a")
            process = subprocess.Popen(spec.command(method, budget, seed), stdout=log, stderr=subprocess.STDOUT,
                                       env=env | ({"CUDA_VISIBLE_DEVICES": str(slot)} if devices else {}))
            log.close()
            running.append((process, (method, budget, seed), time.time(), slot))
        for entry in list(running):
            process, key, start, slot = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            slots.append(slot)
            run = spec.run_dir(*key)
            wall = time.time() - start
            if process.returncode == 0:
                with atomic_path(run / DONE) as tmp:
                    tmp.write_text(f"wall_s: {wall:.0f}\nthreads: {threads}\n")
            else:
                failed += 1
            print(f"  {'done' if process.returncode == 0 else f'FAILED ({process.returncode})'} {run} "
                  f"in {wall:.0f} s (log: {run / 'compare.log'})", flush=True)
        time.sleep(0.5)
    return failed


# ---- the report --------------------------------------------------------------------------------------------------

def paired(spec: Spec, method: str, reference: str, budget, seeds: list[int]) -> dict:
    """Differences method - reference in points of Dice: per seed (mean Dice) and per (seed, case)."""
    per_seed, per_case = [], []
    for seed in seeds:
        ours = last_rows(spec.run_dir(method, budget, seed), spec.stage)
        base = last_rows(spec.run_dir(reference, budget, seed), spec.stage)
        per_seed.append(100 * (summarize(ours)["dice/mean"] - summarize(base)["dice/mean"]))
        a, b = case_scores(ours), case_scores(base)
        per_case += [100 * (a[c] - b[c]) for c in sorted(a.keys() & b.keys())]
    per_seed, per_case = np.array(per_seed), np.array(per_case)
    se = per_case.std(ddof=1) / math.sqrt(len(per_case)) if len(per_case) > 1 else float("inf")
    if len(per_seed) < MIN_SEEDS_FOR_VERDICT:
        verdict = f"undecided (< {MIN_SEEDS_FOR_VERDICT} seeds)"
    elif (per_seed > 0).all() and per_case.mean() > 2 * se:
        verdict = "better"
    elif (per_seed < 0).all() and per_case.mean() < -2 * se:
        verdict = "worse"
    else:
        verdict = "within noise"
    return {"per_seed": per_seed, "per_case": per_case, "se": se, "verdict": verdict}


def finished(spec: Spec) -> dict[tuple[str, object], list[int]]:
    """(method, budget) -> the seeds whose run is done."""
    out = defaultdict(list)
    for method, budget, seed in spec.runs():
        if (spec.run_dir(method, budget, seed) / DONE).is_file():
            out[(method, budget)].append(seed)
    return out


def label(method: str, budget) -> str:
    return method if budget is None else f"{method} @ {budget}"


def report(spec: Spec) -> str:
    done = finished(spec)
    if not done:
        raise ConfigError(f"no finished run under {spec.out} yet (python -m experiments.compare run {spec.file}).")
    groups = {label(m, b): [summarize(last_rows(spec.run_dir(m, b, s), spec.stage)) for s in seeds]
              for (m, b), seeds in done.items()}
    pairs = list(dict.fromkeys([(m, spec.baseline) for m in spec.methods if m != spec.baseline] + list(spec.contrasts)))
    lines = [f"# Comparison {spec.name} (last checkpoint, {spec.stage} split)", "", table(groups), "",
             f"Paired differences (Dice points; same seed and budget) to {spec.baseline} and the spec's contrasts: "
             f"per seed, and per case pooled over seeds.", "",
             "| method | reference | seeds | per-seed differences | per seed mean ± sd | per case mean ± se (n) | "
             "cases won | verdict |", "|---|---|---|---|---|---|---|---|"]
    for budget in spec.budgets:
        for method, reference in pairs:
            common = sorted(set(done.get((method, budget), [])) & set(done.get((reference, budget), [])))
            if not common:
                continue
            d = paired(spec, method, reference, budget, common)
            seed_sd = d["per_seed"].std(ddof=1) if len(common) > 1 else float("nan")
            won = int((d["per_case"] > 0).sum())
            lines.append(f"| {label(method, budget)} | {reference} | {len(common)} | "
                         f"{', '.join(f'{v:+.1f}' for v in d['per_seed'])} | {d['per_seed'].mean():+.1f} ± "
                         f"{seed_sd:.1f} | {d['per_case'].mean():+.1f} ± {d['se']:.1f} ({len(d['per_case'])}) | "
                         f"{won}/{len(d['per_case'])} | {d['verdict']} |")
    walls = [yaml.safe_load((spec.run_dir(m, b, s) / DONE).read_text())["wall_s"] for (m, b), seeds in done.items()
             for s in seeds]
    lines += ["", f"Runs: {sum(map(len, done.values()))} finished, wall time per run {spread(walls)} s "
              f"(from {DONE} files; a resumed run counts its last process only)."]
    plot(spec, done)
    return "\n".join(lines)


def plot(spec: Spec, done: dict) -> None:
    """curves.png (validation Dice over steps) and, with several budgets, budgets.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {m: f"C{i}" for i, m in enumerate(spec.methods)}
    fig, axes = plt.subplots(1, len(spec.budgets), figsize=(6 * len(spec.budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], spec.budgets):
        for method in spec.methods:
            curves = [curve(spec.run_dir(method, budget, s)) for s in done.get((method, budget), [])]
            curves = [c for c in curves if c]
            for c in curves:
                ax.plot(list(c), [100 * v for v in c.values()], color=colours[method], alpha=0.3, lw=0.8)
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                ax.plot(steps, [100 * np.mean([c[t] for c in curves]) for t in steps], color=colours[method],
                        lw=2, label=f"{method} ({len(curves)} seeds)")
        ax.set(xlabel="step", ylabel=f"{spec.stage} Dice %", title=f"{spec.name}" + (
            "" if budget is None else f", {budget} labeled"))
    save_figure(fig, spec.out / "curves.png")
    if len(spec.budgets) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in spec.methods:
            points = [(b, [100 * summarize(last_rows(spec.run_dir(method, b, s), spec.stage))["dice/mean"]
                           for s in done.get((method, b), [])]) for b in spec.budgets]
            points = [(b, v) for b, v in points if v]
            if points:
                ax.errorbar([b for b, _ in points], [np.mean(v) for _, v in points],
                            yerr=[np.std(v) for _, v in points], color=colours[method], marker="o", capsize=3,
                            label=method)
        ax.set(xlabel="labeled patients/cases", ylabel=f"{spec.stage} Dice % (last checkpoint)")
        save_figure(fig, spec.out / "budgets.png")


def save_figure(fig, path: Path) -> None:
    """Grid and legend on every axis, then the PNG, atomically."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---- command line ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run", help="start every unfinished run, then report", allow_abbrev=False)
    run.add_argument("spec", type=Path)
    run.add_argument("--jobs", type=int, default=1, help="runs at a time")
    run.add_argument("--threads", type=int, help="threads per run (default: cores / jobs)")
    run.add_argument("--devices", nargs="+", help="GPU ids: one run per GPU at a time (sets --jobs)")
    run.add_argument("--seeds", type=int, nargs="+", help="a subset of the spec's seeds")
    run.add_argument("--methods", nargs="+", help="a subset of the spec's methods")
    rep = sub.add_parser("report", help="tables and plots of the finished runs", allow_abbrev=False)
    rep.add_argument("spec", type=Path)
    summ = sub.add_parser("summarize", help="per-class Dice/HD95 of run folders, grouped by experiment",
                          allow_abbrev=False)
    summ.add_argument("runs", nargs="+", type=Path)
    summ.add_argument("--stage", default="val")
    args = parser.parse_args(argv)
    try:
        if args.what == "summarize":
            groups: dict[str, list[dict]] = defaultdict(list)
            for run_dir in args.runs:
                groups[run_dir.parent.name].append(summarize(last_rows(run_dir, args.stage)))
            print(table(dict(groups)))
            return 0
        spec = Spec.load(args.spec)
        failed = 0
        if args.what == "run":
            unknown = set(args.methods or []) - set(spec.methods)
            if unknown or args.jobs < 1:
                raise ConfigError(f"--methods {sorted(unknown)} not in {args.spec}" if unknown
                                  else f"--jobs must be >= 1, got {args.jobs}.")
            failed = run_all(spec, args.jobs, args.methods, args.seeds, args.threads, args.devices)
        text = report(spec)
        with atomic_path(spec.out / "report.md") as tmp:
            tmp.write_text(text + "\n")
        print(text)
        return 1 if failed else 0
    except ConfigError as err:
        print(f"lemis: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
