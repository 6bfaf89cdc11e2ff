"""EMATeacher: the Mean Teacher's teacher as an exponential moving average of the student's parameters."""
from __future__ import annotations

import copy

import lightning as L
import torch
import torch.distributed as dist


class EMATeacher(L.Callback):
    """Creates ``pl_module.teacher`` (a frozen deep copy of ``pl_module.net``) and updates it after every
    optimizer step: theta_T <- alpha_t theta_T + (1 - alpha_t) theta_S with alpha_t = ``pl_module.teacher_alpha(t)``,
    t = the index of the optimizer step just taken. The module owns the schedule (MeanTeacher:
    min(1 - 1/(t+1), ema_decay), mean_teacher.md sec. 1 step 7), so a config or sweep sets it in one place
    (``model.init_args.ema_decay``).

    Only parameters are averaged; the teacher's BatchNorm buffers evolve from its own train-mode forwards,
    as in both published codes. Under DDP every rank averages the same student, so parameters agree; the
    buffers come from each rank's own batches, so they are broadcast from rank 0 after each update and the
    whole teacher is identical everywhere. The teacher is a registered submodule, so its weights travel with
    the module's state dict (checkpoints, devices, DDP); the callback's own state is the last step it applied.
    """

    def __init__(self):
        self.last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Created for every stage so a checkpoint holding teacher weights loads strictly in validate/test too.
        if getattr(pl_module, "teacher", None) is None:
            teacher = copy.deepcopy(pl_module.net)
            teacher.requires_grad_(False)
            pl_module.teacher = teacher

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # global_step already counts the step just taken
        if step <= self.last_step:  # gradient accumulation: no optimizer step on this batch
            return
        self.last_step = step
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
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s floating-point buffers into every rank's ``module`` with one collective."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.broadcast(flat, src)
    chunks = flat.split([b.numel() for b in buffers])
    torch._foreach_copy_(buffers, [c.view_as(b) for c, b in zip(chunks, buffers)])
