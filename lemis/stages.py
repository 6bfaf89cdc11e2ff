"""A stage runner for multi-stage methods (CLISC: CAM -> SAM masks -> UNet -> S3F; SEMISE: pre-train ->
downstream): stages with declared inputs and outputs, each in its own folder, skipped when done, rerun when an
input or option changed, timed; one call runs the chain.

A stage is done when its folder holds a manifest (``lemis.files.write_manifest``: the sha256 of every declared
output, the digests of the input manifests it read, its wall time), written last. A stage killed or failed leaves
no manifest and runs again; a stage that resumes by itself (a ``lemis fit --ckpt_path last`` inside) then
continues where it stopped. When an earlier stage reruns, its manifest digest changes, and every stage that reads
it runs again.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lemis.errors import ConfigError, LemisError
from lemis.files import manifest_digest, read_manifest, write_manifest


class StageError(LemisError):
    """A stage failed or did not write what it declared."""


@dataclass
class Stage:
    """One step of a pipeline.

    name: its folder under the pipeline root; run(folder, inputs) does the work, writing into ``folder`` (inputs:
    {stage name: its folder} of the stages it reads); inputs: names of earlier stages; outputs: the files (relative
    to ``folder``) it must leave; params: the options it ran with (JSON values), recorded in its manifest: a stage
    whose params changed runs again.
    """

    name: str
    run: Callable[[Path, dict[str, Path]], None]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = field(default_factory=tuple)
    params: dict = field(default_factory=dict)


class Pipeline:
    """Stages in order under ``root``; ``run()`` runs what is not done and returns {stage: "done" | "skipped"}."""

    def __init__(self, stages: list[Stage], root: str | Path):
        self.stages, self.root = stages, Path(root)
        seen: set[str] = set()
        for stage in stages:
            if stage.name in seen:
                raise ConfigError(f"stage {stage.name!r} appears twice in the pipeline.")
            unknown = [i for i in stage.inputs if i not in seen]
            if unknown:
                raise ConfigError(f"stage {stage.name!r} reads {unknown[0]!r}, which is not an earlier stage.")
            seen.add(stage.name)

    def folder(self, name: str) -> Path:
        return self.root / name

    def is_current(self, stage: Stage) -> bool:
        """Done, with the params and the inputs it read still the ones recorded."""
        record = read_manifest(self.folder(stage.name))
        if record is None or record.get("params", {}) != json.loads(json.dumps(stage.params)):
            return False
        return record["inputs"] == {name: manifest_digest(self.folder(name)) for name in stage.inputs}

    def run(self, log: Callable[[str], None] = print) -> dict[str, str]:
        status = {}
        for stage in self.stages:
            if self.is_current(stage):
                status[stage.name] = "skipped"
                log(f"lemis: stage {stage.name}: done before, skipped")
                continue
            folder = self.folder(stage.name)
            folder.mkdir(parents=True, exist_ok=True)
            inputs = {name: self.folder(name) for name in stage.inputs}
            start = time.time()
            try:
                stage.run(folder, inputs)
            except LemisError:
                raise
            except Exception as err:  # a stage's own failure: name the stage, keep the cause for LEMIS_DEBUG
                raise StageError(f"stage {stage.name} failed ({type(err).__name__}: {err}); its folder {folder} "
                                 f"has no manifest, so the next run starts it again.") from err
            missing = [o for o in stage.outputs if not (folder / o).is_file()]
            if missing:
                raise StageError(f"stage {stage.name} did not write {folder / missing[0]} (one of its declared "
                                 f"outputs).")
            wall = time.time() - start
            # run_id: a rerun always changes the digest its readers recorded, even when its outputs and wall time
            # come out the same (a rounded wall time alone made that depend on machine load)
            write_manifest(folder, stage.outputs, {"inputs": {n: manifest_digest(p) for n, p in inputs.items()},
                                                   "params": stage.params, "wall_s": round(wall, 3),
                                                   "run_id": uuid.uuid4().hex})
            status[stage.name] = "done"
            log(f"lemis: stage {stage.name}: done in {wall:.1f} s")
        return status


# ---- the command line of a chain ----------------------------------------------------------------------------------

def split_overrides(extra: list[str], stages) -> dict[str, list[str]]:
    """A chain's extra arguments ``[stage:]--key=value`` -> {"common" | stage: [--key=value]}; an argument without
    a stage prefix goes to every stage that has the option."""
    out: dict[str, list[str]] = {"common": []}
    for arg in extra:
        stage, sep, rest = arg.partition(":")
        if sep and stage in stages and rest.startswith("--"):
            out.setdefault(stage, []).append(rest)
        elif arg.startswith("--"):
            out["common"].append(arg)
        else:
            raise ConfigError(f"chain argument {arg!r}: expected --key=value or <stage>:--key=value with a stage of "
                              f"{tuple(stages)}.")
    return out


def run_chain(build: Callable[[], Pipeline]) -> int:
    """Build and run a chain: 0 when every stage is done or skipped; bad input (any LemisError, from the build
    or a stage) is one ``lemis: error:`` sentence and 2 (``LEMIS_DEBUG=1`` re-raises it)."""
    try:
        build().run()
    except LemisError as err:
        if os.environ.get("LEMIS_DEBUG") == "1":
            raise
        print(f"lemis: error: {err}", file=sys.stderr)
        return 2
    return 0
