"""What made a store, said one way (`toolkit info`, `info --json`, repr(store), the probe report): random weights,
weights loaded from a checkpoint, or imported activations; and expert separation's centred default measures
(linear CKA, centred cosine) against the raw cosine and L2 that a shared mean offset fools."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import toolkit
from toolkit.analysis.separation import (MEASURES, PairSums, centred_cosine, columns, expert_separation,
                                         linear_cka)
from toolkit.sdk.errors import ToolkitError
from toolkit.store.reader import Weights, model_weights, open_store
from toolkit_plugins.libero.sample import write_latent_pickles


def cli(*args):
    from toolkit.cli.main import cli as group

    return CliRunner().invoke(group, [str(a) for a in args])


# --------------------------------------------------------------------------- the three kinds of store


@pytest.fixture(scope="module")
def stores(tmp_path_factory, pi0_single_thread):
    """A tiny random pi0 (the default extract), the same architecture loaded from a tiny lerobot checkpoint and
    with --random-weights from it, and an import of LIBERO latent pickles."""
    from test_pi0_checkpoints import native_weights, write_checkpoint
    from toolkit.sdk.hf import llama_tokenizer

    d = tmp_path_factory.mktemp("weights")
    tok = d / "tokenizer"
    llama_tokenizer().save_pretrained(tok)
    ckpt = write_checkpoint(d / "ck", "current", native_weights())
    out = {"random": d / "random.zarr", "checkpoint": d / "loaded.zarr", "random_arch": d / "random_arch.zarr",
           "imported": d / "imported.zarr"}
    small = ["--max-episodes", "1", "--max-steps", "1", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights notice
        for key, extra in (("random", []),
                           ("checkpoint", ["--checkpoint", ckpt, "--model-option", f"tokenizer={tok}"]),
                           ("random_arch", ["--checkpoint", ckpt, "--model-option", f"tokenizer={tok}",
                                            "--random-weights"])):
            res = cli("extract", out[key], "--model", "pi0", "--dataset", "libero", *extra, *small)
            assert res.exit_code == 0, res.output
    write_latent_pickles(d / "latents", n_tasks=2, n_episodes=5, n_steps=3, n_layers=2, width=8, n_img=2)
    toolkit.import_latents(dataset="libero", data=str(d / "latents"), store=out["imported"])
    return out, ckpt


def test_the_recorded_model_attributes_are_what_the_runs_did(stores):
    paths, ckpt = stores
    model = {k: open_store(p).attrs["model"] for k, p in paths.items()}
    assert model["random"]["random_init"] is True and model["random"]["checkpoint"] is None
    assert model["checkpoint"]["random_init"] is False and model["checkpoint"]["checkpoint"] == str(ckpt)
    assert model["random_arch"]["random_init"] is True and model["random_arch"]["checkpoint"] == str(ckpt)
    assert model["imported"] == {"name": "pi0", "checkpoint": None, "imported": True}


EXPECTED = {  # store -> (kind, random, a phrase `info`, repr and the report all carry)
    "random": ("random", True, "RANDOM weights (seeded, the adapter's default architecture: no checkpoint)"),
    "checkpoint": ("checkpoint", False, "loaded weights (from {ckpt})"),
    "random_arch": ("random", True, "RANDOM weights (seeded, in the architecture of {ckpt} with none of its "
                                    "weights: --random-weights)"),
    "imported": ("imported", False, "imported activations (no model run: stored from the data by `toolkit "
                                    "import`)"),
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_info_json_and_repr_say_the_same_thing(stores, key):
    paths, ckpt = stores
    kind, random, text = EXPECTED[key]
    text = text.format(ckpt=ckpt)
    store = open_store(paths[key])
    w = store.weights
    assert (w.kind, w.random, str(w)) == (kind, random, text)

    res = cli("info", paths[key])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    model_line = next(ln for ln in lines if ln.startswith("model "))
    assert f"weights   {text}" in lines
    assert ("checkpoint=random init" in model_line) == (key == "random")  # only without a checkpoint
    if key in ("checkpoint", "random_arch"):
        assert f"checkpoint={ckpt} " in model_line
    if key == "imported":
        assert "checkpoint=none " in model_line
    assert ("RANDOM" in res.output) == random and ("random init" in res.output) == (key == "random")

    js = cli("info", paths[key], "--json")
    assert js.exit_code == 0, js.output
    got = json.loads(js.output)["weights"]
    assert got == {"kind": kind, "random": random, "checkpoint": str(ckpt) if key in ("checkpoint", "random_arch")
                   else None, "missing": 0, "text": text}

    rep = repr(store)
    label, detail = text.split(" (", 1)
    assert f"  model    pi0 ({label}): {detail[:-1]}" in rep.splitlines()
    assert ("RANDOM weights" in rep) == random


@pytest.fixture(scope="module")
def probed(stores, tmp_path_factory):
    """A real probe run (on the import store, which has episodes enough) and its saved results."""
    from toolkit.analysis.probe import ProbeConfig, Selection

    paths, _ = stores
    out = tmp_path_factory.mktemp("probe") / "res"
    res = toolkit.probe(open_store(paths["imported"]), Selection(site="vlm", layers="-1"), targets=["task"],
                        config=ProbeConfig(mdl=False, success=False, n_folds=3))
    res.save(out)
    return out


@pytest.mark.parametrize("key", list(EXPECTED))
def test_the_probe_report_says_it_the_same_way(stores, probed, key, tmp_path):
    from toolkit.analysis.probe.report import write_report
    from toolkit.analysis.probe.results import Results

    paths, ckpt = stores
    kind, random, text = EXPECTED[key]
    text = text.format(ckpt=ckpt)
    res = Results.load(probed)
    res.meta["model"] = open_store(paths[key]).attrs["model"]  # the same rows, as if probed on this store
    res.save(tmp_path / "r")
    write_report(tmp_path / "r")
    md, html = (tmp_path / "r" / "report.md").read_text(), (tmp_path / "r" / "report.html").read_text()
    first = md.split("\n\n")[1]
    label, detail = text.split(" (", 1)
    shown = f"**{label}** ({detail}" if random else text
    assert first.startswith(f"Model **pi0**, {shown}; dataset libero;"), first
    assert ("Warning: the probed model has random weights" in md) == random
    assert ("Warning: the probed model has random weights" in html) == random
    assert "random init" not in md and "none recorded" not in md


def test_weights_of_hand_made_and_partial_attributes():
    assert model_weights(None) == Weights("unknown") and model_weights("tinyvla") == Weights("unknown")
    assert not model_weights({"name": "x", "checkpoint": None}).random  # nothing recorded: not guessed random
    assert model_weights({"name": "x", "checkpoint": "c", "random_init": True}) == Weights("random", "c")
    w = model_weights({"name": "x", "checkpoint": "c", "random_init": False,
                       "load_report": {"n_missing": 2, "missing": ["a", "b"]}})
    assert w == Weights("checkpoint", "c", 2) and "2 weights it lacked kept random values (--allow-missing)" in str(w)
    assert model_weights({"name": "x", "checkpoint": None, "imported": True, "random_init": True}).kind == "imported"


# --------------------------------------------------------------------------- separation measures


def numpy_cka(x, y):
    """Linear CKA straight from the formula: ||Ycᵀ Xc||²_F / (||Xcᵀ Xc||_F ||Ycᵀ Yc||_F), centred columns."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def numpy_cosines(x, y):
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def test_cka_matches_the_formula_on_small_data():
    rng = np.random.default_rng(3)
    for n, dx, dy in ((7, 3, 5), (12, 4, 4), (30, 6, 2)):
        x, y = rng.normal(size=(n, dx)) + 2.0, rng.normal(size=(n, dy)) - 1.0
        y[:, 0] += x[:, 0]  # some shared structure
        assert linear_cka(x, y) == pytest.approx(numpy_cka(x, y), rel=1e-10)


