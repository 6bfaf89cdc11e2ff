"""Shared fixtures: phantom datasets (generated once per session) and the real-data location."""
import os
from pathlib import Path

import pytest
import torch

from datamodules.phantoms import make_acdc, make_la

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Two threads (CI's cores), unless OMP_NUM_THREADS asks for fewer: a suite run beside other jobs must not
# oversubscribe the cores (spin-waiting OpenMP threads slow every job sharing them many times over).
torch.set_num_threads(min(2, int(os.environ.get("OMP_NUM_THREADS") or 2)))


@pytest.fixture(scope="session")
def acdc_phantom(tmp_path_factory) -> Path:
    return make_acdc(tmp_path_factory.mktemp("acdc"), n_train=6, n_val=1, n_test=1, size=(64, 64),
                     n_slices=(4, 6), seed=0)


@pytest.fixture(scope="session")
def la_phantom(tmp_path_factory) -> Path:
    return make_la(tmp_path_factory.mktemp("la"), n_train=6, n_test=2, shape=(40, 40, 36), seed=0)


def real(name: str) -> Path:
    """Path of a real dataset under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (see ../shared/data/README.md)")
    return path
