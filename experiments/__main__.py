"""`lemis` / `python -m experiments`: the lemis CLI (experiments.cli.LemisCLI).

    lemis fit --config experiments/acdc/mean_teacher.yaml [--trainer.devices=4 --trainer.strategy=ddp]
    lemis validate|test|predict --config ... --ckpt_path runs/.../checkpoints/last.ckpt

Bad input (a ``LemisError``: missing file, impossible budget, bad checkpoint, ...) prints one sentence and exits 2;
Ctrl-C prints where the last checkpoint is and exits 130. LEMIS_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

from experiments.cli import Interrupted, LemisCLI, config_error_sentence
from experiments.host_memory import keep_freed_memory
from lemis.errors import LemisError

# Library chatter that says nothing about the user's run.
for _pattern in (r".*isinstance\(treespec, LeafSpec\).*", r".*smaller than the logging interval.*",
                 r".*does not have many workers.*"):
    warnings.filterwarnings("ignore", message=_pattern)


def wandb_offline_without_key() -> None:
    """W&B runs offline (files under the run directory, `wandb sync` later) unless a key or mode is set."""
    netrc = Path.home() / ".netrc"
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") or logged_in):
        os.environ["WANDB_MODE"] = "offline"


def finish_wandb() -> None:
    """Close a W&B run so its files (config.yaml, summary) are complete when the process ends."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def main(args: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (2 for bad input, 130 for Ctrl-C)."""
    keep_freed_memory()
    wandb_offline_without_key()
    try:
        LemisCLI(args=args)
        finish_wandb()
    except (LemisError, ArgumentError, Interrupted, KeyboardInterrupt) as err:
        if os.environ.get("LEMIS_DEBUG") == "1":
            raise
        if isinstance(err, KeyboardInterrupt):
            err = Interrupted("interrupted before the run started; nothing was written.")
        text = config_error_sentence(str(err)) if isinstance(err, ArgumentError) else str(err)
        print(f"lemis: {'' if isinstance(err, Interrupted) else 'error: '}{text}", file=sys.stderr)
        return 130 if isinstance(err, Interrupted) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
