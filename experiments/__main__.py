"""`lemis` / `python -m experiments`: LightningCLI over every lemis module and DataModule.

    lemis fit --config experiments/acdc/mean_teacher.yaml [--trainer.devices=4 --trainer.strategy=ddp]
    lemis validate|test|predict --config ... --ckpt_path runs/.../checkpoints/last.ckpt

Bad input (a ``LemisError``: missing file, impossible budget, ...) prints one sentence and exits 2;
set LEMIS_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from datamodules.errors import LemisError
from experiments.host_memory import keep_freed_memory

# Library chatter that says nothing about the user's run.
for _pattern in (r".*isinstance\(treespec, LeafSpec\).*", r".*smaller than the logging interval.*",
                 r".*does not have many workers.*"):
    warnings.filterwarnings("ignore", message=_pattern)


class SaveAndLogConfig(SaveConfigCallback):
    """config.yaml in the run directory (Lightning's default) and the resolved config sent to W&B."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


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


class LemisCLI(LightningCLI):
    """LightningCLI with omegaconf interpolation; model and data are chosen by ``class_path``.

    The model's inference ROI is linked to the data's training patch (``data.init_args.patch_size`` ->
    ``model.init_args.roi_size``): a YAML interpolation would be resolved before command-line overrides and
    leave the two apart when a run overrides the patch.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.patch_size", "model.init_args.roi_size")

    def __init__(self, args=None, run: bool = True):
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")


def config_error_sentence(message: str) -> str:
    """One line out of jsonargparse's nested report: the parser key and the innermost complaint."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)":', lines[0]) if lines else None
    details = [line.lstrip("- ").rstrip(":") for line in lines[1 if key else 0:] if not line.startswith(_NOISE)]
    where = f" in {key.group(1)}: " if key else ": "
    return f"bad configuration{where}{'; '.join(details) or message}."


def main(args: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (2 for bad input)."""
    keep_freed_memory()
    wandb_offline_without_key()
    try:
        LemisCLI(args=args)
        finish_wandb()
    except (LemisError, ArgumentError) as err:
        if os.environ.get("LEMIS_DEBUG") == "1":
            raise
        text = config_error_sentence(str(err)) if isinstance(err, ArgumentError) else str(err)
        print(f"lemis: error: {text}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
