import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny test models run fastest on one thread; with two, a busy 2-core machine spends its
    time in OpenMP waits (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_label_parameters(model, std=0.1, seed=0):
    """Give a fresh model's label parameters (zero at init) random values, as training would,
    so that tests see every conditioning route at work."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-2].startswith("label_"):
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)
    return model
