"""The ridge solver's speed paths give the plain answers: factorisations on parallel threads, the online code's
prefix probes taken from shared factorisations, and the torch (--device) statistics path."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_probe import write_store
from toolkit.sdk.errors import ToolkitError
from toolkit.analysis.probe import ProbeConfig, Selection, probe
from toolkit.analysis.probe.select import plain, resolve
from toolkit.analysis.probe.solvers import LAMBDAS, NestedRidge, RidgePath, validation_sse
from toolkit.analysis.probe.splits import make_folds
from toolkit.analysis.probe.stats import FoldStats, iter_blocks, sum_stats
from toolkit.store.reader import open_store


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """One planted layer's rows (d=24 × 2 tokens concatenated), its task one-hot and a control of the same width."""
    path = write_store(tmp_path_factory.mktemp("solver") / "s.zarr", eps_per_task=8, action=False)
    store = open_store(path)
    r = resolve(store, Selection(site="vlm", layers="6", pool="none"))
    X = np.concatenate([x[:, 0] for _, x in iter_blocks(store, r, 0)])
    ep, task = store.coord("episode")[r.rows], plain(store.coord("task"))[r.rows]
    folds = make_folds("episodes", ep, task, 5, 0)
    Y = np.eye(4, dtype=np.float32)[np.unique(task, return_inverse=True)[1]]
    Yc = np.eye(4, dtype=np.float32)[np.random.default_rng(0).integers(0, 4, len(Y))]
    return path, X, np.concatenate([Y, Yc], 1), folds


def _stats(X, Y, folds, device=None):
    fs = FoldStats(X.shape[1], Y.shape[1], folds.n_folds, block_rows=64, device=device)
    fs.add(X, Y, folds.fold)
    return fs.finish(), fs.shift


GROUPS = {"task": np.arange(4), "task#control": np.arange(4, 8)}


def _fit(stats, shift, workers, precision="float32"):
    nr = NestedRidge(stats, GROUPS, shift, prior=np.arange(8), precision=precision, prefix={"task": np.arange(4)},
                     workers=workers)
    return nr, nr.outers(), nr.final()


def test_parallel_factorisations_equal_the_sequential_ones(layer):
    _, X, Y, folds = layer
    stats, shift = _stats(X, Y, folds)
    (a, outer_a, final_a), (b, outer_b, final_b) = _fit(stats, shift, 1), _fit(stats, shift, 3)
    for (sse, ss0), (sse_b, ss0_b) in zip(a.inner, b.inner):
        np.testing.assert_array_equal(sse, sse_b)  # the same products, only on other threads
    for fa, fb in zip(outer_a + [final_a], outer_b + [final_b]):
        for name in GROUPS:
            assert fa[name].lam == fb[name].lam
            np.testing.assert_array_equal(fa[name].model.W, fb[name].model.W)
    for pa, pb in zip(a.prefix_probes("task"), b.prefix_probes("task")):
        assert (pa is None) == (pb is None)
        if pa is not None:
            np.testing.assert_array_equal(pa.W, pb.W)


def test_prefix_probes_from_shared_factorisations_equal_fresh_solves(layer):
    """Prefix i is ridge on folds 0..i−1 at the λ that coded block i−1 best under prefix i−1 (λ = 1 for the
    first): recomputed here from scratch, one float64 path per prefix, as the online code defines it."""
    _, X, Y, folds = layer
    stats, shift = _stats(X, Y, folds)
    nr, _, _ = _fit(stats, shift, 2)
    got = nr.prefix_probes("task")
    cols = np.arange(4)
    lam, prev = 1.0, None
    assert got[0] is None
    for i in range(1, folds.n_folds):
        if prev is not None:
            lam = LAMBDAS[int(np.argmin(validation_sse(prev, stats[i - 1], LAMBDAS, cols)[0].sum(1)))]
        prev = RidgePath(sum_stats(stats[:i]), "float64")
        W, b = prev.solve(lam, cols)
        assert np.abs(got[i].W - W).max() <= 1e-8 * np.abs(W).max()
        np.testing.assert_allclose(got[i].b, b, rtol=1e-8, atol=1e-10)


