"""Session-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Every test model and matrix is tiny: intra-op threads only add wake-up stalls,
    # which on a busy 2-core machine made the suite 10-100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
