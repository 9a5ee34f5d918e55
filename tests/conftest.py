"""Before any test module imports Triton (through sliceserve's kernels): without a GPU, the
kernels run in Triton's interpreter, which must be chosen before they are compiled."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module's tests: a matmul's rounding can depend on how many threads
    share it, and tests that compare numbers bit for bit (or with torchrun's stage processes,
    which run OMP_NUM_THREADS=1) need the same split every time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator seeded afresh for each test (the kernel tests draw their inputs from it)."""
    return torch.Generator().manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: SmolLM2-scale tests (minutes on a CPU); CI runs them, -m 'not slow' skips them while developing",
    )
