"""Settings shared by every test file."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: they gain nothing from threads, and on a busy machine each
    parallel region waits for a free core (measured 10x slower). Subprocesses that tests
    start get OMP_NUM_THREADS=1 likewise where they set it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
