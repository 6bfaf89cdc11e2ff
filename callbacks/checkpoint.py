"""ResumableCheckpoint: Lightning's ModelCheckpoint for runs that are killed and resumed with
``lemis fit --config X --ckpt_path last``."""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint

LAST = re.compile(rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}(-v?\d+)?{re.escape(ModelCheckpoint.FILE_EXTENSION)}$")


def last_checkpoints(folder: str) -> set[str]:
    """Every ``last.ckpt`` (or ``last-vN.ckpt``) in ``folder``, a path or a glob (``runs/x/*/checkpoints``)."""
    return {str(p) for p in glob.glob(os.path.join(folder, "*")) if LAST.match(Path(p).name)}


def newest(paths) -> str | None:
    """The most recently written of ``paths`` (Lightning's rule for ``--ckpt_path last``), or None; ``paths``
    may hold sets of paths."""
    flat = [p for group in paths for p in ([group] if isinstance(group, str) else group)]
    existing = [p for p in flat if p and os.path.isfile(p)]
    return max(existing, key=os.path.getmtime) if existing else None


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same options) with what a resumed run needs:

    - A periodic ``last.ckpt`` (``save_last: true, save_top_k: 0, every_n_train_steps: k``; a kill loses at most k
      steps) is written after the validation that runs at that step, not before it: the file then holds the
      validated state (logged metrics, best score), and the resumed run does not skip that validation, as
      Lightning does when it resumes from a checkpoint written before it.
    - ``last.ckpt`` is also written when training ends, whatever ``max_steps`` is.
    - ``--ckpt_path last`` finds the checkpoint of the killed process: a new process logs into a new
      ``version_N`` directory (the CSV logger would delete the old one's metrics.csv), where Lightning alone looks
      and finds nothing; this also looks in the experiment's other versions, and the newest last checkpoint wins.
    - The state (best score, top-k paths) is restored although the directory changed (Lightning then restores
      only ``best_model_path``), so best-on-validation selection continues across the resume.
    - Files are written next to their final name and renamed into place, so a kill mid-write never leaves a
      truncated checkpoint (Lightning writes to the system temp directory and moves the file, a copy when that
      is another filesystem).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._after_validation = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._after_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._after_validation and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        self._after_validation = False

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        if not isinstance(get_filesystem(filepath), LocalFileSystem):  # object stores: no rename, no torn files
            super()._save_checkpoint(trainer, filepath)
            return
        partial = f"{filepath}.partial"
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        self._last_checkpoint_saved = filepath

    def _find_last_checkpoints(self, trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        if found or self.dirpath is not None or not trainer.loggers:
            return found
        logger = trainer.loggers[0]
        return last_checkpoints(str(Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / "*"
                                    / "checkpoints"))

    def load_state_dict(self, state_dict: dict) -> None:
        dirpath = self.dirpath
        self.dirpath = state_dict.get("dirpath", dirpath)
        super().load_state_dict(state_dict)
        self.dirpath = dirpath
