"""pi0 checkpoints in the layouts users hold (tiny, built here from the upstream key names and file formats):
every tensor is used, a dropped one is a one-line error, normalisation follows each pipeline's own formulas."""

from __future__ import annotations

import json
import shlex
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import toolkit
from toolkit.sdk.checkpoint import CheckpointError
from toolkit.sdk.errors import ToolkitError
from toolkit.testing import generators
from toolkit_plugins.pi0 import Pi0Adapter
from toolkit_plugins.pi0.normalise import Stats
import pi_common
from pi_common import ACTION_DIM, ACTION_STATS, NORMALISER, SMALL_EXPERTS, STATE_DIM, STATE_STATS
from pi_common import assert_every_weight_loaded, assert_loaded_from_file, assert_small_architecture, save_pretrained
from pi_common import small_model, tokenizer_step, toolkit_cli, write_lerobot_processors, write_openpi_files
from synthetic import camera_episodes

pytestmark = pytest.mark.usefixtures("pi0_single_thread")
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"

SMALL = {**SMALL_EXPERTS, "max_state_dim": 32}  # the real pi0 head layout at toy widths


def native_weights(seed: int = 3) -> dict[str, torch.Tensor]:
    model = small_model("PI0ForConditionalGeneration", SMALL, seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _siglip(rest: str) -> str:
    return rest.removeprefix("vision_model.")


def file_key(name: str, layout: str) -> str:
    """Where a transformers PI0 weight lives in each upstream layout (written from the key facts, not the loader)."""
    pe = "paligemma_with_expert."
    older = layout == "older"
    if name == "model.vlm.language_model.embed_tokens.weight":  # only the tied lm_head is saved
        key = pe + ("paligemma.language_model.lm_head.weight" if older else "paligemma.lm_head.weight")
    elif name.startswith("model.vlm.language_model."):
        rest = name.removeprefix("model.vlm.language_model.")
        key = pe + ("paligemma.language_model.model." if older else "paligemma.model.language_model.") + rest
    elif name.startswith("model.vlm.vision_tower."):
        rest = _siglip(name.removeprefix("model.vlm.vision_tower."))
        key = pe + ("paligemma.vision_tower.vision_model." if older else
                    "paligemma.model.vision_tower.vision_model.") + rest
    elif name.startswith("model.vlm.multi_modal_projector."):
        rest = name.removeprefix("model.vlm.multi_modal_projector.")
        key = pe + ("paligemma.multi_modal_projector." if older else "paligemma.model.multi_modal_projector.") + rest
    elif name == "model.dit.embed_tokens.weight":
        key = pe + "gemma_expert.lm_head.weight"
    elif name.startswith("model.dit."):
        key = pe + "gemma_expert.model." + name.removeprefix("model.dit.")
    elif name.startswith("embed_action_time."):
        key = name.removeprefix("embed_action_time.")
    else:
        assert name.startswith("action_out_proj."), name
        key = name
    return key if layout == "openpi" else "model." + key


LEROBOT_CONFIG = {
    "type": "pi0", "n_obs_steps": 1, "chunk_size": 50, "n_action_steps": 50, "max_state_dim": 32,
    "max_action_dim": 32, "num_steps": 10, "tokenizer_max_length": 48, "resize_imgs_with_padding": [224, 224],
    "proj_width": 1024, "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
    "input_features": {"observation.state": {"type": "STATE", "shape": [STATE_DIM]},
                       "observation.images.image": {"type": "VISUAL", "shape": [3, 224, 224]}},
    "output_features": {"action": {"type": "ACTION", "shape": [ACTION_DIM]}},
}


def write_processors(d: Path) -> None:
    """lerobot pi0's policy_preprocessor.json / policy_postprocessor.json and their normaliser step files."""
    write_lerobot_processors(d, LEROBOT_CONFIG["normalization_mapping"], [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "pi0_new_line_processor", "config": {}},
        tokenizer_step(48),
        {"registry_name": "device_processor", "config": {"device": "cpu"}},
        NORMALISER], [{"registry_name": "device_processor", "config": {"device": "cpu"}}])


