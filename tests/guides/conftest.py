"""Guide tests use tiny models: one torch thread is faster for them than two (much faster on a busy machine)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
