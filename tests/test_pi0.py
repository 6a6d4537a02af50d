"""The built-in pi0 adapter on its small random model: conformance, capture fidelity, loading, dtypes, errors."""

import warnings
from functools import partial

import numpy as np
import pytest
import torch

import toolkit
from toolkit.sdk.adapters import Step
from toolkit.sdk.errors import ToolkitError
import pi_common
from pi_common import assert_resid_post_is_hidden_states, first_steps
from toolkit.testing import check_model_adapter, full_plan, generators, run_captured
from toolkit.sdk.hf import llama_tokenizer
from toolkit_plugins.pi0 import Pi0Adapter
from toolkit_plugins.pi0.adapter import RANDOM_WARNING

pytestmark = pytest.mark.usefixtures("pi0_single_thread")

INSTRUCTIONS = ["pick up the cream cheese and place it in the basket", "open the top drawer"]
extract = partial(pi_common.extract, "pi0")  # extract(store, dataset, **options)
dataset = pi_common.camera_dataset("pi0_test_steps", INSTRUCTIONS)  # a module fixture


@pytest.fixture(scope="module")
def batch():
    return first_steps(INSTRUCTIONS)


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, dataset):
    """Every layer and token of both experts, float32, unpooled."""
    return toolkit.open_store(extract(tmp_path_factory.mktemp("pi0") / "full.zarr", dataset, sites=["vlm", "action"],
                                      tokens="all", pool="none", dtype="float32", batch_size=2))


def test_conformance(pi0_adapter, batch):
    check_model_adapter(pi0_adapter, batch)


