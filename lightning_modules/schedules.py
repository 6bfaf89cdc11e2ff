"""LR schedules as LambdaLR classes, named by ``class_path`` in a YAML's ``model.init_args.lr_scheduler``.

The module builds them with ``total_steps`` filled in from the trainer when a schedule needs a length and the
config leaves it unset (``trainer.max_steps`` for ``lr_interval: step``, ``trainer.max_epochs`` for ``epoch``).
``t`` below is the scheduler's count of its own ``step()`` calls (optimizer steps or epochs), 0 at the start.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def poly_factor(t: int, total_steps: int, power: float = 0.9) -> float:
    """SSL4MIS poly: the LR used at step t+1 is set after step t to (1 - t/T)^power, so steps 0 and 1 both use the
    base LR: factor(t) = (1 - max(t - 1, 0) / T)^power, 0 past the end."""
    return max(1.0 - max(t - 1, 0) / total_steps, 0.0) ** power


class Poly(LambdaLR):
    """lr_t = lr (1 - max(t - 1, 0)/T)^power (SSL4MIS, power 0.9; power 1 is the linear decay)."""

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None, power: float = 0.9):
        if not total_steps or total_steps <= 0:
            raise ValueError(f"Poly needs total_steps > 0 (trainer.max_steps or max_epochs), got {total_steps}")
        self.total_steps, self.power = total_steps, power
        super().__init__(optimizer, self.factor)

    def factor(self, t: int) -> float:
        return poly_factor(t, self.total_steps, self.power)


class StepDecay(LambdaLR):
    """lr_t = lr gamma^(t // step_size) (UA-MT: 2500, 0.1: steps 0..2499 use lr, 2500..4999 0.1 lr, ...)."""

    def __init__(self, optimizer: Optimizer, step_size: int = 2500, gamma: float = 0.1):
        if step_size < 1:
            raise ValueError(f"StepDecay needs step_size >= 1, got {step_size}")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, self.factor)

    def factor(self, t: int) -> float:
        return self.gamma ** (t // self.step_size)


class Constant(LambdaLR):
    """lr_t = lr."""

    def __init__(self, optimizer: Optimizer):
        super().__init__(optimizer, self.factor)

    @staticmethod
    def factor(t: int) -> float:
        return 1.0


class WarmupCosine(LambdaLR):
    """Linear warm-up over ``warmup_steps`` from lr/warmup_steps, then cosine from lr to lr * ``min_factor`` at T:
    factor(t) = (t + 1)/W for t < W, else m + (1 - m)(1 + cos(pi (t - W)/(T - W)))/2."""

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None, warmup_steps: int = 0,
                 min_factor: float = 0.0):
        if not total_steps or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"WarmupCosine needs 0 <= warmup_steps < total_steps, got {warmup_steps} and "
                             f"{total_steps}")
        self.total_steps, self.warmup_steps, self.min_factor = total_steps, warmup_steps, min_factor
        super().__init__(optimizer, self.factor)

    def factor(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        progress = min((t - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
