"""experiments.benchmark runs end to end; experiments.host_memory turns glibc's mmap path off (a deterministic
check of the allocator's own books: the page-fault measurement itself is `python -m experiments.benchmark faults`)."""
import os
import platform
import subprocess
import sys

import pytest

from experiments.benchmark import main

# A 64 MiB tensor is above glibc's largest mmap threshold (32 MiB): by default glibc serves it with mmap (and
# mallinfo2's hblkhd grows by its size while it lives); with the mmap path off it comes from the heap (hblkhd
# does not move). This is glibc's rule, not a measurement of the machine.
MMAPPED = """
import torch
from experiments.host_memory import keep_freed_memory, mmapped_bytes
kept = keep_freed_memory()
before = mmapped_bytes()
x = torch.empty(2**24)
print(kept, mmapped_bytes() - before)
"""


def mmapped_growth(env_extra: dict) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", MMAPPED], env=env | env_extra, capture_output=True, text=True,
                         check=True)
    kept, grown = out.stdout.split()
    return kept == "True", int(grown)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory acts on glibc only")
def test_keep_freed_memory_turns_off_mmap_for_large_tensors():
    assert mmapped_growth({}) == (True, 0)
    kept, grown = mmapped_growth({"LEMIS_MALLOC": "system"})
    assert not kept and grown >= 2**26


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory acts on glibc only")
@pytest.mark.parametrize("env", [{"LEMIS_MALLOC": "system"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1000000"}])
def test_keep_freed_memory_declines_when_the_user_chose(env):
    assert mmapped_growth(env)[0] is False


def test_faults_prints_both_modes(capsys):
    assert main(["faults", "--batches", "2"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]][1] == "glibc default"
    assert all(float(r[2]) >= 0 for r in rows[1:])
def test_speed_prints_a_row_per_method(capsys):
    assert main(["speed", "--quick", "--inputs", "acdc2d", "--methods", "supervised", "mean_teacher", "subclass",
                 "--blocks", "2", "--warmup", "1", "--steps", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == ["supervised", "mean_teacher", "subclass"]
    for row in rows[1:]:
        fw, ref, ratio = float(row[3]), float(row[4]), float(row[5].split()[0])
        assert fw > 0 and ref > 0 and ratio > 0


def test_infer_prints_seconds_per_case(capsys):
    assert main(["infer", "--quick", "--inputs", "acdc2d", "--cases", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| acdc2d")]
    assert len(rows) == 1
    name, shape, roi, stride, predict, metrics = (cell.strip() for cell in rows[0])
    assert (shape, roi, stride) == ("10x256x232", "64x64", "slices")
    assert float(predict) > 0 and float(metrics) > 0


def test_slides_prints_a_row_per_reader_and_level(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the generated slide goes under ./.cache
    assert main(["slides", "--slide-side", "768", "--batches", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [(r[0].strip(), r[1].strip()) for r in rows[1:]] == [("tifffile", "0"), ("tifffile", "1"),
                                                                ("openslide", "0"), ("openslide", "1")]
    assert all(float(r[4]) > 0 for r in rows[1:])
