"""lemis.stages on a two-stage pipeline: outputs and manifests, skipped when done, rerun downstream of a change,
a failed stage leaves no manifest and runs again, bad pipelines are refused."""
import json

import pytest

from lemis.errors import ConfigError
from lemis.files import MANIFEST, read_manifest
from lemis.stages import Pipeline, Stage, StageError


def pipeline(root, calls: list, fail: dict | None = None) -> Pipeline:
    fail = fail if fail is not None else {}

    def numbers(folder, inputs):
        calls.append("numbers")
        (folder / "numbers.json").write_text(json.dumps([1, 2, 3]))

    def total(folder, inputs):
        calls.append("total")
        if fail.get("total"):
            (folder / "partial.txt").write_text("half")
            raise RuntimeError("killed")
        values = json.loads((inputs["numbers"] / "numbers.json").read_text())
        (folder / "total.txt").write_text(str(sum(values)))

    return Pipeline([Stage("numbers", numbers, outputs=("numbers.json",)),
                     Stage("total", total, inputs=("numbers",), outputs=("total.txt",))], root)


def test_two_stages_run_skip_and_rerun_downstream(tmp_path):
    calls = []
    assert pipeline(tmp_path, calls).run(log=lambda _: None) == {"numbers": "done", "total": "done"}
    assert (tmp_path / "total" / "total.txt").read_text() == "6"
    record = read_manifest(tmp_path / "total")
    assert set(record["files"]) == {"total.txt"} and record["wall_s"] >= 0 and record["inputs"]["numbers"]
    assert pipeline(tmp_path, calls).run(log=lambda _: None) == {"numbers": "skipped", "total": "skipped"}
    assert calls == ["numbers", "total"]
    (tmp_path / "numbers" / "numbers.json").write_text(json.dumps([4, 5]))  # an output changed by hand
    assert pipeline(tmp_path, calls).run(log=lambda _: None) == {"numbers": "done", "total": "done"}
    assert (tmp_path / "total" / "total.txt").read_text() == "6"  # numbers rewrote its output: [1, 2, 3]
    (tmp_path / "total" / MANIFEST).unlink()
    assert pipeline(tmp_path, calls).run(log=lambda _: None) == {"numbers": "skipped", "total": "done"}


def test_a_failed_stage_leaves_no_manifest_and_runs_again(tmp_path):
    calls = []
    with pytest.raises(StageError, match=r"stage total failed \(RuntimeError: killed\)"):
        pipeline(tmp_path, calls, fail={"total": True}).run(log=lambda _: None)
    assert not (tmp_path / "total" / MANIFEST).exists() and read_manifest(tmp_path / "numbers") is not None
    assert pipeline(tmp_path, calls).run(log=lambda _: None) == {"numbers": "skipped", "total": "done"}


def test_missing_output_and_bad_pipelines(tmp_path):
    lazy = Pipeline([Stage("lazy", lambda folder, inputs: None, outputs=("out.txt",))], tmp_path)
    with pytest.raises(StageError, match="did not write .*out.txt"):
        lazy.run(log=lambda _: None)
    with pytest.raises(ConfigError, match="appears twice"):
        Pipeline([Stage("a", print), Stage("a", print)], tmp_path)
    with pytest.raises(ConfigError, match="reads 'b', which is not an earlier stage"):
        Pipeline([Stage("a", print, inputs=("b",)), Stage("b", print)], tmp_path)


def test_a_changed_option_reruns_the_stage(tmp_path):
    calls = []

    def write(folder, inputs):
        calls.append(1)
        (folder / "out.txt").write_text("x")

    def run(params):
        return Pipeline([Stage("a", write, outputs=("out.txt",), params=params)], tmp_path).run(log=lambda _: None)

    assert run({"epochs": 2, "path": None}) == {"a": "done"}
    assert run({"epochs": 2, "path": None}) == {"a": "skipped"}
    assert run({"epochs": 3, "path": None}) == {"a": "done"} and len(calls) == 2
