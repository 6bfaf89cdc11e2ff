"""A W&B sweep's command, with ${args} substituted as the agent does, runs offline and records the values."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import yaml

from datamodules.phantoms import make_acdc
from tests.conftest import REPO

SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


def sample(parameters: dict, rng: random.Random) -> dict:
    """One draw per parameter, for the distributions the sweep files use."""
    drawn = {}
    for name, spec in parameters.items():
        if "values" in spec:
            drawn[name] = rng.choice(spec["values"])
        elif spec.get("distribution") == "log_uniform_values":
            drawn[name] = math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
        else:
            raise AssertionError(f"test does not sample {spec}")
    return drawn


def agent_command(sweep: dict, drawn: dict) -> list[str]:
    """The W&B agent's expansion of `command`: ${env} dropped, ${args} -> --name=value."""
    out = []
    for word in sweep["command"]:
        if word == "${env}":
            continue
        if word == "${args}":
            out += [f"--{k}={v}" for k, v in drawn.items()]
        else:
            out.append(sys.executable if word == "python" else word)
    return out


def nested(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def offline_config(run_dir, section: str, class_path: str) -> dict:
    """The last config value of ``section`` (a JSON object) recorded in an offline run's .wandb file.

    wandb >= 0.19 keeps an offline run's config only inside its binary log (files/config.yaml appears at
    sync time); the config values are stored there as JSON text, which is all this test needs.
    """
    (log,) = run_dir.glob("run-*.wandb")
    text = log.read_bytes().decode("latin-1")
    start = text.rindex('{"class_path":"' + class_path + '"')
    value, _ = json.JSONDecoder().raw_decode(text, start)
    return {section: value}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_command_runs_offline_and_logs_swept_values(path, tmp_path):
    sweep = yaml.safe_load(path.read_text())
    drawn = sample(sweep["parameters"], random.Random(0))
    data = make_acdc(tmp_path / "acdc", n_train=15, n_val=1, n_test=1, size=(32, 32), n_slices=(3, 4), seed=0)
    command = agent_command(sweep, drawn) + [
        f"--data.init_args.root={data}", "--data.init_args.patch_size=[32, 32]", "--data.init_args.batch_size=4",
        "--data.init_args.labeled_batch_size=2", "--data.init_args.num_workers=0", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]  # the last logger: W&B
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true")  # no key, no netrc: lemis must choose offline
    (tmp_path / "experiments").symlink_to(REPO / "experiments")  # the agent runs in a checkout; CSV runs land here
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    experiment = yaml.safe_load((REPO / sweep["command"][sweep["command"].index("--config") + 1]).read_text())
    config = {**offline_config(run, "model", experiment["model"]["class_path"]),
              **offline_config(run, "data", experiment["data"]["class_path"])}
    for name, value in drawn.items():
        assert nested(config, name) == pytest.approx(value)
    assert list(tmp_path.glob("runs/acdc_mean_teacher/version_0/per_case_val.csv"))