def test_torch_statistics_path_equals_numpy(layer):
    """``device="cpu"`` accumulates XᵀX, XᵀY with torch (the code a GPU runs); the sums equal numpy's to
    float32 product rounding and the probe's results are the same.  (No GPU here: cuda itself is not run.)"""
    path, X, Y, folds = layer
    ref, _ = _stats(X, Y, folds)
    dev, _ = _stats(X, Y, folds, device="cpu")
    for r, d in zip(ref, dev):
        assert d.n == r.n
        np.testing.assert_allclose(d.G, r.G, rtol=1e-5, atol=1e-3 * np.abs(r.G).max() * 1e-3)
        np.testing.assert_allclose(d.B, r.B, rtol=1e-5, atol=1e-6 * np.abs(r.B).max())
        np.testing.assert_array_equal(d.sx, r.sx)
    sel = Selection(site="vlm", layers="3,6")
    a = probe(path, sel, ["task"], ProbeConfig())
    b = probe(path, sel, ["task"], ProbeConfig(device="cpu"))
    for ra, rb in zip(a.rows, b.rows):
        assert (ra["layer"], ra["lambda_folds"]) == (rb["layer"], rb["lambda_folds"])
        assert ra["metric"] == rb["metric"] and ra["control"] == rb["control"]
        assert abs(ra["compression"] - rb["compression"]) < 1e-6


@pytest.mark.parametrize("cfg, message", [(dict(device="tpu9"), "unknown --device"),
                                          (dict(scheduler="bogus"), "unknown --scheduler"),
                                          (dict(solver="logistic", scheduler="threads"), "ridge solver")])
def test_bad_device_or_scheduler_is_one_line(layer, cfg, message):
    with pytest.raises(ToolkitError, match=message):
        probe(layer[0], Selection(site="vlm", layers="6"), ["task"], ProbeConfig(mdl=False, **cfg))


def test_cuda_without_a_gpu_is_one_line(layer):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ToolkitError, match="no CUDA GPU"):
        probe(layer[0], Selection(site="vlm", layers="6"), ["task"], ProbeConfig(mdl=False, device="cuda"))


