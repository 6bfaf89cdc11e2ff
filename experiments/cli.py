"""LemisCLI: LightningCLI over every lemis module and DataModule, with the checks a run needs before it writes.

Order of one command (each step can refuse with one sentence, before anything is written):

1. the config files parse as YAML (the error names the file and line), then the command line (no abbreviated
   options: ``--trainer.max_step`` is an error, not ``max_steps``);
2. ``--ckpt_path``: the file exists and is a checkpoint (``last``: the experiment's newest ``last.ckpt``, recorded
   in config.yaml as the file it found). ``fit`` resumes only under the configuration the checkpoint was trained
   with; ``validate/test/predict`` need a checkpoint and take the trained net from it, every other option from
   the command line and config;
3. the DataModule reads and checks every file it will use (``setup``) and the model checks itself against the
   trainer and data (``check_setup``: classes, net output, schedule);
4. the run directory is claimed (``experiments.run_directory``), then Lightning runs. Ctrl-C ends with a sentence
   saying where the last checkpoint is and how to resume.
"""
from __future__ import annotations

import logging
import re
import shlex
import shutil
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core import rank_zero as lightning_rank_zero

from callbacks.checkpoint import last_checkpoints, newest
from experiments import run_directory
from lemis.errors import ConfigError, LemisError

# Keys a resumed run may change without changing what it computes: where it logs, how it shows progress, how
# many loader workers feed it (batches do not depend on them), and the resume options themselves.
RESUME_MAY_CHANGE = ("ckpt_path", "config", "allow_config_change", "trainer.logger", "trainer.enable_progress_bar",
                     "trainer.enable_model_summary", "data.init_args.num_workers")
CONFIG_KEY = "lemis_config"  # the resolved configuration, saved in every checkpoint


class CheckpointError(LemisError):
    """``--ckpt_path`` is missing, unreadable, or not a checkpoint."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) during a run; the message says where the last checkpoint is."""


def config_as_dict(parser, config) -> dict:
    """The resolved configuration of one subcommand as plain YAML types (link targets left out: they follow)."""
    return yaml.safe_load(parser.dump(config, skip_none=False))


