"""experiments.benchmark runs end to end, and experiments.host_memory stops the per-step page faults it measures."""
import os
import subprocess
import sys
import textwrap

import pytest

from experiments.benchmark import main

FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from experiments.host_memory import keep_freed_memory
    kept = keep_freed_memory()
    pages = 2**26 // 4096
    def faults_per_alloc(n=10):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            x = torch.empty(2**26 // 4)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
            x.fill_(1.0)
            del x
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / n / pages
    faults_per_alloc()  # the heap settles (posix_memalign splits) before the steady state is counted
    print(kept, faults_per_alloc())
""")


def steady_faults(env_extra: dict) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env_extra
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    kept, fraction = out.stdout.split()
    return kept == "True", float(fraction)


def test_keep_freed_memory_stops_refaulting_large_tensors():
    """Fraction of a 64 MiB tensor's pages faulted in again per allocation: ~1 with glibc's defaults, ~0 kept."""
    kept, fraction = steady_faults({})
    if not kept:
        pytest.skip("keep_freed_memory() declined: the C library is not glibc, or GLIBC_TUNABLES tunes malloc")
    assert fraction < 0.05
    kept, fraction = steady_faults({"LEMIS_MALLOC": "system"})
    assert not kept and fraction > 0.9


def test_speed_prints_a_row_per_method(capsys):
    assert main(["speed", "--quick", "--inputs", "acdc2d", "--methods", "supervised", "mean_teacher",
                 "--blocks", "2", "--warmup", "1", "--steps", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == ["supervised", "mean_teacher"]
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