def test_streams_fit_gemma_decoder_layers(pi0_adapter, batch):
    """resid_pre + attn_out = resid_mid, resid_mid + mlp_out = resid_post, layer i's output feeds layer i+1."""
    inputs = pi0_adapter.prepare(batch[:1])
    _, arrays = run_captured(pi0_adapter, inputs, full_plan(pi0_adapter))
    for site in ("vlm", "action"):
        a = {k.split("/")[1]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(site + "/")}
        torch.testing.assert_close(a["resid_pre"] + a["attn_out"], a["resid_mid"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["resid_mid"] + a["mlp_out"], a["resid_post"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["resid_post"][:, :-1], a["resid_pre"][:, 1:])
        rms = torch.rsqrt(a["resid_mid"].pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(a["pre_mlp_norm_scale"], rms)
    assert arrays["action/resid_post"].shape == (1, 6, 10, 51, 64)


def test_random_model_warns_once():
    with pytest.warns(UserWarning) as rec:
        Pi0Adapter()
    assert [str(w.message) for w in rec] == [RANDOM_WARNING]


def test_prepare_layout(pi0_adapter, batch):
    inputs = pi0_adapter.prepare(batch)
    spans = inputs.spans["vlm"]
    assert spans["image.agentview"] == list(range(16)) and spans["image.wrist"] == list(range(16, 32))
    assert spans["text"] == list(range(32, 80)) and inputs.seq_len == {"vlm": 80, "action": 51}
    assert inputs.spans["action"] == {"state": [0], "actions": list(range(1, 51))}
    ids, mask = inputs.tensors["input_ids"], inputs.token_mask["vlm"]
    tok = llama_tokenizer()
    text = [tok.bos_token_id, *tok(INSTRUCTIONS[0] + "\n", add_special_tokens=False)["input_ids"]]
    assert ids[0, 32:32 + len(text)].tolist() == text and (ids[0, :32] == 32000).all()
    assert mask[0].sum() == 32 + len(text) and not mask[0, 32 + len(text):].any()
    px = inputs.tensors["pixel_values"]
    assert px.shape == (3, 2, 3, 56, 56) and px.min() >= -1 and px.max() <= 1


def test_missing_camera_is_masked(pi0_adapter, batch):
    ep, step = batch[0]
    lone = Step(index=0, images={"agentview": step.images["agentview"]}, state=step.state)
    inputs = pi0_adapter.prepare([(ep, lone)])
    assert inputs.token_mask["vlm"][0, :16].all() and not inputs.token_mask["vlm"][0, 16:32].any()
    assert (inputs.tensors["pixel_values"][0, 1] == 0).all()
    assert np.isfinite(pi0_adapter.run(inputs, generators(1)).actions).all()


def test_vlm_resid_post_equals_output_hidden_states(pi0_adapter, full_store, batch):
    """Captured per-layer outputs == transformers' own hidden states (last layer: through the final norm)."""
    got = full_store.read("vlm", "resid_post")  # (sample, layer, token, feature)
    assert got.shape == (4, 6, 80, 128)
    assert_resid_post_is_hidden_states(pi0_adapter, batch, got[:3])  # batch: the store's first 3 samples


def test_action_expert_is_captured_once_per_denoising_step(full_store):
    assert full_store.dims("action", "resid_post") == ("sample", "layer", "denoise", "token", "feature")
    got = full_store.read("action", "resid_post")
    assert got.shape == (4, 6, 10, 51, 64)
    np.testing.assert_allclose(full_store.static("action/t"), np.linspace(1.0, 0.1, 10), atol=1e-6)
    for k in range(1, 10):  # the noisy actions change every step, so do the hidden states
        assert not np.allclose(got[:, :, k], got[:, :, k - 1])
    assert full_store.coord("policy_action").shape == (4, 50, 7)


def test_saved_checkpoint_loads_to_the_same_values(pi0_adapter, full_store, dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    pi0_adapter.model.save_pretrained(ckpt)
    pi0_adapter.tokenizer.save_pretrained(ckpt)
    s = toolkit.open_store(extract(tmp_path / "ckpt.zarr", dataset, checkpoint=str(ckpt), sites=["vlm", "action"],
                                   tokens="all", pool="none", dtype="float32", batch_size=2))
    assert s.attrs["model"]["checkpoint"] == str(ckpt) and s.attrs["model"]["random_init"] is False
    for site in ("vlm", "action"):
        np.testing.assert_array_equal(s.read(site, "resid_post"), full_store.read(site, "resid_post"))
    np.testing.assert_array_equal(s.coord("policy_action"), full_store.coord("policy_action"))


def test_bfloat16_model_runs(batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bf = Pi0Adapter(dtype="bfloat16")
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    inputs = bf.prepare(batch)
    assert inputs.tensors["pixel_values"].dtype == torch.bfloat16
    out = bf.run(inputs, generators(3))
    assert out.actions.shape == (3, 50, 7) and np.isfinite(out.actions).all()


def test_bfloat16_storage_round_trip(full_store, dataset, tmp_path):
    s = toolkit.open_store(extract(tmp_path / "bf16.zarr", dataset, sites=["vlm"], tokens="text", pool="none",
                                   layers="0,5", dtype="bfloat16"))
    assert s.summary()["sites"]["vlm"]["streams"]["resid_post"]["dtype"] == "bfloat16"
    got = s.read("vlm", "resid_post", layer=5)
    want = torch.from_numpy(full_store.read("vlm", "resid_post", layer=5)[:, 32:]).to(torch.bfloat16).float()
    np.testing.assert_array_equal(got, want.numpy())


def test_missing_checkpoint_is_one_line_error(tmp_path):
    with pytest.raises(ToolkitError) as err:
        Pi0Adapter(checkpoint=str(tmp_path / "no_such_checkpoint"))
    msg = str(err.value)
    assert "no_such_checkpoint" in msg and "does not exist" in msg and "\n" not in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolkitError) as err:
        Pi0Adapter(checkpoint=str(tmp_path / "empty"))
    assert "cannot load pi0 checkpoint" in str(err.value) and "\n" not in str(err.value)


def test_unreachable_hub_id_is_one_line_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ToolkitError, match="cannot load pi0 checkpoint 'nobody/no-such-pi0'") as err:
        Pi0Adapter(checkpoint="nobody/no-such-pi0")
    assert "\n" not in str(err.value)


def test_layer_out_of_range_names_the_valid_range(dataset, tmp_path):
    with pytest.raises(ToolkitError, match=r"layer 6 is out of range: .*0-5"):
        extract(tmp_path / "bad.zarr", dataset, layers="6")
    assert not (tmp_path / "bad.zarr").exists()


def test_default_sites_pool_real_tokens(pi0_adapter, full_store, batch, dataset, tmp_path):
    s = toolkit.open_store(extract(tmp_path / "default.zarr", dataset, dtype="float32"))
    assert sorted(s.sites) == ["action", "text_only", "vlm"] and s.n_samples == 4
    mask = pi0_adapter.prepare(batch).token_mask["vlm"][0].numpy()  # sample 0: padding excluded from the mean
    text = full_store.read("vlm", "resid_post", samples=slice(0, 1))[0][:, mask & (np.arange(80) >= 32)]
    np.testing.assert_allclose(s.read("text_only", "resid_post")[0, :, 0], text.mean(1), atol=1e-5, rtol=1e-5)
    assert s.read("vlm", "resid_post").shape == (4, 6, 1, 128)
    assert s.read("text_only", "resid_post").shape == (4, 6, 1, 128)
    assert s.read("action", "resid_post").shape == (4, 6, 10, 1, 64)
    assert s.attrs["model"]["random_init"] is True and s.attrs["model"]["cameras"] == ["agentview", "wrist"]


def test_unknown_option_is_one_line_error():
    with pytest.raises(ToolkitError, match="pi0 has no option 'nope'; options: action_dim"):
        Pi0Adapter(nope=1)