def test_an_offset_and_a_rotation_leave_cka_at_one_and_centred_cosine_as_expected():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 6))
    rot = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    offset = 50.0 * rng.normal(size=6)
    y = x @ rot + offset
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-9)
    xc, yc = x - x.mean(0), y - y.mean(0)
    assert centred_cosine(x, y) == pytest.approx(numpy_cosines(xc, yc).mean(), rel=1e-9)
    assert centred_cosine(x, y) == pytest.approx(np.trace(rot) / 6, abs=0.05)  # E cos(x, xR) = tr(R)/d
    shifted = x + offset  # the same up to the offset alone: centred cosine is exactly 1, raw cosine is not
    assert centred_cosine(x, shifted) == pytest.approx(1.0, abs=1e-12)
    assert numpy_cosines(x, shifted).mean() < 0.5


def test_a_shared_mean_offset_fools_raw_cosine_not_the_centred_measures():
    """The case the defaults exist for: independent representations with one large mean look alike raw."""
    rng = np.random.default_rng(5)
    n, d = 4000, 8
    offset = 100.0 * np.ones(d)
    x, y = rng.normal(size=(n, d)) + offset, rng.normal(size=(n, d)) + offset
    acc = PairSums(d, d, 1)
    acc.update(x, y[:, None])
    acc.update_centred(x, y[:, None])
    assert acc.cosine()[0] > 0.999  # raw: "the same"
    assert acc.cka()[0] < 0.01 and acc.cka()[0] == pytest.approx(numpy_cka(x, y), rel=1e-8)
    assert abs(acc.centred_cosine()[0]) < 0.02
    assert acc.centred_cosine()[0] == pytest.approx(numpy_cosines(x - x.mean(0), y - y.mean(0)).mean(), rel=1e-9)


