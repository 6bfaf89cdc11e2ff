"""EMATeacher: the teacher of a ``contracts.TeacherMethod`` as an exponential moving average of the student."""
from __future__ import annotations

import copy

import lightning as L
import torch
import torch.distributed as dist

from lemis.errors import ConfigError
from lightning_modules.contracts import TeacherMethod


class EMATeacher(L.Callback):
    """Creates ``pl_module.teacher`` (a frozen deep copy of ``pl_module.net``) and is its only writer: after every
    optimizer step t (0-based), theta_T <- alpha theta_T + (1 - alpha) theta_S with alpha = the module's
    ``teacher_alpha(t)`` (MeanTeacher: min(1 - 1/(t+1), ema_decay), mean_teacher.md sec. 1 step 7), so a config or
    sweep sets the schedule in one place (``model.init_args.ema_decay``).

    mode ``single``: only parameters are averaged; the teacher's BatchNorm buffers evolve from its own train-mode
    forwards, as in both published codes. mode ``double`` (the SGRS-Net code, sgrs.md sec. 7): first the code's
    WeightEMA, e <- d e + (1 - d) s for every float32 state entry (BatchNorm statistics too) with d = ``ema_decay``,
    which also decays the student, s <- s (1 - ``student_decay``); then the EMA above with the step counted after
    its increment, alpha = teacher_alpha(t + 1).

    Under DDP every rank averages the same student, so parameters agree; the buffers come from each rank's own
    batches, so they are broadcast from rank 0 after each update and the whole teacher is identical everywhere.
    The teacher is a registered submodule, so its weights travel with the module's state dict (checkpoints,
    devices, DDP); the callback's own state is the last step it applied.
    """

    MODES = ("single", "double")

    def __init__(self, mode: str = "single", student_decay: float = 0.02 * 0.01):
        if mode not in self.MODES:
            raise ConfigError(f"callbacks.ema_teacher.EMATeacher mode must be one of {self.MODES}, got {mode!r}.")
        self.mode, self.student_decay = mode, student_decay
        self.last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(pl_module, TeacherMethod):
            raise ConfigError(f"callbacks.ema_teacher.EMATeacher needs a teacher method (lightning_modules.contracts"
                              f".TeacherMethod), got {type(pl_module).__name__}.")
        # Created for every stage so a checkpoint holding teacher weights loads strictly in validate/test too.
        if pl_module.teacher is None:
            teacher = copy.deepcopy(pl_module.net)
            teacher.requires_grad_(False)
            pl_module.teacher = teacher

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # global_step already counts the step just taken
        if step <= self.last_step:  # gradient accumulation: no optimizer step on this batch
            return
        self.last_step = step
        if self.mode == "double":
            weight_ema_step(pl_module.teacher, pl_module.net, pl_module.ema_decay, self.student_decay)
            step += 1
        self.update(pl_module.teacher, pl_module.net, pl_module.teacher_alpha(step))
        if trainer.world_size > 1:
            broadcast_buffers(pl_module.teacher)

    @staticmethod
    @torch.no_grad()
    def update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
        """One vectorised EMA step: theta_T <- theta_T + (1 - alpha) (theta_S - theta_T)."""
        torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1.0 - alpha)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = state_dict["last_step"]


@torch.no_grad()
def weight_ema_step(teacher: torch.nn.Module, student: torch.nn.Module, decay: float, student_decay: float) -> None:
    """The SGRS code's WeightEMA: for every float32 state entry (parameters AND BatchNorm statistics)
    e <- decay e + (1 - decay) s, then s <- s (1 - student_decay)."""
    for e, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        if e.dtype == torch.float32:
            e.mul_(decay).add_(s, alpha=1 - decay)
            s.mul_(1 - student_decay)


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s floating-point buffers into every rank's ``module`` with one collective."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.broadcast(flat, src)
    chunks = flat.split([b.numel() for b in buffers])
    torch._foreach_copy_(buffers, [c.view_as(b) for c, b in zip(chunks, buffers)])
