"""IKD-MIL (spec/methods/ikd_mil.md): the role reversal of the hand example (sec. 11), the stage switch, one
distillation step, whole-image inference, and both stages plus a reversal end to end on the GlaS phantom."""
from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from callbacks.role_reversal import RoleReversal
from datamodules.phantoms import make_glas
from experiments.__main__ import main
from lemis.errors import ConfigError
from lemis.files import read_manifest
from lightning_modules.ikd_mil import IKDMIL
from lightning_modules.nets.vgg_mil import VGGMIL
from tests.conftest import REPO


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)


def fill(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


class FakeTrainer:
    def __init__(self, optimizer):
        self.optimizers = [optimizer]


def reversal_setup(student_from: str, optimizer_state: str):
    module = nn.Module()
    module.net, module.teacher = Tiny(), Tiny()
    module.register_buffer("stage", torch.tensor(2))
    fill(module.teacher, 1.0)
    fill(module.net, 2.0)
    optimizer = torch.optim.Adam(module.net.parameters())
    module.net.conv.weight.grad = torch.ones_like(module.net.conv.weight)
    module.net.conv.bias.grad = torch.ones_like(module.net.conv.bias)
    optimizer.step()  # moments exist; S moved a little: re-fill so the example is exact
    fill(module.net, 2.0)
    callback = RoleReversal(stage1_epochs=1, first=1, every=1, student_from=student_from,
                            optimizer_state=optimizer_state)
    callback.best = {k: v.clone() for k, v in module.net.state_dict().items()}  # best student = S
    return module, optimizer, callback


@pytest.mark.parametrize("student_from,student_value", [("previous_teacher", 1.0), ("teacher", 2.0)])
@pytest.mark.parametrize("optimizer_state", ["keep", "reset"])
def test_role_reversal_of_the_hand_example(student_from, student_value, optimizer_state):
    module, optimizer, callback = reversal_setup(student_from, optimizer_state)
    params = list(module.net.parameters())
    moments = optimizer.state[params[0]]["exp_avg"].clone()
    callback.reverse(FakeTrainer(optimizer), module)
    assert all((p == 2.0).all() for p in module.teacher.parameters())
    assert all((p == student_value).all() for p in module.net.parameters())
    assert optimizer.param_groups[0]["params"][0] is params[0]  # the optimizer still holds S's parameters
    if optimizer_state == "keep":
        assert torch.equal(optimizer.state[params[0]]["exp_avg"], moments)
    else:
        assert len(optimizer.state) == 0
    assert callback.round == 0  # -1 before: the stage switch counts as round 0


def test_stage_switch_freezes_the_best_teacher_and_restarts_the_student():
    module = IKDMIL(net=VGGMIL())
    callback = RoleReversal(stage1_epochs=1, first=2, every=1)
    callback.setup(None, module, "fit")
    initial = {k: v.clone() for k, v in module.net.state_dict().items()}
    fill(module.net, 0.5)
    callback.best = {k: v.clone() for k, v in module.net.state_dict().items()}
    fill(module.net, 0.7)
    optimizer = torch.optim.Adam(module.net.parameters())
    optimizer.state[next(module.net.parameters())]["step"] = torch.tensor(3.0)
    callback.switch_stage(FakeTrainer(optimizer), module)
    assert int(module.stage) == 2 and callback.round == 0 and len(optimizer.state) == 0
    assert all((p == 0.5).all() for p in module.teacher.parameters())
    assert all(torch.equal(module.net.state_dict()[k], v) for k, v in initial.items())
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_distillation_step_and_mask_refusal():
    torch.manual_seed(0)
    module = IKDMIL(net=VGGMIL())
    module.teacher = VGGMIL().requires_grad_(False)
    module.stage.fill_(2)
    batch = {"image": torch.randn(2, 3, 16, 16), "bag_label": torch.tensor([1, 0])}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in module.net.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    with pytest.raises(ConfigError, match="must not carry a pixel mask"):
        module.training_step({**batch, "label": torch.zeros(2, 16, 16)}, 0)


def test_whole_image_inference_at_native_size():
    module = IKDMIL(net=VGGMIL().eval(), roi_size=(32, 32))  # the ROI is not used by whole-image inference
    probs = module.predict_case(torch.randn(1, 3, 21, 30))
    assert probs.shape == (1, 2, 21, 30) and torch.allclose(probs.sum(1), torch.ones(1, 21, 30))


def test_both_stages_and_a_reversal_run_on_the_phantom(tmp_path):
    root = make_glas(tmp_path / "glas")
    cfg = yaml.safe_load((REPO / "experiments" / "glas" / "ikd_mil.yaml").read_text())
    (reversal,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("RoleReversal")]
    reversal["init_args"].update(stage1_epochs=1, first=2, every=2)  # switch after epoch 0, reverse after 2
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    args = ["fit", "--config", str(tmp_path / "run.yaml"), f"--data.init_args.root={root}",
            "--data.init_args.patch_size=[32,32]", "--data.init_args.crop_size=32", "--data.init_args.crop_stride=16",
            "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=2", "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    assert main(args) == 0
    (run,) = (tmp_path / "runs").glob("*/version_0")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert int(state["state_dict"]["stage"]) == 2 and state["callbacks"]["RoleReversal"]["round"] == 1
    assert any(k.startswith("teacher.") for k in state["state_dict"])
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("loss/mil") for r in rows) and any(r.get("loss/kd") for r in rows)
    per_case = list(csv.DictReader(open(run / "per_case_val.csv")))
    assert {"f1", "iou", "dice", "positive", "hd_cv"} <= set(per_case[0])
    assert len([r for r in rows if r.get("val/f1/mean")]) == 3  # one validation an epoch
    # the pool of each round, complete, and the last one equals the final teacher's maps
    for round_ in (0, 1):
        assert read_manifest(run / "pseudo_labels" / f"round_{round_:02d}")["round"] == round_
    with h5py.File(run / "pseudo_labels" / "round_01" / "pool.h5") as f:
        q, cases = f["q"][()], [c.decode() for c in f["case"][()]]
    assert cases == sorted(cases) and q.dtype == np.float16 and q.shape[1:] == (1, 32, 32)
    teacher = VGGMIL()
    teacher.load_state_dict({k[len("teacher."):]: v for k, v in state["state_dict"].items()
                             if k.startswith("teacher.")})
    from datamodules.glas import GlaSDataModule

    dm = GlaSDataModule(str(root), patch_size=(32, 32), crop_size=32, crop_stride=16, batch_size=4, num_workers=0)
    dm.setup("fit")
    index = {dm.datasets["labeled"][i]["case"]: i for i in range(len(dm.datasets["labeled"]))}
    with torch.no_grad():
        expected = teacher.eval()(dm.datasets["labeled"][index[cases[0]]]["image"][None])[3][0].numpy()
    assert np.allclose(q[0].astype(np.float32), expected, atol=1e-3)


def test_pool_and_online_teacher_give_the_same_step(tmp_path):
    from callbacks.pseudo_labels import PseudoPool

    torch.manual_seed(0)
    module = IKDMIL(net=VGGMIL())
    module.teacher = VGGMIL().requires_grad_(False).eval()
    module.stage.fill_(2)
    batch = {"image": torch.randn(3, 3, 16, 16), "bag_label": torch.tensor([1, 0, 1]), "case": ["a", "b", "c"]}
    with torch.no_grad():
        q = module.teacher(batch["image"])[3]
    with h5py.File(tmp_path / "pool.h5", "w") as f:
        f["q"] = q[[0, 2]].numpy()
        f["case"] = ["a", "c"]
    module.net.eval()  # no dropout/BN noise between the two steps
    online = module.training_step(batch, 0)
    module.pseudo_pool = PseudoPool(tmp_path / "pool.h5")
    pooled = module.training_step(batch, 0)
    assert torch.allclose(online, pooled)
    assert torch.equal(module.pseudo_pool.lookup(["b"], q[:1])[0], torch.zeros_like(q[0]))


@pytest.mark.parametrize("kill_step", [8, 9])
def test_sigkill_in_distillation_then_resume_equals_uninterrupted(tmp_path, kill_step):
    """Killed in stage 2 when ``kill_step`` steps are done: mid-epoch (8: the pool of round 0 written, the next
    reversal not yet) or at the next epoch's first batch (9: the last checkpoint is the one written after epoch
    2's validation, RoleReversal's best already updated since Lightning runs checkpoint callbacks last, and
    before its reversal, which the resumed run performs):
    the resumed run reopens the pool where the killed run wrote it and ends bit-identical to an uninterrupted run."""
    import os
    import subprocess
    import sys

    from tests.test_resume import KILL, final, identical

    root = make_glas(tmp_path / "glas")
    cfg = yaml.safe_load((REPO / "experiments" / "glas" / "ikd_mil.yaml").read_text())
    for callback in cfg["trainer"]["callbacks"]:
        if callback["class_path"].endswith("RoleReversal"):
            callback["init_args"].update(stage1_epochs=1, first=2, every=1)
        if callback.get("init_args", {}).get("save_last"):
            callback["init_args"]["every_n_train_steps"] = 1
    cfg["trainer"]["callbacks"].append({"class_path": "tests.test_resume.KillAt"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))

    def fit(out, *extra, kill=None):
        args = ["--config", str(tmp_path / "run.yaml"), f"--data.init_args.root={root}",
                "--data.init_args.patch_size=[32,32]", "--data.init_args.crop_size=32",
                "--data.init_args.crop_stride=16", "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
                "--trainer.max_epochs=4", "--trainer.limit_train_batches=3", "--trainer.log_every_n_steps=1",
                "--trainer.accelerator=cpu", "--trainer.deterministic=true", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={out}", *extra]
        env = {k: v for k, v in os.environ.items() if k != KILL} | {"OMP_NUM_THREADS": "1"} | \
            ({KILL: kill} if kill else {})
        return subprocess.run([sys.executable, "-m", "experiments", "fit", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    whole = fit(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = fit(tmp_path / "runs", kill=f"{kill_step}:1:{tmp_path / 'step1.ckpt'}")
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = fit(tmp_path / "runs", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (a, a_rows), (b, b_rows) = final(tmp_path / "runs"), final(tmp_path / "whole")
    start = int(a_rows[0]["step"]) - 1  # the step of the checkpoint the resumed run started from
    assert start == kill_step and a["global_step"] == b["global_step"] == 12
    for key in b["state_dict"]:
        assert identical(a["state_dict"][key], b["state_dict"][key]), key
    assert identical(a["optimizer_states"], b["optimizer_states"])
    assert identical(a["callbacks"]["RoleReversal"], b["callbacks"]["RoleReversal"])
    assert a_rows == [row for row in b_rows if int(row["step"]) > start]
    killed_run = next((tmp_path / "runs").glob("*/version_0"))
    assert a["callbacks"]["PseudoLabelRefresh"]["round"] == b["callbacks"]["PseudoLabelRefresh"]["round"] == 1
    assert (killed_run / "pseudo_labels" / "round_00" / "manifest.json").is_file()
