"""Settings shared by every test file."""

import os
import tempfile

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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A ~40 KB play-like text file and a folder for its prepared data, shared by a module
    (tests/test_pretrain.py's runs and tests/test_safety.py's)."""
    from test_pretrain import fake_play

    d = tmp_path_factory.mktemp("corpus")
    (d / "plays.txt").write_text(fake_play(0, 1200))
    return {"file": d / "plays.txt", "root": d / "data"}


# The measured peak FLOP/s is cached per machine (train/core/peak.py); the tests keep theirs in a
# folder of their own, never in the user's ~/.cache (subprocesses inherit the variable).
os.environ["HANDGPT_CACHE"] = tempfile.mkdtemp(prefix="handgpt-test-cache-")
