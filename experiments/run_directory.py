"""One run, one directory: a run claims ``runs/<experiment>/version_N`` before it writes anything, and never
writes into a directory that holds another run's files.

Lightning's CSV logger picks ``max(existing versions) + 1`` and creates it lazily, so two runs started together
pick the same N, and an explicit ``version`` reuses a finished run's directory (its ``metrics.csv`` is then
overwritten). Here the directory is created with ``mkdir`` (atomic: exactly one process succeeds) once the
configuration and the data have been checked, and handed to the logger.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from lemis.errors import ConfigError

VERSION = re.compile(r"^version_(\d+)$")


class RunDirectoryTaken(ConfigError):
    """An explicit ``trainer.logger.init_args.version`` names a directory that exists already."""


def is_global_zero() -> bool:
    """Rank 0 of the whole job, known before the strategy starts: torchrun, SLURM and Lightning's launcher set
    these variables for every other rank (``NODE_RANK`` for the first process of each further node)."""
    return getattr(rank_zero_only, "rank", 0) == 0 and os.environ.get("NODE_RANK", "0") == "0"


def claim(logger) -> Path | None:
    """Create the logger's version directory and fix the logger on it; None when there is nothing to claim
    (no versioned logger, or not rank 0: the other ranks write nothing and take rank 0's directory from
    ``trainer.log_dir``, which Lightning broadcasts).

    An explicit version must not exist yet; without one, the next free ``version_N`` is taken, counting up past
    any that another process creates meanwhile.
    """
    if logger is None or not hasattr(logger, "root_dir") or not hasattr(logger, "_version") or not is_global_zero():
        return None
    root = Path(logger.root_dir)
    root.mkdir(parents=True, exist_ok=True)
    if logger._version is not None:
        name = logger._version if isinstance(logger._version, str) else f"version_{logger._version}"
        path = root / name
        try:
            path.mkdir()
        except FileExistsError:
            raise RunDirectoryTaken(
                f"run directory {path} exists already (trainer.logger.init_args.version={logger._version!r}); a "
                f"run never writes beside another run's files: name a new version or leave it unset.") from None
        return path
    taken = [int(m.group(1)) for p in root.iterdir() if (m := VERSION.match(p.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            break
        except FileExistsError:
            version += 1
    logger._version = version
    return root / f"version_{version}"
