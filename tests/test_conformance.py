"""Every registered adapter, built-in or third-party, passes the same contract (toolkit.testing)."""

import itertools

import pytest
import torch

from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.plugins import registry
from toolkit.testing import check_dataset_adapter, check_model_adapter

MODELS = sorted(registry()["model"])
DATASETS = sorted(registry()["dataset"])


@pytest.fixture(scope="module")
def libero_batch():
    ds = registry()["dataset"]["libero"].obj()
    eps = list(itertools.islice(ds.episodes(), 2))
    return [(eps[0], s) for s in itertools.islice(eps[0].steps(), 2)] + [(eps[1], next(eps[1].steps()))]


@pytest.mark.parametrize("name", MODELS)
def test_model_adapter_conformance(name, libero_batch):
    torch.manual_seed(0)
    adapter = registry()["model"][name].obj()  # the embedded tiny default
    check_model_adapter(adapter, libero_batch)


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_adapter_conformance(name):
    if getattr(registry()["dataset"][name].obj, "closed_loop", False):
        pytest.skip(f"{name} is closed-loop (a simulator); tests/test_libero_sim.py covers it")
    try:
        ds = registry()["dataset"][name].obj()  # the embedded sample, where the adapter has one
    except ToolkitError as e:
        pytest.skip(f"{name} has no embedded sample ({e}); its own tests build data")
    check_dataset_adapter(ds)
