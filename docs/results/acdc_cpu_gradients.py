"""Diagnostic of docs/results/acdc_cpu.md: how much the consistency term of a finished Mean Teacher run moves the
student, and how good its teacher is.

For the run's last checkpoint (student, teacher and the step it ended at) and ``--batches`` training batches of
the run's own configuration (labeled + unlabeled halves, the run's augmentation), it computes, per batch, the
gradients over the student's parameters of L_sup and of L_cons (unweighted; teacher in the run's mode on noisy
x_u, as in training), and prints their norms, the ratio |w(T) grad L_cons| / |grad L_sup| at the run's last
consistency weight w(T), and their cosine. Then it scores student and teacher (eval mode) on val.list.

    .venv/bin/python docs/results/acdc_cpu_gradients.py runs/compare/acdc_cpu/mean_teacher_c10/seed1 [--batches 8]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.cli import LemisCLI  # noqa: E402
from lightning_modules import losses  # noqa: E402
from lightning_modules.metrics import case_metrics, summarize  # noqa: E402


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def val_dice(module, net, datamodule) -> float:
    """Mean Dice (%) over val.list of ``net`` in eval mode, predicted as the module predicts a case."""
    student, module.net = module.net, net
    module.resolve_roi(datamodule)
    rows = []
    try:
        net.eval()
        for case in datamodule.val_dataloader():
            with torch.no_grad():
                pred = module.label_map(module.predict_case(case["image"]))[0].numpy()
            rows += case_metrics(pred, case["label"][0].numpy(), module.hparams.num_classes, case["case"][0],
                                 empty_convention=module.hparams.empty_convention)
    finally:
        module.net = student
    return 100 * summarize(rows)["dice/mean"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path, help="a compare run folder (holding version_*/)")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # LightningCLI below takes its arguments from args=, not from this command line
    version = sorted(args.run.glob("version_*"))[-1]
    with tempfile.TemporaryDirectory() as out:
        config = yaml.safe_load((version / "config.yaml").read_text())
        config = {k: config[k] for k in ("seed_everything", "trainer", "model", "data")}  # no subcommand options
        (Path(out) / "config.yaml").write_text(yaml.safe_dump(config))
        cli = LemisCLI(args=["--config", str(Path(out) / "config.yaml"), "--trainer.enable_progress_bar=false",
                             f"--trainer.logger.init_args.save_dir={out}"], run=False)
    module, datamodule = cli.model, cli.datamodule
    state = torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    module.teacher = copy.deepcopy(module.net)  # the slot EMATeacher fills in a run
    module.load_state_dict(state["state_dict"])
    step = state["global_step"]
    weight = module.consistency_weight(step - 1)
    datamodule.setup("fit")
    # scored first: the train-mode passes below move BatchNorm's running statistics
    scores = (f"student {val_dice(module, module.net, datamodule):.1f} %, "
              f"teacher {val_dice(module, module.teacher, datamodule):.1f} % (eval mode)")
    torch.manual_seed(0)
    loader = iter(datamodule.train_dataloader())
    params = [p for p in module.net.parameters() if p.requires_grad]
    sup_norms, cons_norms, cosines = [], [], []
    module.net.train()
    for _ in range(args.batches):
        batch = next(loader)
        batch = batch[0] if isinstance(batch, tuple) else batch
        lab, unl = batch["labeled"], batch["unlabeled"]
        logits = module.logits(module.net(torch.cat([lab["image"], unl["image"]])))
        with torch.no_grad():
            module.teacher.train(module.hparams.teacher_mode == "train")
            teacher_probs = torch.softmax(module.logits(module.teacher(module.teacher_input(unl["image"]))), 1)
        n = lab["image"].shape[0]
        g_sup = flat_grad(module.supervised_loss(logits[:n], lab["label"]), params)
        g_cons = flat_grad(losses.softmax_mse(torch.softmax(logits[n:], 1), teacher_probs), params)
        sup_norms.append(g_sup.norm().item())
        cons_norms.append(g_cons.norm().item())
        cosines.append(torch.nn.functional.cosine_similarity(g_sup, g_cons, dim=0).item())
    sup, cons = np.array(sup_norms), np.array(cons_norms)
    ratio = weight * cons / sup
    print(f"{args.run}: step {step}, w(T) = {weight:.4g}, {args.batches} batches")
    print(f"  |grad L_sup| {sup.mean():.4g} (sd {sup.std():.2g}), |grad L_cons| {cons.mean():.4g} "
          f"(sd {cons.std():.2g}), unweighted ratio {np.mean(cons / sup):.3g}")
    print(f"  |w grad L_cons| / |grad L_sup| = {ratio.mean():.3g} ({ratio.min():.3g}..{ratio.max():.3g}), "
          f"cosine {np.mean(cosines):+.3f}")
    print(f"  val.list mean Dice: {scores}")


if __name__ == "__main__":
    main()
