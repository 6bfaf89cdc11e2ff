"""PseudoLabelRefresh: a pool of teacher predictions, refreshed whenever the teacher changes, as run artefacts
(spec/methods/ikd_mil.md sec. 4; the design card's pseudo-label refresh), for any method with a teacher and a
``pseudo_pool`` slot (``lightning_modules.contracts.UsesPseudoPool``).

``source: pool``: when a callback that changes the teacher says so (``RoleReversal`` calls
``on_teacher_changed(trainer, pl_module, round)`` of every callback that has it: round 0 at the stage switch, k
after the k-th reversal), the teacher (eval mode, no grad) predicts every positive training item, and the maps go
to ``<run_dir>/pseudo_labels/round_{k:02d}/pool.h5`` (``q [N, 1, H, W]`` in ``dtype``, ``case`` ids) with a
``manifest.json`` (sha256, round, epoch) written last, both through temp files. Under DDP each rank predicts its
share, rank 0 gathers and writes, every rank then opens the same file. The module reads its batch's maps from
the pool (``PseudoPool.lookup``; negatives and items outside it are 0). A resumed run reopens the round its
checkpoint names after checking the manifest; a missing or damaged one is recomputed from the restored teacher.
``source: online``: nothing is written; the module queries the teacher each step (the published code; the same
numbers, since training has no augmentation).
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from lemis.errors import ConfigError
from lemis.files import atomic_path, read_manifest, run_directory, write_manifest

SOURCES = ("pool", "online")
DTYPES = {"float16": np.float16, "float32": np.float32}


class PseudoPool:
    """Read access to one round's maps by case id, opened lazily per process (DataLoader workers, DDP ranks)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: tuple[int, h5py.File] | None = None
        with h5py.File(self.path, "r") as f:
            self.rows = {c.decode() if isinstance(c, bytes) else str(c): i for i, c in enumerate(f["case"][()])}
            self.shape = tuple(f["q"].shape[1:])

    def _q(self) -> h5py.Dataset:
        if self._file is None or self._file[0] != os.getpid():
            self._file = (os.getpid(), h5py.File(self.path, "r"))
        return self._file[1]["q"]

    def lookup(self, cases: list[str], like: torch.Tensor) -> torch.Tensor:
        """The maps of ``cases`` as a float tensor shaped and placed like ``like`` [B, 1, H, W]; zeros for a case
        outside the pool (a negative item)."""
        out = torch.zeros_like(like)
        for b, case in enumerate(cases):
            if case in self.rows:
                out[b] = torch.from_numpy(self._q()[self.rows[case]].astype(np.float32)).to(like)
        return out


class PseudoLabelRefresh(L.Callback):
    def __init__(self, source: str = "pool", dtype: str = "float16", batch_size: int = 16):
        if source not in SOURCES:
            raise ConfigError(f"callbacks.pseudo_labels.PseudoLabelRefresh source must be one of {SOURCES}, got "
                              f"{source!r}.")
        if dtype not in DTYPES:
            raise ConfigError(f"callbacks.pseudo_labels.PseudoLabelRefresh dtype must be one of {list(DTYPES)}, got "
                              f"{dtype!r}.")
        self.source, self.dtype, self.batch_size = source, dtype, batch_size
        self.round: int | None = None
        self.current: Path | None = None  # the open round's folder (a resumed run reads it from the earlier run)

    # ---- the pool --------------------------------------------------------------------------------------------
    def folder(self, trainer, round_: int) -> Path:
        return run_directory(trainer) / "pseudo_labels" / f"round_{round_:02d}"

    @torch.no_grad()
    def predict(self, trainer, pl_module) -> tuple[list[str], np.ndarray]:
        """This rank's share of the positive training items and the teacher's fused maps of them."""
        dataset = trainer.datamodule.datasets["labeled"]
        positives = [i for i in range(len(dataset)) if int(dataset[i]["bag_label"]) == 1]
        mine = positives[trainer.global_rank::trainer.world_size]
        teacher = pl_module.teacher.eval()
        cases, maps = [], []
        for start in range(0, len(mine), self.batch_size):
            samples = [dataset[i] for i in mine[start:start + self.batch_size]]
            image = torch.stack([s["image"] for s in samples]).to(pl_module.device)
            maps.append(teacher(image)[3].float().cpu().numpy().astype(DTYPES[self.dtype]))
            cases += [s["case"] for s in samples]
        shape = (0, 1, *dataset[positives[0]]["image"].shape[1:]) if positives else (0, 1, 1, 1)
        return cases, np.concatenate(maps) if maps else np.zeros(shape, DTYPES[self.dtype])

    def write(self, trainer, pl_module, round_: int) -> None:
        """Predict, gather to rank 0, write pool.h5 then the manifest; every rank waits for the file."""
        cases, maps = self.predict(trainer, pl_module)
        if dist.is_available() and dist.is_initialized():
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (cases, maps))
            cases = [c for part in parts for c in part[0]]
            maps = np.concatenate([part[1] for part in parts])
        folder = self.folder(trainer, round_)
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            order = np.argsort(cases, kind="stable")  # a gather's rank order is not the items' order
            with atomic_path(folder / "pool.h5") as tmp, h5py.File(tmp, "w") as f:
                f["q"] = maps[order]
                f["case"] = np.array([cases[i] for i in order], dtype=h5py.string_dtype())
            write_manifest(folder, ["pool.h5"], {"round": round_, "epoch": trainer.current_epoch,
                                                 "source": "teacher"})
        trainer.strategy.barrier()

    def open(self, pl_module, folder: Path, round_: int) -> None:
        pl_module.pseudo_pool = PseudoPool(folder / "pool.h5")
        self.round, self.current = round_, folder

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def on_teacher_changed(self, trainer, pl_module, round_: int) -> None:
        if self.source == "online":
            return
        self.write(trainer, pl_module, round_)
        self.open(pl_module, self.folder(trainer, round_), round_)

    def on_train_start(self, trainer, pl_module) -> None:
        """After a resume (the teacher restored; also mid-epoch, where no epoch starts): reopen the checkpoint's
        round where it was written if its manifest still checks out, else recompute it from the teacher into this
        run's directory."""
        if self.round is None or self.source == "online":
            return
        folder = self.current
        if folder is None or read_manifest(folder) is None:
            self.write(trainer, pl_module, self.round)
            folder = self.folder(trainer, self.round)
        self.open(pl_module, folder, self.round)

    def state_dict(self) -> dict:
        return {"round": self.round, "folder": None if self.current is None else str(self.current)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.round = state_dict["round"]
        self.current = Path(state_dict["folder"]) if state_dict.get("folder") else None