def test_centred_cosine_streams_in_two_passes_and_is_nan_across_widths():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(30, 5)) + 3, rng.normal(size=(30, 2, 5)) - 3
    y[:, 1] += x
    acc = PairSums(5, 5, 2)
    for a in range(0, 30, 7):
        acc.update(x[a:a + 7], y[a:a + 7])
    assert np.isnan(acc.centred_cosine()).all()  # not before the second pass
    for a in range(0, 30, 7):
        acc.update_centred(x[a:a + 7], y[a:a + 7])
    want = [numpy_cosines(x - x.mean(0), y[:, t] - y[:, t].mean(0)).mean() for t in range(2)]
    np.testing.assert_allclose(acc.centred_cosine(), want, rtol=1e-10)
    other = PairSums(5, 3, 1)
    other.update(x, y[:, :1, :3])
    other.update_centred(x, y[:, :1, :3])
    assert np.isnan(other.centred_cosine()).all()


@pytest.fixture(scope="module")
def latent_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("latents_sep")
    write_latent_pickles(d, n_tasks=2, n_episodes=2, n_steps=3, n_layers=2, width=8, n_img=4)
    return toolkit.import_latents(dataset="libero", data=str(d), store=d / "s.zarr", pool="none", dtype="float32",
                                  chunk_samples=5)


def test_separation_rows_hold_the_centred_cosine_of_the_stored_arrays(latent_store):
    s = open_store(latent_store)
    rows = expert_separation(latent_store, ["vlm"], ["action"])
    vlm, act = s.read("vlm", "resid_post").astype(np.float64), s.read("action", "resid_post").astype(np.float64)
    for r in rows:
        if r["vlm_span"] != "all" or r["action_span"] != "all":
            continue
        x, y = vlm[:, r["layer"]].mean(1), act[:, r["layer"], r["denoise"]].mean(1)
        assert r["cosine_centred"] == pytest.approx(numpy_cosines(x - x.mean(0), y - y.mean(0)).mean(), rel=1e-6)
        assert r["cka"] == pytest.approx(numpy_cka(x, y), rel=1e-6)
    raw = expert_separation(latent_store, ["vlm"], ["action"], measure="raw")  # no second pass
    assert all(np.isnan(r["cosine_centred"]) for r in raw)
    assert [r["cosine"] for r in raw] == [r["cosine"] for r in rows]
    with pytest.raises(ToolkitError, match="unknown separation measure 'cosine'; measures: centred, raw, all"):
        expert_separation(latent_store, measure="cosine")


def test_the_cli_defaults_to_centred_measures_and_says_why(latent_store, tmp_path):
    res = cli("separation", latent_store, "--layers", "0", "--out", tmp_path / "c", "--no-figures")
    assert res.exit_code == 0, res.output
    assert "measures: linear CKA, centred cosine. Centred by default because raw cosine and L2 are dominated by " \
           "the experts' mean vectors: a constant offset such as a bias or a norm's shift makes raw cosine high" \
           in res.output
    head = (tmp_path / "c" / "separation.csv").read_text().splitlines()[0].split(",")
    assert head == columns("centred") and "cka" in head and "cosine_centred" in head and "cosine" not in head
    js = json.loads((tmp_path / "c" / "separation.json").read_text())
    assert js["measures"] == ["cka", "cosine_centred"] and "constant offset" in js["note"]
    assert set(js["rows"][0]) == set(head)
    assert any(ln.split()[:3] == ["0", "vlm/all", "action/all"] for ln in res.output.splitlines())

    raw = cli("separation", latent_store, "--layers", "0", "--out", tmp_path / "r", "--measure", "raw")
    assert raw.exit_code == 0, raw.output
    assert "measures: raw cosine, raw L2. Caution:" in raw.output
    head = (tmp_path / "r" / "separation.csv").read_text().splitlines()[0].split(",")
    assert [c for c in head if c in MEASURES["all"]] == ["cosine", "l2"]
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == ["separation_layer0.png"]
    both = cli("separation", latent_store, "--layers", "0", "--out", tmp_path / "a", "--measure", "all",
               "--no-figures")
    assert both.exit_code == 0, both.output
    assert (tmp_path / "a" / "separation.csv").read_text().splitlines()[0].split(",") == columns("all")
    bad = cli("separation", latent_store, "--measure", "cosine")
    assert bad.exit_code == 2 and "Invalid value for '--measure'" in bad.output
