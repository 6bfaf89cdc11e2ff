"""Guards: stop a run cleanly when training diverges."""
from __future__ import annotations

import lightning as L
import torch

from lemis.errors import LemisError


class NonFiniteLoss(LemisError):
    """The training loss became NaN or infinite."""


class NonFiniteGuard(L.Callback):
    """Stops the run at the first NaN/inf training loss with a message naming the step.

    It raises before any checkpoint of that step is written (Lightning runs ModelCheckpoint after the other
    callbacks and saves nothing on an exception), so ``last.ckpt`` stays the last good state. The check is one
    scalar sync every ``every_n_steps`` steps.
    """

    def __init__(self, every_n_steps: int = 1):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        step = trainer.global_step  # the step just taken, counted from 1 as in every file of the run
        if loss is None or step % self.every_n_steps:
            return
        if not bool(torch.isfinite(loss.detach())):
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise NonFiniteLoss(f"training loss is {float(loss):g} at step {step}; the run stopped and the last "
                                f"good checkpoint is {last}.")
