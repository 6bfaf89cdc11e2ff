"""RoleReversal: IKD-MIL's stage switch and teacher/student role reversals (spec/methods/ikd_mil.md sec. 4).

The only writer of a module's ``teacher`` and ``stage`` (``lightning_modules.ikd_mil.IKDMIL``). Epochs are
0-based and counted after each epoch's training and validation:
0. At the end of epoch ``stage1_epochs - 1``: teacher <- the best stage-1 weights of ``net`` by ``monitor``
   (frozen, eval mode); ``net`` <- its initial weights (the student starts from its own initialisation); the
   optimizer state is cleared (the code's student optimizer had never stepped); stage 2 begins.
1. In stage 2, the best student weights by ``monitor`` are kept (parameters and BatchNorm buffers).
2. At the end of an epoch e >= ``first`` with e % ``every`` == 0: teacher <- the best student (``teacher_from:
   current``: the current one); student <- the previous teacher (``student_from: previous_teacher``, the paper's
   swap) or <- the new teacher (``teacher``: the released code, whose ``state_dict`` aliasing gives both nets the
   best-student weights, quirk Q4). Weights are copied in place, so the optimizer keeps the student's parameter
   objects; ``optimizer_state: keep`` leaves Adam's moments, ``reset`` clears them.
After the switch and each reversal, every callback with an ``on_teacher_changed(trainer, pl_module, round)`` hook
is called (``callbacks.pseudo_labels.PseudoLabelRefresh`` refreshes its pool there). The state (initial and best
weights, best score, round) travels with checkpoints; the stage is the module's buffer.
"""
from __future__ import annotations

import copy

import lightning as L
import torch

from lemis.errors import ConfigError

TEACHER_FROM = ("best", "current")
STUDENT_FROM = ("previous_teacher", "teacher")
OPTIMIZER_STATE = ("keep", "reset")


def cloned(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class RoleReversal(L.Callback):
    def __init__(self, stage1_epochs: int = 31, first: int = 60, every: int = 30, teacher_from: str = "best",
                 student_from: str = "previous_teacher", optimizer_state: str = "keep",
                 monitor: str = "val/f1/mean"):
        for name, value, allowed in (("teacher_from", teacher_from, TEACHER_FROM),
                                     ("student_from", student_from, STUDENT_FROM),
                                     ("optimizer_state", optimizer_state, OPTIMIZER_STATE)):
            if value not in allowed:
                raise ConfigError(f"callbacks.role_reversal.RoleReversal {name} must be one of {allowed}, got "
                                  f"{value!r}.")
        if stage1_epochs < 1 or every < 1 or first < stage1_epochs:
            raise ConfigError(f"callbacks.role_reversal.RoleReversal needs stage1_epochs >= 1, every >= 1 and first "
                              f">= stage1_epochs, got {stage1_epochs}, {every}, {first}.")
        self.stage1_epochs, self.first, self.every = stage1_epochs, first, every
        self.teacher_from, self.student_from, self.optimizer_state = teacher_from, student_from, optimizer_state
        self.monitor = monitor
        self.initial: dict | None = None
        self.best: dict | None = None
        self.best_score = float("-inf")
        self.round = -1  # 0 at the stage switch, k after the k-th reversal

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Created for every stage so a checkpoint holding teacher weights loads strictly in validate/test too.
        if getattr(pl_module, "teacher", None) is None:
            pl_module.teacher = copy.deepcopy(pl_module.net).requires_grad_(False)
        if self.initial is None:
            self.initial = cloned(pl_module.net)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if score > self.best_score:
            self.best_score, self.best = score, cloned(pl_module.net)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if int(pl_module.stage) == 1 and epoch == self.stage1_epochs - 1:
            self.switch_stage(trainer, pl_module)
        elif int(pl_module.stage) == 2 and epoch >= self.first and epoch % self.every == 0:
            self.reverse(trainer, pl_module)

    @torch.no_grad()
    def switch_stage(self, trainer, pl_module) -> None:
        pl_module.teacher.load_state_dict(self.best or cloned(pl_module.net))
        pl_module.teacher.eval().requires_grad_(False)
        pl_module.net.load_state_dict(self.initial)
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        pl_module.stage.fill_(2)
        self.best, self.best_score, self.round = None, float("-inf"), 0
        self.announce(trainer, pl_module)

    @torch.no_grad()
    def reverse(self, trainer, pl_module) -> None:
        previous_teacher = cloned(pl_module.teacher)
        new_teacher = self.best if self.teacher_from == "best" and self.best is not None else cloned(pl_module.net)
        pl_module.teacher.load_state_dict(new_teacher)
        pl_module.net.load_state_dict(previous_teacher if self.student_from == "previous_teacher" else new_teacher)
        if self.optimizer_state == "reset":
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
        self.round += 1
        self.announce(trainer, pl_module)

    def announce(self, trainer, pl_module) -> None:
        """Tell every callback with an ``on_teacher_changed`` hook (``PseudoLabelRefresh``) the new round."""
        for callback in getattr(trainer, "callbacks", []):
            hook = getattr(callback, "on_teacher_changed", None)
            if hook is not None:
                hook(trainer, pl_module, self.round)

    def state_dict(self) -> dict:
        return {"initial": self.initial, "best": self.best, "best_score": self.best_score, "round": self.round}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial, self.best = state_dict["initial"], state_dict["best"]
        self.best_score, self.round = state_dict["best_score"], state_dict["round"]
