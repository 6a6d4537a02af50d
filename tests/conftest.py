"""Shared pytest fixtures."""

import warnings

import pytest
import torch

# --------------------------------------------------------------------------- pi0


@pytest.fixture(scope="module")
def pi0_adapter():
    """The built-in pi0 adapter on its small random model (float32, CPU, seed 0)."""
    from toolkit_plugins.pi0 import Pi0Adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the "random weights" notice
        return Pi0Adapter(seed=0)


@pytest.fixture(scope="module")
def pi0_single_thread():
    """The tiny pi0 runs ~10x faster on one thread than on two contended ones; restores the setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
