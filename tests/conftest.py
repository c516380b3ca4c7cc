"""Every test: seeded, a clean Pyro param store, validation on, one data location."""

import os
from pathlib import Path

import pyro
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Tests read real data from ../shared/data when it is there (CI, developers); a user's
# machine without it falls back to what vi_lab.data finds (see vi_lab/data.py).
if "VI_LAB_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["VI_LAB_DATA"] = str(SHARED_DATA)

# tiny test models run faster on one thread (and a loaded machine does not thrash)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_clean_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def has_shared_data() -> bool:
    return SHARED_DATA.is_dir()
