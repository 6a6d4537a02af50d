"""Streaming statistics, store comparison and projection, checked against numpy/scipy on the same data."""

import json
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats as sps

import toolkit
from toolkit.cli import cli
from toolkit.sdk.errors import ToolkitError
from toolkit.analysis.stats import (
    Histograms,
    RunningMoments,
    compare_stores,
    kl_divergence,
    layer_stats,
    reservoir,
    store_stats,
    wasserstein_hist,
)
from toolkit.store.layout import ArraySpec
from toolkit.store.writer import StoreWriter

SITE = "context"


def make_store(path, x, chunk=16, batch=8, dtype="float32", tasks=None, sites=(SITE,)):
    """A store whose sites (default one, ``context``) hold x as stream ``context``: (samples, layer, token, feature)."""
    n, n_layers, n_tokens, f = x.shape
    w = StoreWriter(path, mode="create")
    stored = "bfloat16" if dtype == "bfloat16" else None
    specs = [*(ArraySpec(f"{site}/context", (n_layers, n_tokens, f), "uint16" if stored else dtype,
                         ("layer", "token", "feature"), stored, chunk_inner=(1, n_tokens, f)) for site in sites),
             ArraySpec("episode", (), "int32", ()), ArraySpec("task", (), "str", ()),
             ArraySpec("success", (), "int8", ())]
    static = {name: value for site in sites for name, value in (
        (f"{site}/layer", (("layer",), np.arange(n_layers, dtype=np.int32))),
        (f"{site}/token", (("token",), np.arange(n_tokens, dtype=np.int32))))}
    w.initialize({"model": {"name": "synthetic", "checkpoint": None}}, specs, static, ["episode", "task", "success"],
                 chunk_samples=chunk, batch_size=batch)
    tasks = tasks if tasks is not None else np.array([f"task {i % 3}" for i in range(n)], dtype=object)
    for a in range(0, n, batch):
        v = x[a:a + batch]
        if stored:
            import torch
            v = torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        w.append({**{f"{site}/context": v for site in sites}, "episode": np.arange(a, a + len(v), dtype=np.int32) // 4,
                  "task": tasks[a:a + batch], "success": (np.arange(a, a + len(v)) % 2).astype(np.int8)})
    w.close()
    return toolkit.open_store(path)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2, 3, 12)).astype(np.float32)
    x[..., 3] = 0.0  # dead
    x[..., 4] = 2.5  # constant
    x[:, :, :, 5] *= 40.0  # outlier (std and max)
    return x


@pytest.fixture(scope="module")
def store(tmp_path_factory, data):
    return make_store(tmp_path_factory.mktemp("stats") / "a.zarr", data)


def test_moments_merge_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(1000, 5)) * np.array([1, 10, 0.1, 1e3, 1])
    m = RunningMoments(5)
    for a in range(0, 1000, 37):  # uneven blocks
        m.update(x[a:a + 37])
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std, x.std(0), rtol=1e-10)
    np.testing.assert_array_equal(m.min, x.min(0))
    np.testing.assert_array_equal(m.max, x.max(0))
    gm, gs = m.global_moments()
    assert gm == pytest.approx(x.mean(), rel=1e-12) and gs == pytest.approx(x.std(), rel=1e-10)