def flatten(tree, prefix: str = "") -> dict:
    """{"a": {"b": [1, 2]}} -> {"a.b.0": 1, "a.b.1": 2}."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    out = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out or {prefix: tree}


def differences(saved: dict, current: dict, ignore=RESUME_MAY_CHANGE) -> list[str]:
    """``key: old -> new`` for every leaf that differs, leaving out the keys (and their children) in ``ignore``."""
    a, b = flatten(saved), flatten(current)
    skip = lambda key: any(key == k or key.startswith(k + ".") for k in ignore)  # noqa: E731
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(a.keys() | b.keys())
            if not skip(key) and a.get(key) != b.get(key)]


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path`` (tensors memory-mapped, not read), or a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found (--ckpt_path).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError/... for damaged files
        raise CheckpointError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch checkpoint "
                              f"({type(err).__name__}).") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no state_dict).")
    return checkpoint


def checkpoint_folders(config) -> list[str]:
    """Where a subcommand's config puts last checkpoints: every version of ``<save_dir>/<name>`` of its first
    logger (as globs), and the ``dirpath`` of any checkpoint callback that names one."""
    trainer = config.trainer
    logger = trainer.logger[0] if isinstance(trainer.logger, list) and trainer.logger else trainer.logger
    root = trainer.get("default_root_dir") or "."
    folders = []
    if logger is True or logger is None:
        folders.append(str(Path(root) / "lightning_logs" / "*" / "checkpoints"))
    elif logger:
        init = logger.get("init_args") or {}
        name = str(init.get("name") or "lightning_logs")
        folders.append(str(Path(init.get("save_dir") or root) / name / "*" / "checkpoints"))
    for callback in trainer.get("callbacks") or []:
        dirpath = (callback.get("init_args") or {}).get("dirpath") if hasattr(callback, "get") else None
        if dirpath:
            folders.append(str(dirpath))
    return folders


def resolve_last(config) -> str | None:
    """The newest ``last.ckpt`` that ``--ckpt_path last`` means for a config, or None."""
    return newest(last_checkpoints(folder) for folder in checkpoint_folders(config))


class SaveAndLogConfig(SaveConfigCallback):
    """config.yaml in the run directory (Lightning's default), the resolved config sent to W&B, and the same
    config inside every checkpoint, so a resume can be checked against it.

    The config is resolved once, at setup: resolving it in every checkpoint save (every step in some runs) costs
    a jsonargparse dump per save, and a Ctrl-C landing inside jsonargparse comes out as its ValueError (exit 1)
    instead of the interrupt (seen in CI on the interrupt test of tests/test_run_safety.py).
    """

    resolved: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.resolved is None:
            self.resolved = config_as_dict(self.parser, self.config)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.resolved


class _DropLightningInterruptLine(logging.Filter):
    """Lightning logs 'Detected KeyboardInterrupt, attempting graceful shutdown ...'; lemis says more instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Detected KeyboardInterrupt" not in record.getMessage()


class LemisCLI(LightningCLI):
    """LightningCLI with omegaconf interpolation; model and data are chosen by ``class_path``.

    An unset ``model.init_args.roi_size`` is the data's training patch, resolved by the module at setup (and said
    once): a given ROI wins, and a YAML interpolation, resolved before command-line overrides, is not needed.
    """

    def __init__(self, args=None, run: bool = True):
        self._argv = list(sys.argv[1:] if args is None else args)
        self._run_dir: Path | None = None
        self._start_step = 0  # of the checkpoint a fit resumes
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # Subcommand parsers inherit allow_abbrev; argparse's prefix matching would read a misspelt
            # --trainer.max_step as --trainer.max_steps.
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False, "allow_abbrev": False},
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},  # the run directory is new (run_directory.claim)
            args=args,
            run=run,
        )

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        """Every subcommand knows both lemis flags, so a run's config.yaml (which records them) is a valid
        --config for every other subcommand: `lemis validate --config runs/<exp>/version_N/config.yaml`.
        Set to true where it means nothing, a flag is refused in _parse_ckpt_path."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.add_argument("--allow_config_change", type=bool, default=False,
                            help="fit: resume --ckpt_path under a configuration other than the checkpoint's")
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="validate/test/predict: evaluate freshly initialised weights (no --ckpt_path)")
        return parser

    # ---- 1. config files -------------------------------------------------------------------------------------
    def parse_arguments(self, parser, args) -> None:
        for path in config_files(self._argv):
            check_yaml(path)
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        """A lemis error raised while a class is built reaches jsonargparse, which reports it inside a nested
        'Does not validate against any of the Union subtypes' text: keep its one sentence."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            raise ConfigError(config_error_sentence(str(err))) from None

    # ---- 2. the checkpoint -----------------------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's rule (every checkpoint hyper-parameter overrides the config, silently)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        misplaced = "allow_untrained" if subcommand == "fit" else "allow_config_change"
        if config.get(misplaced):
            raise ConfigError(f"--{misplaced} does not apply to lemis {subcommand} (--allow_config_change is for "
                              f"fit, --allow_untrained for validate, test and predict).")
        given = config.get("ckpt_path")
        if given is None:
            if subcommand != "fit" and not config.get("allow_untrained"):
                raise ConfigError(f"lemis {subcommand} needs --ckpt_path (a checkpoint file, or 'last' for the "
                                  f"experiment's newest last.ckpt); --allow_untrained=true evaluates untrained "
                                  f"weights.")
            return
        path = resolve_last(config) if given == "last" else given
        if path is None:
            if subcommand != "fit":
                raise CheckpointError(f"--ckpt_path last: no last.ckpt in {' or '.join(checkpoint_folders(config))}.")
            rank_zero_info("lemis: --ckpt_path last: no checkpoint yet, training starts from scratch.")
            config.ckpt_path = None
            return
        checkpoint = load_checkpoint(Path(path))
        config.ckpt_path = str(path)
        self._start_step = checkpoint.get("global_step", 0)
        saved = checkpoint.get(CONFIG_KEY)
        if subcommand == "fit":
            self._check_resume(config, saved, path)
        elif saved is not None:
            self._take_net(subcommand, config, saved, path)

    def _check_resume(self, config, saved: dict | None, path) -> None:
        if saved is None:
            rank_zero_info(f"lemis: {path} holds no saved configuration; resuming without checking it.")
            return
        changed = differences(saved, config_as_dict(self._subcommand_parsers["fit"], config))
        if changed and not config.get("allow_config_change"):
            shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise ConfigError(f"--ckpt_path {path} was trained under another configuration ({shown}): resume "
                              f"with its configuration, or add --allow_config_change=true to continue it under "
                              f"the new one.")

    def _take_net(self, subcommand: str, config, saved: dict, path) -> None:
        """validate/test/predict: the net and K the weights were trained with; the rest as configured."""
        model = saved.get("model") or {}
        if model.get("class_path") != config.model.class_path:
            raise CheckpointError(f"--ckpt_path {path} holds a {model.get('class_path')} model, the config names "
                                  f"{config.model.class_path} (model.class_path).")
        trained = {k: model["init_args"][k] for k in ("net", "num_classes") if k in model.get("init_args", {})}
        current = config_as_dict(self._subcommand_parsers[subcommand], config)["model"]["init_args"]
        if any(current.get(k) != v for k, v in trained.items()):
            rank_zero_info(f"lemis: the net and num_classes come from {path} (they differ from the config).")
            model = {"class_path": config.model.class_path, "init_args": trained}
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    # ---- 3.-4. checks, run directory, run ---------------------------------------------------------------------
    def _run_subcommand(self, subcommand: str) -> None:
        self.datamodule.setup(subcommand)
        self.model.check_setup(self.trainer, self.datamodule, subcommand)
        self._run_dir = run_directory.claim(self.trainer.loggers[0] if self.trainer.loggers else None)
        interrupt_line = _DropLightningInterruptLine()
        lightning_rank_zero.log.addFilter(interrupt_line)
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:
            if self.trainer.interrupted:
                raise Interrupted(self._interrupted_sentence(subcommand)) from None
            raise
        except LemisError:
            if self._run_dir is not None and self.trainer.global_step <= self._start_step:  # nothing was trained
                shutil.rmtree(self._run_dir, ignore_errors=True)
            raise
        finally:
            lightning_rank_zero.log.removeFilter(interrupt_line)

    def _interrupted_sentence(self, subcommand: str) -> str:
        step = self.trainer.global_step
        if subcommand != "fit":
            return f"interrupted during {subcommand}; its files in {self._run_dir or 'the run directory'} are partial."
        written = {getattr(callback, "last_model_path", "") for callback in self.trainer.checkpoint_callbacks}
        last = newest(written | {resolve_last(self.config[subcommand]) or ""})
        if last is None:
            return f"interrupted at step {step}, before the first checkpoint; nothing to resume from."
        saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        argv = [a for a in self._argv if not a.startswith("--ckpt_path")]
        resume = shlex.join(["lemis", *argv, "--ckpt_path", "last"])
        return f"interrupted at step {step}; the last checkpoint is {last} (step {saved}); resume with: {resume}"


_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")


def config_error_sentence(message: str) -> str:
    """One line out of jsonargparse's nested report: the parser key and the innermost complaint."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)":', lines[0]) if lines else None
    details = [line.lstrip("- ").rstrip(":") for line in lines[1 if key else 0:] if not line.startswith(_NOISE)]
    where = f" in {key.group(1)}: " if key else ": "
    return f"bad configuration{where}{'; '.join(details) or message}".rstrip(".") + "."


def config_files(argv: list[str]) -> list[str]:
    """The values of every ``--config``/``-c`` in ``argv``."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_yaml(path: str) -> None:
    """A config file exists and is YAML, or a ConfigError naming the file (jsonargparse names none)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} not found (--config).")
    try:
        yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {file} is not valid YAML{where}: {problem}.") from None
