"""Label hierarchies: fine (subclass) classes grouped into coarse (superclass) classes (spec/methods/subclass.md 1).

``mapping`` {superclass id: [fine ids]}; class 0 is background at both levels. The fine ids of a superclass are
consecutive and ascending and the superclasses ascending, so a head can lay out its fine channels superclass by
superclass; every fine class 1..K_f-1 belongs to exactly one superclass. Used by the DataModules (the coarse mask
of every training case, option ``coarse_mapping``) and by methods that train on it (``lightning_modules.subclass``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lemis.errors import ConfigError


@dataclass(frozen=True)
class Hierarchy:
    """A checked mapping. ``parent[k]``: the superclass of fine class k (``parent[0] = 0``); ``groups[c - 1]``:
    the fine ids of superclass c, in order."""

    groups: tuple[tuple[int, ...], ...]

    @classmethod
    def from_mapping(cls, mapping: dict, option: str = "data.init_args.coarse_mapping") -> "Hierarchy":
        """{1: [1, 2, 3]} -> Hierarchy; a mapping a head cannot lay out raises one sentence naming ``option``."""
        try:
            items = sorted((int(c), [int(k) for k in fine]) for c, fine in dict(mapping).items())
        except (TypeError, ValueError):
            raise ConfigError(f"{option} must map superclass ids to lists of fine ids, got {mapping!r}.") from None
        supers = [c for c, _ in items]
        if supers != list(range(1, len(items) + 1)):
            raise ConfigError(f"{option}: superclass ids must be 1..{len(items)} (0 is background), got {supers}.")
        flat = [k for _, fine in items for k in fine]
        if not all(fine for _, fine in items) or flat != list(range(1, len(flat) + 1)):
            raise ConfigError(f"{option}: the fine ids, superclass by superclass, must run 1, 2, ... without gaps "
                              f"or repeats (consecutive and ascending within a superclass), got {dict(items)}.")
        return cls(tuple(tuple(fine) for _, fine in items))

    @property
    def num_coarse(self) -> int:
        """K_c, background included."""
        return len(self.groups) + 1

    @property
    def num_fine(self) -> int:
        """K_f, background included."""
        return sum(len(g) for g in self.groups) + 1

    @property
    def parent(self) -> tuple[int, ...]:
        """[K_f]: the superclass of each fine class, background's is 0."""
        return (0,) + tuple(c for c, fine in enumerate(self.groups, 1) for _ in fine)

    @property
    def mapping(self) -> dict[int, list[int]]:
        return {c: list(fine) for c, fine in enumerate(self.groups, 1)}

    def coarse(self, fine):
        """coarse[s] = parent[fine[s]] for a numpy array or a torch tensor of fine ids (same type and shape);
        ids beyond K_f - 1 map to background (``base_dataset.py``); callers check the range first."""
        if isinstance(fine, torch.Tensor):
            table = torch.tensor(self.parent, dtype=fine.dtype, device=fine.device)
            return torch.where(fine < self.num_fine, table[fine.clamp(0, self.num_fine - 1)], 0)
        table = np.asarray(self.parent, dtype=np.int64)
        fine = np.asarray(fine)
        inside = (fine >= 0) & (fine < self.num_fine)
        return np.where(inside, table[np.clip(fine, 0, self.num_fine - 1)], 0).astype(fine.dtype, copy=False)
