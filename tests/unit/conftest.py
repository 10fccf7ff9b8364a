import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one intra-op thread is faster, and far faster on a busy shared CPU (no spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
