"""Writing result files so that no reader ever sees half of one and no earlier file is lost on a crash."""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for the block to write; moved onto ``path`` (``os.replace``) when the
    block ends, removed if it raises. The parent folder is created.

    The writer creates the file itself (``open``, h5py, PIL), so it gets the user's umask like every other file
    (``tempfile.mkstemp`` would make it 0600); the name carries the process id and a random part, so two
    processes writing one path never share a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
