"""The built-in OpenVLA adapter on its small random Prismatic model: conformance, capture fidelity, prompt and
action decoding, both capture modes, and errors (real-layout checkpoints: test_openvla_checkpoint.py)."""

import warnings

import numpy as np
import pytest
import torch

import toolkit
from toolkit.sdk.adapters import DatasetAdapter
from toolkit.sdk.errors import ToolkitError
from synthetic import camera_episodes, dataset_registered
from toolkit.testing import check_model_adapter, full_plan, generators, run_captured
from toolkit_plugins.openvla import OpenVLAAdapter
from toolkit_plugins.openvla.adapter import PROMPT, RANDOM_WARNING
from toolkit_plugins.openvla.model import TINY_NORM_STATS

pytestmark = pytest.mark.usefixtures("pi0_single_thread")  # tiny models run fastest on one thread

INSTRUCTIONS = ["Pick up the cream cheese and place it in the basket", "open the top drawer"]




class OpenVLASteps(DatasetAdapter):
    name = "openvla_test_steps"

    def episodes(self):
        yield from camera_episodes(INSTRUCTIONS)


def new_adapter(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return OpenVLAAdapter(seed=0, **kw)


@pytest.fixture(scope="module")
def dataset():
    with dataset_registered(OpenVLASteps) as name:
        yield name


@pytest.fixture(scope="module")
def batch():
    return [(ep, step) for ep in camera_episodes(INSTRUCTIONS) for step in ep.steps()][:3]


@pytest.fixture(scope="module")
def prefix():
    return new_adapter()


@pytest.fixture(scope="module")
def actions():
    return new_adapter(capture="actions")


def extract(store, dataset, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return toolkit.extract(model="openvla", dataset=dataset, store=store, **kw)


@pytest.mark.parametrize("mode", ["prefix", "actions"])
def test_conformance(mode, prefix, actions, batch):
    check_model_adapter(prefix if mode == "prefix" else actions, batch)


def test_random_model_warns_once():
    with pytest.warns(UserWarning) as rec:
        OpenVLAAdapter()
    assert [str(w.message) for w in rec] == [RANDOM_WARNING]


def test_hook_paths_match_openvla(prefix):
    ex = prefix.experts
    assert ex["llm"].layers_path == "language_model.model.layers" and ex["llm"].n_layers == 2
    assert ex["dino"].layers_path == "vision_backbone.featurizer.blocks"  # timm's names, as in the checkpoint
    assert ex["siglip"].layers_path == "vision_backbone.fused_featurizer.blocks"
    assert ex["projector"].layers_path == "projector" and not ex["projector"].layered
    m = prefix.model
    assert [n for n, _ in m.projector.named_children()] == ["fc1", "fc2", "fc3", "act_fn1", "act_fn2"]
    assert m.language_model.config.vocab_size == 32064 and prefix.vocab == 32000


def test_prompt_and_layout(prefix, batch):
    inputs = prefix.prepare(batch)
    n_vis, n_prompt = 16, 64
    assert inputs.seq_len["llm"] == 1 + n_vis + n_prompt
    spans = inputs.spans["llm"]
    assert spans["bos"] == [0] and spans["vision"] == list(range(1, 17)) and spans["prompt"] == list(range(17, 81))
    assert spans["action"] == [80]  # the position whose output predicts the first action token
    tok = prefix.tokenizer
    ids = inputs.tensors["text_ids"][0]
    real = ids[inputs.tensors["attention_mask"][0, n_vis:].bool()].tolist()
    assert real[0] == tok.bos_token_id
    assert real[-1] == tok.convert_tokens_to_ids("▁")  # OpenVLA's predict_action appends "▁"
    text = tok.decode(real[1:-1])
    assert text == PROMPT.format(instruction=INSTRUCTIONS[0].lower())
    assert text.startswith("In: What action should the robot take to pick up the cream cheese")
    mask = inputs.token_mask["llm"][0]
    assert mask[: 1 + n_vis].all() and mask.sum() == 1 + n_vis + len(real) - 1
    assert inputs.tensors["pixel_values"].shape == (3, 6, 56, 56)


def test_llm_residuals_equal_output_hidden_states(prefix, batch):
    """Layer i's captured output == hidden_states[i + 1] of transformers' own forward; the embedding
    site == hidden_states[0] (the multimodal input embeddings)."""
    inputs = prefix.prepare(batch)
    _, arrays = run_captured(prefix, inputs, full_plan(prefix))
    embeds, mask = prefix._embed_prefix(inputs)
    with torch.no_grad():
        hs = prefix.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                       output_hidden_states=True).hidden_states
    got = torch.from_numpy(arrays["llm/resid_post"])
    torch.testing.assert_close(got[:, 0], hs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefix.lm.model.norm(got[:, 1]), hs[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(arrays["embedding/resid_post"][:, 0]), hs[0])
    torch.testing.assert_close(torch.from_numpy(arrays["llm/resid_pre"][:, 0]), hs[0])
    # the projector output is what the LLM sees at the vision positions
    torch.testing.assert_close(torch.from_numpy(arrays["projector/resid_post"][:, 0]), hs[0][:, 1:17])


def test_padding_does_not_change_values(prefix, batch):
    """A sample's values are the same alone or batched with a longer/shorter prompt."""
    both = prefix.prepare(batch[1:3])  # different instructions, different prompt lengths
    out_b, arr_b = run_captured(prefix, both, full_plan(prefix))
    out_1, arr_1 = run_captured(prefix, prefix.prepare(batch[2:3]), full_plan(prefix))
    np.testing.assert_array_equal(out_b.actions[1:], out_1.actions)
    mask = both.token_mask["llm"][1].numpy()
    np.testing.assert_allclose(arr_b["llm/resid_post"][1][:, mask], arr_1["llm/resid_post"][0][:, mask],
                               atol=1e-5, rtol=1e-5)


def test_action_decoding(prefix, batch):
    stats = TINY_NORM_STATS["bridge_orig"]["action"]
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    tokens = np.array([[31999, 31744, 31871, 31872, 5, 31900, 31999]])  # 5: not an action token, clipped
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    norm = centers[np.clip(32000 - tokens - 1, 0, 254)]
    want = 0.5 * (norm + 1) * (q99 - q01) + q01
    want[..., 6] = norm[..., 6]  # the gripper is masked: left normalised
    np.testing.assert_allclose(prefix.decode_actions(tokens), want, rtol=1e-6)
    out = prefix.run(prefix.prepare(batch), generators(3))
    assert out.actions.shape == (3, 1, 7) and prefix.last_tokens.shape == (3, 7)
    np.testing.assert_allclose(out.actions[:, 0], prefix.decode_actions(prefix.last_tokens), rtol=1e-6)
    assert ((prefix.last_tokens >= 31744) & (prefix.last_tokens < 32000)).any()


def test_actions_mode_holds_every_generated_token(prefix, actions, batch):
    """capture=actions: the sequence grows by the generated tokens; its prefix equals the prefix capture, and
    the 'action' span is the 7 positions whose outputs predicted the 7 action tokens."""
    a_in, p_in = actions.prepare(batch), prefix.prepare(batch)
    assert a_in.seq_len["llm"] == p_in.seq_len["llm"] + 6
    assert a_in.spans["llm"]["action"] == list(range(80, 87))
    out_a, arr_a = run_captured(actions, a_in, full_plan(actions))
    out_p, arr_p = run_captured(prefix, p_in, full_plan(prefix))
    np.testing.assert_array_equal(out_a.actions, out_p.actions)
    np.testing.assert_allclose(arr_a["llm/resid_post"][:, :, :81], arr_p["llm/resid_post"], atol=1e-5, rtol=1e-5)
    # teacher forcing reproduces generation: the logits at the action positions pick the generated tokens
    hs = torch.from_numpy(arr_a["llm/resid_post"][:, -1, 80:87])
    with torch.no_grad():
        picked = actions.lm.lm_head(actions.lm.model.norm(hs)).argmax(-1).numpy()
    np.testing.assert_array_equal(picked, actions.last_tokens)


def test_store_from_extract(dataset, tmp_path):
    s = toolkit.open_store(extract(tmp_path / "s.zarr", dataset, sites=["llm", "dino", "projector"],
                                   tokens=["llm=action"], pool=["llm=none"], streams=["llm=resid_pre,resid_post"],
                                   model_options={"capture": "actions"}, dtype="float32"))
    assert s.n_samples == 4 and sorted(s.sites) == ["dino", "llm", "projector"]
    assert s.read("llm", "resid_post").shape == (4, 2, 7, 64)
    assert list(s.static("llm/token")) == list(range(80, 87))
    assert s.read("dino", "resid_post").shape == (4, 2, 1, 32)
    assert s.attrs["model"]["capture"] == "actions" and s.coord("dataset_action").shape == (4, 7)


@pytest.mark.parametrize("kw, match", [
    ({"nope": 1}, "openvla has no option 'nope'; options: unnorm_key"),
    ({"capture": "all"}, "capture='all': Input should be 'prefix' or 'actions'"),
    ({"unnorm_key": "fractal"}, "unnorm_key 'fractal' is not in the checkpoint's norm_stats; keys: bridge_orig"),
    ({"prompt_tokens": "x"}, "prompt_tokens='x': Input should be a valid integer"),
    ({"prompt_tokens": 2}, "prompt_tokens=2: Input should be greater than or equal to 4"),
    ({"checkpoint": "/no/such/dir"}, "does not exist"),
    ({"dtype": "int8"}, "unknown model dtype"),
])
def test_bad_options_are_one_line_errors(kw, match):
    with pytest.raises(ToolkitError, match=match) as err:
        new_adapter(**kw)
    assert "\n" not in str(err.value)


def test_long_prompt_and_missing_camera_errors(batch):
    a = new_adapter(prompt_tokens=8)
    with pytest.raises(ToolkitError, match="prompt_tokens=8; raise it with --model-option prompt_tokens="):
        a.prepare(batch[:1])
    b = new_adapter(camera="front")
    with pytest.raises(ToolkitError, match="no 'front' camera; it has agentview, wrist"):
        b.prepare(batch[:1])
