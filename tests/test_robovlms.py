"""The RoboVLMs adapter on its small random Kosmos-2 + LSTM policy: conformance, the act_head context vector,
window, checkpoint loading and its errors."""

import warnings

import numpy as np
import pytest
import torch

import toolkit
from toolkit.sdk.adapters import Episode, Step
from toolkit.sdk.checkpoint import CheckpointError
from toolkit.sdk.errors import ToolkitError
from toolkit.testing import check_model_adapter, full_plan, generators, run_captured
from toolkit_plugins.robovlms import RoboVLMsAdapter
from toolkit_plugins.robovlms.adapter import RANDOM_WARNING

pytestmark = pytest.mark.usefixtures("pi0_single_thread")

INSTRUCTIONS = ["go to the left of the box", "pick up the red cup and place it in the basket"]
STREAMS = ["text=resid_post", "context=context"]


def make_episodes(n_episodes=2, n_steps=3):
    eps = []
    for e in range(n_episodes):
        rng = np.random.default_rng(e)
        steps = [Step(index=k, images={"agentview": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)},
                      action=rng.normal(size=3).astype(np.float32)) for k in range(n_steps)]
        eps.append(Episode(key=f"ep_{e}", task=f"task {e}", task_id=e, instruction=INSTRUCTIONS[e % 2],
                           n_steps=n_steps, _steps=steps))
    return eps