def write_checkpoint(d: Path, layout: str, weights: dict[str, torch.Tensor], drop: str | None = None) -> Path:
    """A tiny checkpoint directory in one upstream layout, with its config and statistics files."""
    d.mkdir(parents=True, exist_ok=True)
    # openpi's converter leaves out the action expert's lm_head (its line is commented out upstream)
    skip = {drop, "model.dit.embed_tokens.weight" if layout == "openpi" else None}
    tensors = {file_key(n, layout): t for n, t in weights.items() if n not in skip}
    if layout == "older":  # the older lerobot policies kept their statistics among the weights
        for module, feature, stats in (("normalize_inputs", "observation_state", STATE_STATS),
                                       ("normalize_targets", "action", ACTION_STATS),
                                       ("unnormalize_outputs", "action", ACTION_STATS)):
            tensors.update({f"{module}.buffer_{feature}.{k}": torch.tensor(stats[k]) for k in ("mean", "std")})
    save_file(tensors, str(d / "model.safetensors"))
    if layout in ("current", "older"):
        (d / "config.json").write_text(json.dumps(LEROBOT_CONFIG))
        if layout == "current":
            write_processors(d)
    else:  # openpi's converter writes its config.json and copies the training assets
        write_openpi_files(d)
    return d


@pytest.fixture(scope="module")
def weights():
    return native_weights()


load = partial(pi_common.load, Pi0Adapter)  # load(ckpt, tokenizer_dir, **options)


@pytest.mark.parametrize("layout, name", [("current", "lerobot pi0 (current)"),
                                          ("openpi", "openpi pi0 converted to PyTorch"),
                                          ("older", "lerobot pi0 (older, before lerobot PR #1415)")])
def test_each_layout_loads_every_tensor_of_the_file(layout, name, weights, tokenizer_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / layout, layout, weights)
    a = load(ckpt, tokenizer_dir)
    derived = ["model.dit.embed_tokens.weight"] if layout == "openpi" else []  # never used by pi0's forward
    # every model tensor equals the file tensor at its upstream key; the derived one is zeroed, named in the report
    file = assert_loaded_from_file(a, ckpt, weights, lambda n: file_key(n, layout), derived)
    report = a.load_report
    assert report.layout == name and report.missing == [] and report.unexpected == []
    assert report.derived == derived and len(report.loaded) == len(weights) - len(derived) == len(file) - (
        6 if layout == "older" else 0)  # the older layout's six statistics buffers are read as statistics
    assert a.layout == name
    d = a.describe()
    assert d["random_init"] is False and d["load_report"]["n_loaded"] == len(report.loaded)
    assert_small_architecture(a)


def test_transformers_save_pretrained_round_trips(weights, tokenizer_dir, tmp_path):
    a = load(save_pretrained("PI0ForConditionalGeneration", SMALL, weights, tmp_path / "tf"), tokenizer_dir)
    assert a.layout == "transformers PI0 save_pretrained"
    assert_every_weight_loaded(a, weights)


def test_a_dropped_weight_is_one_line_error_and_no_store(weights, tokenizer_dir, tmp_path):
    dropped = "model.vlm.vision_tower.encoder.layers.1.mlp.fc2.weight"
    ckpt = write_checkpoint(tmp_path / "ck", "current", weights, drop=dropped)
    store = tmp_path / "s.zarr"
    res = toolkit_cli("extract", "--model", "pi0", "--checkpoint", str(ckpt), "--model-option",
                      f"tokenizer={tokenizer_dir}", "--store", str(store), "--max-episodes", "1", "--max-steps", "1",
                      "--no-progress")
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert f"1 of {len(weights)} weights are not in the checkpoint (recognised layout: lerobot pi0 (current))" in lines[0]
    assert dropped in lines[0] and "--allow-missing" in lines[0]
    assert not store.exists()

    res = toolkit_cli("extract", "--model", "pi0", "--checkpoint", str(ckpt), "--model-option",
                      f"tokenizer={tokenizer_dir}", "--store", str(store), "--max-episodes", "1", "--max-steps", "1",
                      "--no-progress", "--allow-missing")
    assert res.returncode == 0, res.stderr
    model = toolkit.open_store(store).attrs["model"]
    assert model["load_report"]["missing"] == [dropped] and model["load_report"]["n_missing"] == 1
    assert model["random_init"] is False and model["layout"] == "lerobot pi0 (current)"


