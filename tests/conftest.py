"""Shared pytest fixtures, and the test tiers.

Markers (registered in pyproject.toml; ``--strict-markers``): ``sim`` (the LIBERO simulator), ``s3`` (the local S3
server), ``ray`` (the local Ray cluster) and ``slow`` (those and every long end-to-end run).  The inner loop is
``python -m pytest -m "not slow"``; CI runs everything.

The expensive things exist once per session: one S3 server (``s3``), one Ray cluster (``ray_cluster``), one
simulator process (``tests/simprocess.py``, started in the background once the session's tests are known).

Two pytest-xdist workers run the tests (``-n 2 --dist loadgroup`` in pyproject.toml's addopts; ``-n 0`` runs them
in one process): each module is one group, the tests that use the Ray cluster or the S3 server one more, handed
out first; the test that waits for the simulator process comes last.  In one process the order is: the fast
tests first, then the slow ones (the modules that use Ray last), then the simulator's runner.  Torch and BLAS use
one thread per process unless OMP_NUM_THREADS says otherwise: the suite runs several processes at once (the
simulator, Ray actors, racing extracts), and two OpenMP threads per process on two busy cores are many times
slower than one.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch and numpy load their thread pools

import importlib.util  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import simprocess  # noqa: E402

# --------------------------------------------------------------------------- the simulator process


WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set in pytest-xdist's workers (the README's command runs 2)


def pytest_configure(config):
    if not WORKER:  # the session's controller: one simulator folder for the session (tests/simprocess.py)
        simprocess.prepare()


def _uses_a_cluster(item) -> bool:
    return any(item.get_closest_marker(m) for m in ("ray", "s3")) or \
        bool({"ray_cluster", "s3"} & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """The order.  One process: fast tests first, then slow ones, the modules that use Ray after those (whole
    modules, so that module fixtures are made once), and last the test that waits for the simulator process (it
    runs beside the rest, on one core, best beside the tests that use one core too).

    pytest-xdist workers (``--dist loadgroup``): each module is one group, run by one worker, so its module
    fixtures are made once; the tests that use the session's Ray cluster or S3 server are one group (one
    cluster, one server), handed out first since it is the longest; the simulator's runner comes last."""
    if WORKER:
        def group(item):
            if simprocess.is_runner(item.nodeid):
                return "sim"
            return "cluster" if _uses_a_cluster(item) else item.module.__name__

        def place(item):
            return {"sim": 2, "cluster": 0}.get(group(item), 1)

        for item in items:
            item.add_marker(pytest.mark.xdist_group(group(item)))
    else:
        cluster = {item.module for item in items if _uses_a_cluster(item)}

        def place(item):
            if simprocess.is_runner(item.nodeid):
                return 3
            if item.get_closest_marker("slow") is None:
                return 0
            return 2 if item.module in cluster else 1

    items.sort(key=place)  # stable: file order within each group


def pytest_collection_finish(session):
    if any(simprocess.is_runner(item.nodeid) for item in session.items):
        simprocess.start()


def pytest_unconfigure(config):
    if not WORKER:
        simprocess.stop()


# --------------------------------------------------------------------------- S3 and Ray, once per session

HAVE_S3 = all(importlib.util.find_spec(m) is not None for m in ("s3fs", "moto", "boto3"))


@pytest.fixture(scope="session")
def s3():
    """``s3://BUCKET`` on one local S3 server (moto, loopback only) for the whole session; the standard AWS
    variables point at it until the session ends.  Tests keep apart by key prefix."""
    if not HAVE_S3:
        pytest.skip("S3 tests need s3fs and moto (pip install 'toolkit[scale]')")
    from s3server import local_s3

    with local_s3() as bucket:
        yield bucket


@pytest.fixture(scope="session")
def ray_cluster(request):
    """One local Ray cluster (2 CPUs, loopback only) for the session.  ``toolkit.run.ray`` joins a Ray that is
    initialised already and leaves it running, so no run starts or stops one of its own.  The S3 server comes
    first (when installed): the cluster's workers inherit its endpoint variables from this process."""
    ray = pytest.importorskip("ray")
    if HAVE_S3:
        request.getfixturevalue("s3")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only test cluster
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- pi0


@pytest.fixture(scope="module")
def pi0_adapter():
    """The built-in pi0 adapter on its small random model (float32, CPU, seed 0)."""
    from toolkit_plugins.pi0 import Pi0Adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the "random weights" notice
        return Pi0Adapter(seed=0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A local tokenizer directory (the small Llama-style SentencePiece model) for pi0 / pi0.5 checkpoints."""
    from toolkit.sdk.hf import llama_tokenizer

    d = tmp_path_factory.mktemp("paligemma_tokenizer")
    llama_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pi0_single_thread():
    """The tiny pi0 runs ~10x faster on one thread than on two contended ones; restores the setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
