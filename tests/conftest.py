import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every test file runs small models on one thread: on a busy 2-core machine torch's default threads
    contend, and a file took ~25 s instead of ~5 s. Restored after each file."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