def test_random_weights_keep_the_checkpoint_architecture_and_say_so(weights, tokenizer_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", "openpi", weights)
    a = load(ckpt, tokenizer_dir, random_weights=True, seed=5)
    assert a.describe()["random_init"] is True and a.load_report is None
    got = a.model.state_dict()
    assert {n: tuple(t.shape) for n, t in got.items()} == {n: tuple(t.shape) for n, t in weights.items()}
    assert not torch.equal(got["action_out_proj.weight"], weights["action_out_proj.weight"])
    again = load(ckpt, tokenizer_dir, random_weights=True, seed=5).model.state_dict()
    assert all(torch.equal(got[n], again[n]) for n in got)  # seeded


def test_native_openpi_jax_checkpoint_says_how_to_convert(tmp_path):
    ckpt = tmp_path / "pi0_libero"
    (ckpt / "params").mkdir(parents=True)
    (ckpt / "params" / "_METADATA").write_text("{}")
    (ckpt / "assets").mkdir()
    res = toolkit_cli("extract", "--model", "pi0", "--checkpoint", str(ckpt), "--store", str(tmp_path / "s.zarr"))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert "native openpi JAX checkpoint" in lines[0] and "examples/convert_jax_model_to_pytorch.py" in lines[0]
    assert not (tmp_path / "s.zarr").exists()


def test_missing_tokenizer_names_what_to_download(weights, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    ckpt = write_checkpoint(tmp_path / "ck", "openpi", weights)
    with pytest.raises(ToolkitError) as err:
        Pi0Adapter(checkpoint=str(ckpt))
    msg = str(err.value)
    assert "\n" not in msg and "google/paligemma-3b-pt-224" in msg and "--model-option tokenizer=DIR" in msg
    with pytest.raises(ToolkitError, match="tokenizer=.*nowhere does not exist"):
        Pi0Adapter(checkpoint=str(ckpt), tokenizer=str(tmp_path / "nowhere"))


def test_an_unknown_layout_is_one_line(tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"not a pi0 layout the toolkit knows \(first keys: encoder.weight\)"):
        Pi0Adapter(checkpoint=str(tmp_path))


# --------------------------------------------------------------------------- normalisation


def test_lerobot_formulas_round_trip():
    x = np.random.default_rng(0).normal(size=(4, STATE_DIM)).astype(np.float32) * 3
    m, s, eps = STATE_STATS["mean"], STATE_STATS["std"], 1e-8
    st = Stats("lerobot", "MEAN_STD", {"mean": m, "std": s}, eps)
    np.testing.assert_allclose(st.normalise(x), (x - m) / (s + eps), rtol=1e-6)
    np.testing.assert_allclose(st.unnormalise(st.normalise(x)), x, rtol=1e-5, atol=1e-5)
    lo, hi = STATE_STATS["q01"], STATE_STATS["q99"]
    q = Stats("lerobot", "QUANTILES", {"q01": lo, "q99": hi}, eps)
    np.testing.assert_allclose(q.normalise(x), 2 * (x - lo) / (hi - lo) - 1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.unnormalise(q.normalise(x)), x, rtol=1e-5, atol=1e-5)


def test_openpi_formulas_round_trip_and_pad():
    x = np.random.default_rng(1).normal(size=(3, 50, 10)).astype(np.float32)
    m, s = ACTION_STATS["mean"], ACTION_STATS["std"]
    st = Stats("openpi", "MEAN_STD", {"mean": m, "std": s}, 1e-6)
    want = x.copy()
    want[..., :7] = x[..., :7] * (s + 1e-6) + m
    want[..., 7:] = x[..., 7:] * (1 + 1e-6)  # mean padded with 0, std with 1
    np.testing.assert_allclose(st.unnormalise(x), want, rtol=1e-6)
    y = x[..., :5]  # fewer dims than the statistics: the leading statistics are used
    np.testing.assert_allclose(st.normalise(y), (y - m[:5]) / (s[:5] + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(st.unnormalise(np.pad(st.normalise(x[..., :7]), ((0, 0), (0, 0), (0, 3))))[..., :7],
                               x[..., :7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout, eps, state_source", [("current", 1e-8, "policy_preprocessor_step_5"),
                                                       ("openpi", 1e-6, "norm_stats.json"),
                                                       ("older", 1e-8, "normalisation buffers")])
def test_checkpoint_statistics_normalise_state_and_unnormalise_actions(layout, eps, state_source, weights,
                                                                       tokenizer_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / layout, layout, weights)
    normed, raw = load(ckpt, tokenizer_dir), load(ckpt, tokenizer_dir, normalise="false")
    batch = [(ep, step) for ep in camera_episodes(["pick up the bowl"], n_episodes=1) for step in ep.steps()]
    state = np.stack([step.state for _, step in batch])
    m, s = STATE_STATS["mean"], STATE_STATS["std"]
    got = normed.prepare(batch).tensors["state"].numpy()
    np.testing.assert_allclose(got[:, :STATE_DIM], (state - m) / (s + eps), rtol=1e-5, atol=1e-6)
    assert not got[:, STATE_DIM:].any()  # zero-padded after normalising
    np.testing.assert_array_equal(raw.prepare(batch).tensors["state"].numpy()[:, :STATE_DIM], state)
    inputs = raw.prepare(batch)  # the same model inputs through both: only the output mapping differs
    a_raw = raw.run(inputs, generators(len(batch))).actions
    a_norm = normed.run(inputs, generators(len(batch))).actions
    am, asd = ACTION_STATS["mean"], ACTION_STATS["std"]
    want = a_raw * (asd + 1e-6) + am if layout == "openpi" else a_raw * asd + am
    np.testing.assert_allclose(a_norm, want, rtol=1e-5, atol=1e-5)
    d = normed.describe()["normalisation"]
    assert state_source in d["source"] and d["state"]["mode"] == "MEAN_STD" and d["state"]["eps"] == eps
    assert raw.describe()["normalisation"] == "disabled (--no-normalise)"


# --------------------------------------------------------------------------- the guide's command


def readme_command() -> list[str]:
    """docs/checkpoints.md's pi0 real-checkpoint command (the block after the 'pi0-checkpoint-command' marker)."""
    text = GUIDE.read_text()
    block = text[text.index("<!-- pi0-checkpoint-command -->"):]
    start = block.index("\n", block.index("```bash")) + 1  # after the fence's info line
    block = block[start:block.index("```", start)]
    return shlex.split(block.replace("\\\n", " "))


def test_the_readme_pi0_checkpoint_command_runs_on_a_tiny_lerobot_checkpoint(weights, tokenizer_dir, tmp_path):
    """docs/checkpoints.md's command with the user's paths replaced by a tiny lerobot checkpoint and --device cpu."""
    args = readme_command()
    assert args[:2] == ["toolkit", "extract"] and "--checkpoint" in args and "--device" in args
    ckpt = write_checkpoint(tmp_path / "pi0_libero", "current", weights)
    replace = {"--checkpoint": str(ckpt), "--store": str(tmp_path / "pi0.zarr"), "--device": "cpu"}
    out = args[1:]
    for i, a in enumerate(out):
        if i and out[i - 1] in replace:
            out[i] = replace[out[i - 1]]
        elif a.startswith("tokenizer="):
            out[i] = f"tokenizer={tokenizer_dir}"
    res = toolkit_cli(*out, "--max-episodes", "1", "--max-steps", "2", "--no-progress")
    assert res.returncode == 0, res.stderr
    s = toolkit.open_store(tmp_path / "pi0.zarr")
    model = s.attrs["model"]
    assert model["random_init"] is False and model["load_report"]["n_missing"] == 0
    assert model["layout"] == "lerobot pi0 (current)" and model["normalised"] is True
    assert "policy_preprocessor_step_5_normalizer_processor.safetensors" in model["normalisation"]["source"]
    assert s.n_samples == 2


def test_statistics_and_tokenizer_can_be_given_as_files(weights, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", "openpi", weights)
    extra = ckpt / "assets" / "other_robot"
    extra.mkdir()
    (extra / "norm_stats.json").write_text(json.dumps({"norm_stats": {"state": {"mean": [0.0] * 8, "std": [1.0] * 8},
                                                                      "actions": {"mean": [5.0] * 7, "std": [1.0] * 7}}}))
    import importlib.resources
    import shutil

    spm = tmp_path / "paligemma_tokenizer.model"  # a bare SentencePiece file, as openpi downloads it
    with importlib.resources.as_file(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1") as f:
        shutil.copy(f, spm)
    with pytest.raises(ToolkitError, match="holds 2 openpi statistics .* --model-option stats=PATH"):
        Pi0Adapter(checkpoint=str(ckpt), tokenizer=str(spm))
    a = Pi0Adapter(checkpoint=str(ckpt), tokenizer=str(spm), stats=str(extra / "norm_stats.json"))
    assert a.describe()["normalisation"]["source"] == str(extra / "norm_stats.json")
    np.testing.assert_allclose(a.norm.action.unnormalise(np.zeros((1, 2, 7))), 5.0)
    assert len(a._text("pick up the bowl")) > 2


def test_the_lerobot_action_feature_size_sets_the_kept_action_dims(weights, tokenizer_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", "current", weights)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["output_features"]["action"]["shape"] = [6]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert load(ckpt, tokenizer_dir).action_dim == 6
    assert load(ckpt, tokenizer_dir, action_dim=4).action_dim == 4
