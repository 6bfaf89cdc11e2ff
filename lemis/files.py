"""Writing result files so that no reader ever sees half of one and no earlier file is lost on a crash."""
from __future__ import annotations

import hashlib
import json
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


MANIFEST = "manifest.json"


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, files, extra: dict | None = None) -> dict:
    """The artefact record of a folder another stage or callback will read: the sha256 of each of ``files``
    (relative to ``folder``) and ``extra``, written atomically as ``<folder>/manifest.json``, last: its presence
    says the folder is complete."""
    folder = Path(folder)
    record = {"files": {str(f): sha256_of(folder / f) for f in files}, **(extra or {})}
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    return record


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a complete folder whose files still have their recorded digests, else None."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    for name, digest in record.get("files", {}).items():
        file = Path(folder) / name
        if not file.is_file() or sha256_of(file) != digest:
            return None
    return record


def manifest_digest(folder: str | os.PathLike) -> str | None:
    """sha256 of a folder's manifest file (None without one): changes whenever the folder's record does."""
    path = Path(folder) / MANIFEST
    return sha256_of(path) if path.is_file() else None


def run_directory(trainer) -> Path | None:
    """The run's directory, ``trainer.log_dir``: a collective under DDP (rank 0's directory is broadcast), so
    every rank must call this, also those that write nothing; None without a logger."""
    log_dir = trainer.log_dir
    return Path(log_dir) if log_dir else None
