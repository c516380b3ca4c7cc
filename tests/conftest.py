"""Every test: seeded, a clean Pyro param store, validation on, one data location, one device.

``pytest --device cuda`` (default ``cpu``) runs the same tests with their data and models
on that device: tests take the ``device`` fixture and put what they build there; example
scripts run as subprocesses get ``--device`` (``example_args``). Library code is never
told the device: it must follow the data.
"""

import os
import sys
from pathlib import Path

import pyro
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# helper modules of the tests (ranks.py: launching under torchrun) import by name; pytest's
# importlib mode puts no test folder on sys.path by itself
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests read real data from ../shared/data when it is there (CI, developers); a user's
# machine without it falls back to what vi_lab.data finds (see vi_lab/data.py).
if "VI_LAB_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["VI_LAB_DATA"] = str(SHARED_DATA)

# tiny test models run faster on one thread (and a loaded machine does not thrash)
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device the tests put their data and models on: cpu (default), cuda, cuda:N")


def pytest_configure(config):
    from vi_lab.device import pick_device

    try:
        config.vi_lab_device = pick_device(config.getoption("--device"))
    except ValueError as err:
        raise pytest.UsageError(f"--device: {err}") from None
    if config.vi_lab_device.type == "cuda":
        # tests that compare two runs exactly (resume, paired estimators) need cuBLAS to pick
        # the same reduction order every time; set before CUDA starts, inherited by examples
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_report_header(config):
    return f"vi_lab tests on device: {config.vi_lab_device}"


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device under test (``--device``)."""
    return pytestconfig.vi_lab_device


@pytest.fixture(scope="session")
def example_args(device) -> list[str]:
    """Flags every example script run by a test gets: the device under test."""
    return ["--device", str(device)]


@pytest.fixture(scope="session")
def tiny_args() -> list[str]:
    """The smallest settings every command takes (one epoch on 200 images, 20 test images, K = 10)."""
    return ["--epochs", "1", "--train-size", "200", "--eval-size", "20", "--eval-samples", "10", "--threads", "1",
            "--no-progress"]


@pytest.fixture
def vectors(tmp_path):
    """200 vectors of 10 values in [0, 1], no labels: data that are not images (``--data``)."""
    import numpy as np

    path = tmp_path / "vectors.npy"
    np.save(path, np.random.default_rng(0).random((200, 10), dtype=np.float32))
    return path


@pytest.fixture(autouse=True)
def _seeded_clean_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def has_shared_data() -> bool:
    return SHARED_DATA.is_dir()