def quiet(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return RoboVLMsAdapter(**kw)


@pytest.fixture(scope="module")
def adapter():
    return quiet(seed=0)


@pytest.fixture(scope="module")
def batch():
    return [(ep, step) for ep in make_episodes() for step in ep.steps()][:4]


def test_conformance(adapter, batch):
    check_model_adapter(adapter, batch)


def test_random_model_warns_once():
    with pytest.warns(UserWarning) as rec:
        RoboVLMsAdapter()
    assert [str(w.message) for w in rec] == [RANDOM_WARNING]


def test_context_is_final_norm_state_at_the_action_token(adapter, batch):
    inputs = adapter.prepare(batch)
    with torch.inference_mode():
        bare = adapter.run(inputs, generators(4)).actions
    out, arrays = run_captured(adapter, inputs, full_plan(adapter))
    np.testing.assert_array_equal(out.actions, bare)  # capture changes nothing
    assert out.actions.shape == (4, 2, 7) and set(np.unique(out.actions[..., -1])) <= {-1.0, 1.0}
    ctx = arrays["context/context"]
    assert ctx.shape == (4, 1, 1, 64)  # (sample, layer, window x latent, hidden)
    lay = adapter.layout()
    assert lay["action"] == [1 + 8 + 32] and lay["eos"] == [1 + 8 + 32 + 1]
    text = adapter.model.backbone.text_model.model
    with torch.no_grad():
        last = torch.from_numpy(arrays["text/resid_post"][:, -1])  # last layer's output, before the final norm
        want = text.layer_norm(last)[:, lay["action"]]
    torch.testing.assert_close(torch.from_numpy(ctx[:, 0]), want, atol=1e-5, rtol=1e-5)
    # and the same through transformers' own forward (RoboVLMs' output.hidden_states[-1])
    t = inputs.tensors
    with torch.no_grad():
        emb = text.embed_tokens(t["input_ids"]).clone()
        emb[:, 1:9] = adapter.model.encode_images(t["pixel_values"][:, 0])
        emb[:, lay["action"]] = adapter.model.action_token
        hs = adapter.model.backbone.text_model(inputs_embeds=emb, attention_mask=t["attention_mask"],
                                               position_ids=t["position_ids"], output_hidden_states=True).hidden_states
    torch.testing.assert_close(torch.from_numpy(ctx[:, 0]), hs[-1][:, lay["action"]], atol=1e-5, rtol=1e-5)


def test_streams_fit_kosmos_blocks(adapter, batch):
    _, arrays = run_captured(adapter, adapter.prepare(batch[:2]), full_plan(adapter))
    a = {k.split("/")[1]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("text/")}
    torch.testing.assert_close(a["resid_pre"] + a["attn_out"], a["resid_mid"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["resid_mid"] + a["mlp_out"], a["resid_post"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["resid_post"][:, :-1], a["resid_pre"][:, 1:])


def test_padding_does_not_change_values(adapter, batch):
    """Instructions of different lengths in one batch give what each gives alone."""
    plan = full_plan(adapter)
    _, both = run_captured(adapter, adapter.prepare([batch[0], batch[3]]), plan)
    _, alone = run_captured(adapter, adapter.prepare([batch[3]]), plan)
    np.testing.assert_allclose(both["context/context"][1], alone["context/context"][0], atol=1e-5, rtol=1e-5)
    mask = adapter.prepare([batch[0], batch[3]]).token_mask["text"]
    assert mask[0].sum() < mask[1].sum()  # the shorter instruction has padding, masked out


def robovlms_lstm_inference(head, frames):
    """RoboVLMs' LSTMDecoder at evaluation, one frame per call: the LSTM state runs on while the history holds at
    most window_size frames, then the LSTM reruns from zero over the last window_size frames."""
    memory, state, outs = [], None, []
    for f in frames:  # (1, 1, hidden) each
        memory.append(f)
        if len(memory) <= head.window_size:
            x, state = head.rnn(f, state)
        else:
            memory.pop(0)
            x, _ = head.rnn(torch.cat(memory, 1))
        outs.append(head.actions(x[:, -1]))
    return torch.stack(outs)


def test_window_feeds_each_frame_and_runs_the_lstm_as_robovlms_does():
    eps = make_episodes(1, 5)
    w1, w3 = quiet(), quiet(window=3)
    batch = [(eps[0], s) for s in eps[0].steps()]
    out1, one = run_captured(w1, w1.prepare(batch), full_plan(w1))
    inputs = w3.prepare(batch)
    out, three = run_captured(w3, inputs, full_plan(w3))
    c1, c3 = one["context/context"][:, 0], three["context/context"][:, 0]
    assert c3.shape == (5, 3, 64)
    np.testing.assert_allclose(c3[:, 2], c1[:, 0], atol=1e-5)  # the current frame
    np.testing.assert_allclose(c3[1:, 1], c1[:-1, 0], atol=1e-5)  # the previous step's frame
    np.testing.assert_allclose(c3[2:, 0], c1[:-2, 0], atol=1e-5)  # two steps back
    assert not c3[0, :2].any() and not c3[1, 0].any()  # before the episode's start: zeros, masked out
    assert inputs.token_mask["context"].tolist() == [[False, False, True], [False, True, True]] + [[True] * 3] * 3
    assert inputs.spans["context"] == {"current": [2]}
    with torch.no_grad():
        want = robovlms_lstm_inference(w3.model.act_head, [torch.from_numpy(c)[None, None] for c in c1[:, 0]])
    arm = want.reshape(5, 2, 6).numpy()  # (step, chunk, arm dims)
    np.testing.assert_allclose(out.actions[..., :6], arm, atol=1e-5)
    np.testing.assert_allclose(out.actions[0], out1.actions[0], atol=1e-6)  # one real frame: as with no window
    assert not np.allclose(out.actions[1:, :, :6], out1.actions[1:, :, :6], atol=1e-4)


def test_extract_writes_context_site(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        p = toolkit.extract(model="robovlms", dataset="libero", store=tmp_path / "rv.zarr", max_episodes=2,
                            max_steps=2, streams=STREAMS, dtype="float32", batch_size=2)
    s = toolkit.open_store(p)
    assert sorted(s.sites) == ["context", "text"] and s.n_samples == 4
    assert s.read("context", "context").shape == (4, 1, 1, 64)
    assert s.read("text", "resid_post").shape == (4, 4, 1, 64)
    assert s.coord("policy_action").shape == (4, 2, 7)
    assert s.attrs["model"]["random_init"] is True and s.attrs["model"]["window"] == 1


def _save_checkpoint(adapter, path, drop=()):
    sd = {f"model.{k}": v for k, v in adapter.model.state_dict().items() if k not in drop}
    torch.save({"state_dict": sd, "epoch": 1}, path)


def test_checkpoint_round_trip(adapter, batch, tmp_path):
    ckpt, tok = tmp_path / "policy.pt", tmp_path / "tok"
    _save_checkpoint(adapter, ckpt)
    adapter.tokenizer.save_pretrained(tok)
    loaded = RoboVLMsAdapter(checkpoint=str(ckpt), tokenizer=str(tok), text_heads=4, vision_heads=4)
    assert loaded.describe()["random_init"] is False
    plan = full_plan(adapter)
    a, x = run_captured(adapter, adapter.prepare(batch), plan)
    b, y = run_captured(loaded, loaded.prepare(batch), plan)
    np.testing.assert_array_equal(a.actions, b.actions)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def test_checkpoint_errors_are_one_line(adapter, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ToolkitError, match="is not a file") as err:
        RoboVLMsAdapter(checkpoint=str(tmp_path / "nope.pt"))
    ckpt = tmp_path / "policy.pt"
    _save_checkpoint(adapter, ckpt, drop=("act_head.rnn.weight_hh_l1",))
    tok = tmp_path / "tok"
    with pytest.raises(ToolkitError, match="no Kosmos-2 tokenizer.*hf download microsoft/kosmos-2-patch14-224 "
                                           "sentencepiece.bpe.model.*--model-option tokenizer=") as err:
        RoboVLMsAdapter(checkpoint=str(ckpt))
    assert "\n" not in str(err.value)
    with pytest.raises(ToolkitError, match=f"robovlms tokenizer '{tok}' does not exist: download"):
        RoboVLMsAdapter(checkpoint=str(ckpt), tokenizer=str(tok))
    adapter.tokenizer.save_pretrained(tok)
    with pytest.raises(CheckpointError, match=r"policy.pt: 1 of \d+ weights are not in the checkpoint \(recognised "
                                              r"layout: RoboVLMs Lightning checkpoint, weights under 'model.'\); "
                                              r"first missing: act_head\.rnn\.weight_hh_l1; pass --allow-missing"
                       ) as err:
        RoboVLMsAdapter(checkpoint=str(ckpt), tokenizer=str(tok))
    assert "\n" not in str(err.value)
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ToolkitError, match="no 'action_token' weight"):
        RoboVLMsAdapter(checkpoint=str(tmp_path / "other.pt"), tokenizer=str(tok))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ToolkitError, match="cannot read RoboVLMs checkpoint"):
        RoboVLMsAdapter(checkpoint=str(tmp_path / "junk.pt"), tokenizer=str(tok))


def test_unknown_option_is_one_line_error():
    with pytest.raises(ToolkitError, match="robovlms has no option 'nope'; options: window"):
        RoboVLMsAdapter(nope=1)
    with pytest.raises(ToolkitError, match="robovlms option window='0': Input should be greater than or equal to 1"):
        RoboVLMsAdapter(window="0")
    with pytest.raises(ToolkitError, match="robovlms option action_position='middle'"):
        RoboVLMsAdapter(action_position="middle")