def _gram(d, n=None, seed=0, spread=1e3):
    """A gram with eigenvalues spread over ``spread`` (correlated features, like activations), and targets."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n or 3 * d, d)) @ (rng.standard_normal((d, d)) * np.geomspace(1, 1 / spread, d))
    return X.T @ X, X.T @ rng.standard_normal((len(X), 5))


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
def test_the_tridiagonal_factorisation_solves_every_shift(dtype, tol):
    """G = Q T Qᵀ by LAPACK: (G + sI)⁻¹ r per shift, for a right-hand side shared by every shift or one per
    shift, to the working precision's backward error; and the same answers as the eigendecomposition (the
    factorisation a GPU uses), which is tested here on the CPU."""
    from toolkit.analysis.probe.factor import Eigen, Tridiagonal

    G, B = _gram(64)
    shifts = np.array([1e-3, 1.0, 1e3]) * np.trace(G) / len(G)
    R = np.random.default_rng(1).standard_normal((64, 3, 5))
    for f in (Tridiagonal(G, dtype), Eigen(G, dtype)):
        assert f.norm >= np.linalg.eigvalsh(G).max() * (1 - 1e-6)
        for rhs in (B, R):
            x = f.solve(rhs, shifts).astype(np.float64)
            for i, s in enumerate(shifts):
                b = rhs if rhs.ndim == 2 else rhs[:, i]
                r = b - (G + s * np.eye(len(G))) @ x[:, i]
                assert np.linalg.norm(r) <= tol * ((f.norm + s) * np.linalg.norm(x[:, i]) + np.linalg.norm(b))
    np.testing.assert_allclose(Tridiagonal(G, np.float64).solve(B, shifts), Eigen(G, np.float64).solve(B, shifts),
                               rtol=1e-8, atol=1e-10 * np.abs(Eigen(G, np.float64).solve(B, shifts)).max())


def test_float32_refinement_reaches_the_tolerance_with_updated_residuals():
    """After the first exact residual the refinement updates it in float32 and counts that rounding as a bound:
    the answers it accepts meet RidgePath.TOL against the exact float64 residual, without the float64 fallback,
    and differ from the float64 path's by at most what that backward error allows (condition number × TOL)."""
    from toolkit.analysis.probe.stats import Stats

    rng = np.random.default_rng(2)
    X = (rng.standard_normal((3000, 256)) @ (rng.standard_normal((256, 256)) * np.geomspace(1, 1e-2, 256)))
    Y = np.eye(4)[rng.integers(0, 4, 3000)] + X[:, :4] * 0.05
    s = Stats.zeros(256, 4)
    s.add(X.astype(np.float32), Y.astype(np.float32))
    path, ref = RidgePath(s, "float32"), RidgePath(s, "float64")
    A = path.coefs(LAMBDAS)
    assert path.precision == "float32"  # no fallback: refinement converged
    for lam, z in zip(LAMBDAS, A):
        shift = lam * path.n
        r = path.Bz - path.Gz @ z - shift * z
        bound = (np.abs(np.linalg.eigvalsh(path.Gz)).max() + shift) * np.linalg.norm(z) + np.linalg.norm(path.Bz)
        assert np.linalg.norm(r) <= RidgePath.TOL * bound
    e = np.linalg.eigvalsh(path.Gz)
    for lam, z, z64 in zip(LAMBDAS, A, ref.coefs(LAMBDAS)):  # forward error within cond × backward error
        cond = (e.max() + lam * path.n) / (max(e.min(), 0) + lam * path.n)
        assert np.linalg.norm(z - z64) <= 4 * cond * RidgePath.TOL * np.linalg.norm(z64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_gil_free_lapack_calls_equal_scipys_wrappers(dtype):
    """toolkit's ctypes calls of sytrd, ormqr and gtsv (scipy's own LAPACK, through cython_lapack) give exactly
    what scipy's Python wrappers give, on views with a leading dimension (as the ridge path passes them)."""
    from scipy.linalg import lapack as sl

    from toolkit.analysis.probe import lapack

    p = "s" if dtype == np.float32 else "d"
    G, _ = _gram(40)
    a, d, e, tau = lapack.sytrd(G, dtype)
    a2, d2, e2, tau2, info = getattr(sl, p + "sytrd")(G.astype(dtype), lower=1, lwork=64 * 40)  # same blocking
    assert info == 0
    for x, y in ((d, d2), (e, e2), (tau, tau2[:39]), (np.tril(a, -2), np.tril(a2, -2))):
        np.testing.assert_array_equal(x, y)
    c = np.asfortranarray(np.random.default_rng(0).standard_normal((40, 7)).astype(dtype))
    for trans in "NT":
        mine = c.copy(order="F")
        lapack.ormqr(trans, a[1:, :-1], tau, mine[1:])
        ref, _, info = getattr(sl, p + "ormqr")("L", trans, a2[1:, :-1], tau2[:39], c[1:].copy(), 64 * 7)
        np.testing.assert_allclose(mine[1:], ref, rtol=0, atol=10 * np.finfo(dtype).eps * np.abs(ref).max())
        np.testing.assert_array_equal(mine[0], c[0])
    b = c.copy(order="F")
    assert lapack.gtsv(e, d + 5, b) == 0
    np.testing.assert_allclose((np.diag(d + 5) + np.diag(e, 1) + np.diag(e, -1)) @ b, c,
                               atol=100 * np.finfo(dtype).eps * np.abs(c).max())
    with pytest.raises(ValueError):
        lapack.gtsv(e, d, np.ones((40, 2), dtype))[:, 0]  # a row-major b: refused before any pointer is passed
    assert lapack.gtsv(np.zeros(1, dtype), np.zeros(2, dtype), np.ones((2, 1), dtype, order="F")) > 0  # singular


def test_a_factorisation_on_a_worker_thread_leaves_the_gil_to_the_others():
    """The point of the ctypes calls: while one thread is inside sytrd, Python keeps running on another (scipy's
    wrapper holds the GIL for the whole call, so two factorisations on worker threads ran one at a time)."""
    import threading
    import time

    from threadpoolctl import threadpool_limits

    from toolkit.analysis.probe import lapack

    G, _ = _gram(1200, n=1300)

    def longest_gap(call) -> tuple[float, float]:
        """(the longest time the main thread went without running, the call's own time) while ``call`` runs on
        a worker thread."""
        inside = []

        def work():
            t = time.perf_counter()
            call()
            inside.append(time.perf_counter() - t)

        th = threading.Thread(target=work)
        stamps = [time.perf_counter()]
        th.start()
        while th.is_alive():
            stamps.append(time.perf_counter())
        th.join()
        return float(np.diff(stamps).max()), inside[0]

    # Held, the longest gap is the whole call, every time; released, the main thread runs throughout, unless a
    # loaded machine (the parallel test run) happens to deschedule it for half the call: a few tries absorb that.
    with threadpool_limits(1):
        tries = [longest_gap(lambda: lapack.sytrd(G, np.float64)) for _ in range(5)]
    assert any(gap < call / 2 for gap, call in tries), tries
