"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matrices and models: intra-op threads only add synchronisation overhead, badly so on
    a busy machine. Restores the thread count after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
