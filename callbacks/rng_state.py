"""RNGState: the global random generators travel with checkpoints, so a resumed run draws what an uninterrupted
one would have drawn."""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


def rng_states() -> dict:
    """The states of torch (CPU and every CUDA device), numpy and Python ``random``, in types that a
    ``weights_only`` checkpoint load accepts (numpy's key array becomes a tensor)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])


class RNGState(L.Callback):
    """Keeps training's random draws (Mean Teacher noise, dropout, ...) a function of the seed and the step.

    The generators are captured after every training step and put back before the next one. So a checkpoint holds
    the state the next step starts from, wherever it is written (after the step or after the validation that
    follows it), and nothing that runs between steps shifts training's draws: not validation, not a resumed run's
    start-up (building the model and the loaders draws from the same generators). Data augmentation does not use
    these generators (each sample has its own seed, ``datamodules.streams.seeded``).

    Under DDP the checkpoint holds rank 0's states and every rank resumes from them: with one seed on every rank
    and the same draws per step, the ranks' CPU states are the same anyway.
    """

    def __init__(self):
        self.states: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.states is not None:
            set_rng_states(self.states)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states = rng_states()

    def state_dict(self) -> dict:
        return {"states": self.states if self.states is not None else rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.states = state_dict["states"]