def test_store_stats_match_numpy(store, data):
    rep = store_stats(store, SITE, None, per_feature=True)
    assert rep["stream"] == "context" and rep["shape"] == [200, 2, 3, 12] and rep["dtype"] == "float32"
    for layer in (0, 1):
        rows = data[:, layer].reshape(-1, 12).astype(np.float64)
        s = rep["layers"][str(layer)]
        assert s["n_rows"] == 600
        np.testing.assert_allclose(s["features"]["mean"], rows.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s["features"]["std"], rows.std(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(s["features"]["max"], rows.max(0))
        assert s["global"]["mean"] == pytest.approx(rows.mean(), rel=1e-9)
        assert s["global"]["std"] == pytest.approx(rows.std(), rel=1e-9)
        assert s["global"]["min"] == rows.min() and s["global"]["max"] == rows.max()
        assert s["dead"] == [3] and s["constant"] == [4]
        assert {o["feature"] for o in s["outliers"]} == {5}
    json.dumps(rep)


def test_bfloat16_store_is_decoded(tmp_path, data):
    s = make_store(tmp_path / "bf.zarr", data[:40], dtype="bfloat16")
    rep = store_stats(s, SITE, layers="0", per_feature=True)
    import torch

    want = torch.from_numpy(data[:40, 0].reshape(-1, 12)).to(torch.bfloat16).double().numpy()
    np.testing.assert_allclose(rep["layers"]["0"]["features"]["mean"], want.mean(0), rtol=1e-9, atol=1e-12)
    assert rep["dtype"] == "bfloat16"


def test_kl_and_wasserstein_on_known_distributions():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(200_000, 1))
    b = rng.normal(1.0, 1.0, size=(200_000, 1))
    lo, hi = np.minimum(a.min(0), b.min(0)), np.maximum(a.max(0), b.max(0))
    ha, hb = Histograms(lo, hi, 200), Histograms(lo, hi, 200)
    for blk in range(0, 200_000, 50_000):
        ha.update(a[blk:blk + 50_000])
        hb.update(b[blk:blk + 50_000])
    kl = kl_divergence(ha.counts, hb.counts)[0]
    # the same histograms through scipy, and the closed form KL(N(0,1)||N(1,1)) = 0.5
    p = np.maximum(ha.counts[0] / ha.counts[0].sum(), 1e-10)
    q = np.maximum(hb.counts[0] / hb.counts[0].sum(), 1e-10)
    assert kl == pytest.approx(sps.entropy(p / p.sum(), q / q.sum()), rel=1e-9)
    assert kl == pytest.approx(0.5, abs=0.05)
    w = wasserstein_hist(ha.counts, hb.counts, ha.width)[0]
    exact = sps.wasserstein_distance(a[:, 0], b[:, 0])
    assert abs(w - exact) <= ha.width[0] and w == pytest.approx(1.0, abs=0.02)
    assert kl_divergence(ha.counts, ha.counts)[0] == pytest.approx(0.0, abs=1e-12)


def test_compare_stores(tmp_path, store, data):
    shifted = data.copy()
    shifted[..., 0] += 1.0  # feature 0 moves by one std
    shifted[..., 6] = 0.0  # a newly dead feature
    other = make_store(tmp_path / "b.zarr", shifted)
    rep = compare_stores(store, other, SITE, bins=64, exact_samples=300)
    c = rep["layers"]["0"]
    assert c["top_shifted"][0]["feature"] == 0
    assert c["top_shifted"][0]["wasserstein"] == pytest.approx(1.0, abs=0.05)
    assert c["top_shifted"][0]["mean_b"] - c["top_shifted"][0]["mean_a"] == pytest.approx(1.0, abs=1e-6)
    assert c["dead"] == {"a": 1, "b": 2, "both": 1, "jaccard": 0.5, "only_a": [], "only_b": [6]}
    assert c["correlation_of_means"] > 0.9
    same = compare_stores(store, store, SITE)["layers"]["1"]
    assert same["global"]["kl_ab"] == pytest.approx(0.0, abs=1e-9) and same["global"]["wasserstein"] == 0.0
    # per-feature Wasserstein of the histograms is within one bin of scipy's on the full samples
    rows_a = data[:, 0].reshape(-1, 12).astype(np.float64)
    rows_b = shifted[:, 0].reshape(-1, 12).astype(np.float64)
    w1 = c["_arrays"]["w1"]
    for f in (0, 1, 5):
        width = (max(rows_a[:, f].max(), rows_b[:, f].max()) - min(rows_a[:, f].min(), rows_b[:, f].min())) / 64
        assert abs(w1[f] - sps.wasserstein_distance(rows_a[:, f], rows_b[:, f])) <= width + 1e-12
    assert "wasserstein_sampled" in c["per_feature"]


def test_reservoir_is_seeded_and_uniform(store, data):
    r1, r2 = reservoir(store, SITE, "context", 0, 50, seed=3), reservoir(store, SITE, "context", 0, 50, seed=3)
    np.testing.assert_array_equal(r1, r2)
    assert r1.shape == (50, 12)
    rows = data[:, 0].reshape(-1, 12)
    assert all((rows == r).all(1).any() for r in r1.astype(np.float32))


def test_stats_memory_is_flat(tmp_path):
    """Peak memory does not grow with the number of samples: one chunk at a time."""
    rng = np.random.default_rng(4)
    peaks = []
    for n in (64, 512):
        s = make_store(tmp_path / f"m{n}.zarr", rng.normal(size=(n, 1, 4, 256)).astype(np.float32), chunk=32, batch=32)
        tracemalloc.start()
        layer_stats(s, SITE, "context", 0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    chunk_bytes = 32 * 4 * 256 * 8
    assert peaks[1] < 1.5 * peaks[0] + chunk_bytes, peaks
    assert peaks[1] < 512 * 4 * 256 * 8  # well below the whole layer in float64


def test_cli_stats_compare_projection(tmp_path, store, data):
    runner = CliRunner()
    r = runner.invoke(cli, ["stats", str(store.path), "--out", str(tmp_path / "st")])
    assert r.exit_code == 0, r.output
    assert "| 0 | 600 | 12 |" in r.output
    rep = json.loads((tmp_path / "st" / "stats.json").read_text())
    assert rep["layers"]["1"]["dead"] == [3]
    assert np.load(tmp_path / "st" / "features.npz")["layer0_mean"].shape == (12,)
    other = make_store(tmp_path / "b.zarr", data + 0.5)
    r = runner.invoke(cli, ["compare", str(store.path), str(other.path), "--layer", "0", "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert set(out["layers"]) == {"0"} and out["figures"]["0"]
    for fig in out["figures"]["0"]:
        assert (tmp_path / "cmp" / fig).stat().st_size > 1000
    assert "KL(A‖B)" in (tmp_path / "cmp" / "compare.md").read_text()
    for method in ("pca", "tsne"):
        png = tmp_path / f"proj_{method}.png"
        r = runner.invoke(cli, ["projection", str(store.path), "--method", method, "--color", "task", "--out", str(png)])
        assert r.exit_code == 0, r.output
        assert png.stat().st_size > 1000 and np.load(png.with_suffix(".npz"))["xy"].shape == (200, 2)


def test_umap_missing_is_one_line_error(store):
    pytest.importorskip("sklearn")
    try:
        import umap  # noqa: F401
        pytest.skip("umap-learn is installed")
    except ImportError:
        pass
    r = CliRunner().invoke(cli, ["projection", str(store.path), "--method", "umap"])
    assert r.exit_code == 2 and "umap-learn" in r.output and r.output.count("\n") == 1, r.output


def test_errors_are_one_line(tmp_path, store, data):
    with pytest.raises(ToolkitError, match="has no site 'nope'"):
        store_stats(store, "nope")
    small = make_store(tmp_path / "small.zarr", data[:, :, :, :6])
    with pytest.raises(ToolkitError, match="12 features.*6"):
        compare_stores(store, small, SITE)


def test_stats_default_to_the_stores_first_site_not_a_model_specific_one(tmp_path, data):
    s = make_store(tmp_path / "two.zarr", data[:20], sites=("action", "context"))
    rep = store_stats(s)
    assert (rep["site"], rep["stream"], list(rep["layers"])) == ("action", "context", ["0", "1"])
    assert list(store_stats(s, layers="-1")["layers"]) == ["1"]


def test_dataset_stats_prints_whatever_the_dataset_summarises():
    from toolkit.cli.analysis import summary_text

    text = summary_text({"dataset": "d", "data": "x", "n_episodes": 3, "frames": {"total": 9, "min": 3, "max": 3,
                                                                                 "mean": 3.0},
                         "by_gripper": {"open": 2, "closed": 1}, "plan": {"seed": 0, "by_stratum": {"a": 1}}})
    assert "dataset d at x: 3 episodes" in text
    assert "episodes by gripper:\n  open    2\n  closed  1" in text
    assert "plan:\n  seed        0\n  episodes by stratum:\n    a  1" in text
