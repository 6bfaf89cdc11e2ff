"""Every private Lightning member lemis relies on, in one list, and a check that they are all still there.

Public hooks are used wherever they suffice; these are the places they do not: checkpoints written after the
same-step validation and found across version folders (callbacks/checkpoint.py), the checkpoint and
subcommand rules of the CLI (experiments/cli.py), and the logger version a run claims
(experiments/run_directory.py). pyproject pins ``lightning<2.7``; tests/test_lightning_private.py fails, naming
the member, when an upgrade removes one.
"""
from __future__ import annotations

import importlib

_USED = {  # owner -> (members, the lemis piece that uses them)
    "lightning.pytorch.callbacks.ModelCheckpoint": (
        ("_every_n_train_steps", "_monitor_candidates", "_save_topk_checkpoint", "_save_last_checkpoint",
         "_should_skip_saving_checkpoint", "_save_checkpoint", "_find_last_checkpoints", "_last_checkpoint_saved"),
        "ResumableCheckpoint"),
    "lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop": (("_should_check_val_fx",),
                                                                       "ResumableCheckpoint"),
    "lightning.pytorch.loops.fit_loop._FitLoop": (("_data_fetcher",), "ResumableCheckpoint"),
    "lightning.pytorch.cli.LightningCLI": (("_parse_ckpt_path", "_run_subcommand", "_prepare_subcommand_parser",
                                            "_subcommand_parsers"), "LemisCLI"),
    "lightning.pytorch.loggers.CSVLogger": (("_version",), "run_directory.claim"),
}
PRIVATE = [(owner, name, user) for owner, (names, user) in _USED.items() for name in names]


def missing() -> list[str]:
    """The listed members this Lightning no longer has (instance attributes are looked up on an instance)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    instances = {"lightning.pytorch.callbacks.ModelCheckpoint": ModelCheckpoint(),
                 "lightning.pytorch.loggers.CSVLogger": CSVLogger("/nonexistent-lemis-check")}
    gone = []
    for path, name, user in PRIVATE:
        module, cls = path.rsplit(".", 1)
        owner = getattr(importlib.import_module(module), cls)
        probe = instances.get(path, owner)
        if not hasattr(probe, name) and not _set_in_init(owner, name):
            gone.append(f"{path}.{name} (used by {user})")
    return gone


def _set_in_init(owner: type, name: str) -> bool:
    """Attributes a class sets in ``__init__`` (or other methods) but not on the class: found in its source."""
    import inspect

    try:
        return f"self.{name}" in inspect.getsource(owner)
    except (OSError, TypeError):
        return False
