"""Expert separation (CKA, cosine, L2 between the VLM and the action expert) against numpy on the stored arrays."""

import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import toolkit
from toolkit.sdk.errors import ToolkitError
from toolkit.analysis.separation import PairSums, expert_separation, linear_cka
from toolkit.store.reader import open_store
from toolkit_plugins.libero.sample import write_latent_pickles


def gram_cka(x, y):
    """Linear CKA from centred Gram matrices (n x n): an independent route to the same number."""
    x, y = x - x.mean(0), y - y.mean(0)
    k, m = x @ x.T, y @ y.T
    return float((k * m).sum() / (np.linalg.norm(k) * np.linalg.norm(m)))


@pytest.fixture(scope="module")
def latent_store(tmp_path_factory):
    """LIBERO-format latents (VLM and action expert both 8 wide, 9 denoising steps), imported unpooled."""
    d = tmp_path_factory.mktemp("latents")
    write_latent_pickles(d, n_tasks=2, n_episodes=2, n_steps=3, n_layers=3, width=8, n_img=4)
    path = d / "s.zarr"
    toolkit.import_latents(dataset="libero", data=str(d), store=path, pool="none", dtype="float32",
                           chunk_samples=5)  # several chunks: the sums are streamed
    return path


def test_cka_of_a_matrix_with_itself_is_one_and_with_independent_noise_near_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 6))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3 * x @ np.linalg.qr(rng.normal(size=(6, 6)))[0] + 1) == pytest.approx(1.0)  # rotation, scale
    assert linear_cka(x, rng.normal(size=(4000, 4))) < 0.02
    small = rng.normal(size=(50, 6)), rng.normal(size=(50, 3))
    assert linear_cka(*small) == pytest.approx(gram_cka(*small))


def test_streamed_sums_equal_one_pass():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 2, 5))
    whole, parts = PairSums(5, 5, 2), PairSums(5, 5, 2)
    whole.update(x, y)
    for a in range(0, 30, 7):
        parts.update(x[a:a + 7], y[a:a + 7])
    np.testing.assert_allclose(parts.cka(), whole.cka())
    np.testing.assert_allclose(parts.cosine(), whole.cosine())


def test_separation_agrees_with_numpy_on_the_stored_arrays(latent_store):
    s = open_store(latent_store)
    rows = expert_separation(latent_store, vlm_sites=["vlm"], action_sites=["action"])
    vlm, act = s.read("vlm", "resid_post").astype(np.float64), s.read("action", "resid_post").astype(np.float64)
    vtok = s.static("vlm/token")
    text = (vtok >= s.root["vlm"].attrs["spans"]["text"][0]) & (vtok < s.root["vlm"].attrs["spans"]["text"][1])
    assert {r["vlm_span"] for r in rows} >= {"all", "text"} and {r["layer"] for r in rows} == {0, 1, 2}
    assert len({r["denoise"] for r in rows}) == 9 and rows[0]["n_samples"] == s.n_samples
    for r in rows:
        if r["action_span"] != "all" or r["vlm_span"] not in ("all", "text"):
            continue
        x = vlm[:, r["layer"]][:, text if r["vlm_span"] == "text" else slice(None)].mean(1)
        y = act[:, r["layer"], r["denoise"]].mean(1)
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        assert r["cka"] == pytest.approx(gram_cka(x, y), rel=1e-6)
        assert r["cosine"] == pytest.approx(cos.mean(), rel=1e-6)
        assert r["l2"] == pytest.approx(np.linalg.norm(x - y, axis=1).mean(), rel=1e-6)
    assert [r["t"] for r in rows[:9]] == pytest.approx(list(s.static("action/t")))


def test_experts_of_different_widths_get_cka_only(tmp_path, pi0_single_thread):
    from synthetic import registered

    with registered(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = toolkit.extract(model="pi0", dataset="synthetic", store=tmp_path / "p.zarr", sites=["text_only", "action"],
                               layers="1,3", dtype="float32", model_options={"num_steps": 2},
                               dataset_options=dict(n_tasks=2, n_episodes=2, n_steps=2))
    rows = expert_separation(path)
    s = open_store(path)
    assert {(r["vlm_site"], r["action_site"]) for r in rows} == {("text_only", "action")}
    for r in rows:
        assert np.isnan(r["cosine"]) and np.isnan(r["l2"]) and (r["vlm_width"], r["action_width"]) == (128, 64)
        x = s.read("text_only", "resid_post")[:, s.layers("text_only").index(r["layer"]), 0].astype(np.float64)
        y = s.read("action", "resid_post")[:, s.layers("action").index(r["layer"]), r["denoise"], 0].astype(np.float64)
        assert r["cka"] == pytest.approx(gram_cka(x, y), rel=1e-5)


def test_cli_writes_the_table_and_a_figure_per_layer(latent_store, tmp_path):
    from toolkit.cli.main import cli

    res = CliRunner().invoke(cli, ["separation", str(latent_store), "--vlm-site", "vlm", "--layers", "0,2",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["separation_layer0.png", "separation_layer2.png"]
    assert (tmp_path / "separation.csv").read_text().startswith("layer,vlm_site,vlm_span")
    bad = CliRunner().invoke(cli, ["separation", str(latent_store), "--vlm-site", "nope"])
    assert bad.exit_code == 2 and "no site 'nope'" in bad.output
    with pytest.raises(ToolkitError, match="layer 7 is out of range"):
        expert_separation(latent_store, ["vlm"], ["action"], layers="7")


def test_projection_picks_one_denoising_step(latent_store, tmp_path):
    from toolkit.cli.main import cli

    out = tmp_path / "p.png"
    res = CliRunner().invoke(cli, ["projection", str(latent_store), "--site", "action", "--layer", "1", "--denoise", "-1",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = open_store(latent_store)
    x = s.read("action", "resid_post")[:, 1, -1].astype(np.float64).mean(1)  # layer 1, last step, token mean
    x -= x.mean(0)
    u, sv, _ = np.linalg.svd(x, full_matrices=False)
    got = np.load(out.with_suffix(".npz"))["xy"]
    np.testing.assert_allclose(np.abs(got), np.abs(u[:, :2] * sv[:2]), rtol=1e-6, atol=1e-9)
    bad = CliRunner().invoke(cli, ["projection", str(latent_store), "--site", "vlm", "--denoise", "0"])
    assert bad.exit_code == 2 and "no denoising steps" in bad.output
