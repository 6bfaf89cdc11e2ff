"""experiments.compare on phantoms: two methods, two seeds, three steps; a comparison killed mid-run resumes
(the killed runs continue from their last checkpoint, finished ones are skipped), its table equals `summarize`
of the same runs, the paired differences are those of the per-case files, and the plot is written."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from experiments.cli import LemisCLI
from experiments.compare import Spec, case_scores, last_rows, main
from lightning_modules.metrics import summarize
from tests.conftest import REPO
from tests.test_experiments import phantom_args
from tests.test_resume import KILL


def every_step_config(name: str, out: Path) -> Path:
    """experiments/acdc/<name>.yaml writing last.ckpt every step, with the env-driven KillAt of test_resume."""
    cfg = yaml.safe_load((REPO / "experiments" / "acdc" / f"{name}.yaml").read_text())
    for callback in cfg["trainer"]["callbacks"]:
        if callback.get("init_args", {}).get("save_last"):
            callback["init_args"]["every_n_train_steps"] = 1
    cfg["trainer"]["callbacks"].append({"class_path": "tests.test_resume.KillAt"})
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def compare(spec: Path, *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL} | ({KILL: kill} if kill else {})
    return subprocess.run([sys.executable, "-m", "experiments.compare", "run", str(spec), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)


def test_compare_resumes_skips_and_tabulates(acdc_phantom, tmp_path, capsys):
    common = [f"--data.init_args.root={acdc_phantom}", "--data.init_args.patch_size=[32, 32]",
              "--data.init_args.labeled=2", "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
              "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.accelerator=cpu",
              "--trainer.enable_model_summary=false"]
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "tiny", "out": str(tmp_path / "runs"), "seeds": [1, 2], "baseline": "supervised", "common": common,
        "contrasts": [["supervised", "mean_teacher"], ["mean_teacher", "supervised"]],  # 2nd = a baseline row
        "methods": {"supervised": {"config": str(every_step_config("supervised", tmp_path))},
                    "mean_teacher": {"config": str(every_step_config("mean_teacher", tmp_path)),
                                     "overrides": ["--data.init_args.labeled_batch_size=2"]}}}))
    spec = Spec.load(spec_file)

    first = compare(spec_file, "--methods", "supervised", "--jobs", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    baseline_files = {p: p.stat().st_mtime_ns for s in (1, 2) for p in spec.run_dir("supervised", None, s).rglob("*")}

    killed = compare(spec_file, kill="2:99:/dev/null")  # every mean_teacher run is SIGKILLed as its 3rd step starts
    assert killed.returncode == 1 and "2 runs to do, 2 finished before" in killed.stdout, killed.stdout[-3000:]
    resumed = compare(spec_file)
    assert resumed.returncode == 0 and "2 runs to do, 2 finished before" in resumed.stdout, resumed.stdout[-3000:]

    assert {p: p.stat().st_mtime_ns for s in (1, 2)
            for p in spec.run_dir("supervised", None, s).rglob("*")} == baseline_files  # skipped, untouched
    for seed in (1, 2):
        run = spec.run_dir("mean_teacher", None, seed)
        assert sorted(p.name for p in run.glob("version_*")) == ["version_0", "version_1"]  # killed, then resumed
        assert (run / "DONE").is_file() and {r["step"] for r in last_rows(run, "val")} == {3.0}

    # the table equals `summarize` of the same runs
    assert main(["summarize", *(str(spec.run_dir("supervised", None, s)) for s in (1, 2))]) == 0
    summarized = capsys.readouterr().out.splitlines()
    report = (spec.out / "report.md").read_text().splitlines()
    table_rows = [line for line in summarized if line.startswith("| supervised |")]
    assert len(table_rows) == 2 and set(table_rows) <= set(report)  # Dice and HD95 rows, as summarize wrote them
    # the paired per-seed differences are those of the per-case files
    diffs = []
    for seed in (1, 2):
        ours, base = (last_rows(spec.run_dir(m, None, seed), "val") for m in ("mean_teacher", "supervised"))
        diffs.append(100 * (summarize(ours)["dice/mean"] - summarize(base)["dice/mean"]))
        assert case_scores(ours).keys() == case_scores(base).keys()
    (row,) = [line for line in report if line.startswith("| mean_teacher | supervised | 2 |")]  # once, not twice
    assert row.split("|")[4].strip() == ", ".join(f"{d:+.1f}" for d in diffs)
    assert f"{np.mean(diffs):+.1f} ±" in row.split("|")[5] and "undecided (< 3 seeds)" in row
    (contrast,) = [line for line in report if line.startswith("| supervised | mean_teacher | 2 |")]  # reversed
    assert np.allclose([float(v) for v in contrast.split("|")[4].split(",")], [-d for d in diffs], atol=0.051)
    assert (spec.out / "curves.png").stat().st_size > 1000


def test_bad_spec_is_one_sentence(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "seeds": [1], "baseline": "nope",
                                    "methods": {"a": {"config": "a.yaml"}}}))
    assert main(["report", str(spec)]) == 2
    assert "baseline 'nope' is not one of the methods" in capsys.readouterr().err
    spec.write_text(yaml.safe_dump({"name": "x", "seeds": [1], "baseline": "a", "contrasts": [["a", "zz"]],
                                    "methods": {"a": {"config": "a.yaml"}}}))
    assert main(["report", str(spec)]) == 2
    assert "contrast ['a', 'zz'] must name two of the methods ['a']" in capsys.readouterr().err


SPECS = sorted((REPO / "experiments" / "compare").glob("*.yaml"))


@pytest.mark.parametrize("spec_file", SPECS, ids=lambda p: p.stem)
def test_every_shipped_spec_resolves(spec_file, acdc_phantom, la_phantom, tmp_path):
    """Each method of each shipped spec, with the spec's common options and overrides, is a configuration the CLI
    accepts and instantiates (data pointed at a phantom): a stale option in a spec fails here, not hours in."""
    spec = Spec.load(spec_file)
    for method in spec.methods:
        argv = spec.command(method, spec.budgets[0], spec.seeds[0])
        config, options = Path(argv[argv.index("--config") + 1]), argv[argv.index("--config") + 2:]
        shrink = phantom_args(REPO / config, acdc_phantom, la_phantom, tmp_path)[2:]
        options = [o for o in options if o != "--ckpt_path=last"]
        cli = LemisCLI(args=["--config", str(REPO / config), *options, *shrink], run=False)
        assert cli.trainer.max_steps == 2 and cli.model is not None, (spec_file.name, method)


def test_devices_run_one_run_per_gpu(tmp_path, monkeypatch):
    """``--devices 3 5``: two runs at a time, each started with only its own GPU visible, a device reused only
    after its run ended (Popen stubbed: each fake run ends at the second poll)."""
    import experiments.compare as compare_module

    started, live = [], set()

    class FakeRun:
        def __init__(self, command, env, **_):
            self.device, self.polls, self.returncode = env["CUDA_VISIBLE_DEVICES"], 0, None
            assert self.device not in live, "two runs on one device"
            live.add(self.device)
            started.append(self.device)

        def poll(self):
            self.polls += 1
            if self.polls >= 2:
                self.returncode = 0
                live.discard(self.device)
            return self.returncode

    monkeypatch.setattr(compare_module.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(compare_module.time, "sleep", lambda s: None)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "gpu", "out": str(tmp_path / "runs"), "seeds": [1, 2, 3],
                                         "baseline": "a", "methods": {"a": {"config": "a.yaml"}}}))
    spec = Spec.load(spec_file)
    assert compare_module.run_all(spec, jobs=1, devices=["3", "5"]) == 0
    assert started == ["3", "5", "3"] and all((spec.run_dir("a", None, s) / "DONE").is_file() for s in (1, 2, 3))
