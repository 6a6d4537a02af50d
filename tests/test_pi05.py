"""pi0.5 (``--model pi05``) on transformers' PI05: the small random model (CLI and Python API, conformance, capture
equal to transformers' own hidden states, the adaptive norms' modulation), the prompt with the discretised state,
and tiny checkpoints in the lerobot and openpi-converted layouts built here from the upstream key names."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import toolkit
import pi_common
from pi_common import ACTION_DIM, ACTION_STATS, NORMALISER, OPENPI_CONFIG, SMALL_EXPERTS, STATE_DIM, STATE_STATS
from pi_common import assert_every_weight_loaded, assert_loaded_from_file, assert_resid_post_is_hidden_states
from pi_common import assert_small_architecture, first_steps, quiet, save_pretrained, small_model, tokenizer_step
from pi_common import toolkit_cli, write_lerobot_processors, write_openpi_files
from synthetic import camera_episodes
from toolkit.capture.intervention import Intervention, Steering
from toolkit.run.samples import sample_generator
from toolkit.sdk.checkpoint import CheckpointError
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import llama_tokenizer
from toolkit.testing import check_model_adapter, generators
from toolkit_plugins.pi05 import Pi05Adapter
from toolkit_plugins.pi05.adapter import RANDOM_WARNING

pytestmark = pytest.mark.usefixtures("pi0_single_thread")

INSTRUCTIONS = ["pick up the cream cheese and place it in the basket", "open_the top\ndrawer"]
PARTS = ("scale", "shift", "gate")
extract = partial(pi_common.extract, "pi05")  # extract(store, dataset, **options)
dataset = pi_common.camera_dataset("pi05_test_steps", INSTRUCTIONS)  # a module fixture


@pytest.fixture(scope="module")
def adapter():
    return quiet(Pi05Adapter, seed=0)


@pytest.fixture(scope="module")
def batch():
    return first_steps(INSTRUCTIONS)


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, dataset):
    """Every layer and token of both experts, every stream, float32, unpooled: through the CLI."""
    path = tmp_path_factory.mktemp("pi05") / "full.zarr"
    res = quiet(toolkit_cli, "extract", "--model", "pi05", "--dataset", dataset, "--store", path, "--site", "vlm",
                "--site", "action", "--tokens", "all", "--pool", "none", "--dtype", "float32", "--batch-size", "2",
                "--stream", "all", "--no-progress")
    assert res.returncode == 0, res.stderr
    return toolkit.open_store(path)


# --------------------------------------------------------------------------- the small random model


def test_conformance(adapter, batch):
    check_model_adapter(adapter, batch)


def test_random_model_warns_once():
    with pytest.warns(UserWarning) as rec:
        Pi05Adapter()
    assert [str(w.message) for w in rec] == [RANDOM_WARNING]


def test_the_cli_and_the_python_api_give_the_same_store(full_store, dataset, tmp_path):
    api = toolkit.open_store(extract(tmp_path / "api.zarr", dataset, sites=["vlm", "action"], tokens="all",
                                     pool="none", dtype="float32", batch_size=2))
    assert api.attrs["model"]["name"] == "pi05" and api.attrs["model"]["random_init"] is True
    for site in ("vlm", "action"):
        np.testing.assert_array_equal(api.read(site, "resid_post"), full_store.read(site, "resid_post"))
    np.testing.assert_array_equal(api.coord("policy_action"), full_store.coord("policy_action"))
    assert full_store.coord("policy_action").shape == (4, 50, 7)
    assert full_store.dims("action", "pre_attn_gate") == ("sample", "layer", "denoise", "token", "feature")
    np.testing.assert_allclose(full_store.static("action/t"), np.linspace(1.0, 0.1, 10), atol=1e-6)


def test_default_sites(dataset, tmp_path):
    s = toolkit.open_store(extract(tmp_path / "default.zarr", dataset, dtype="float32"))
    assert sorted(s.sites) == ["action", "state_only", "text_only", "vlm"] and s.n_samples == 4
    assert s.read("state_only", "resid_post").shape == (4, 6, 1, 128)
    assert s.read("action", "resid_post").shape == (4, 6, 10, 1, 64)


def _upstream_prompt_ids(tok, instruction, state):
    """openpi / lerobot / transformers' PI05Processor, written here from their description: the state (already in
    [-1, 1]) in 256 bins, ``BOS Task: ..., State: ...;\\nAction: `` tokenised in one piece."""
    bins = torch.bucketize(torch.as_tensor(state), torch.linspace(-1, 1, 257)[:-1], right=True) - 1
    task = instruction.strip().replace("_", " ").replace("\n", " ")
    text = f"Task: {task}, State: {' '.join(str(int(b)) for b in bins)};\nAction: "
    return [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]], bins


def test_the_prompt_carries_the_state_in_256_bins_as_upstream_writes_it(adapter, batch):
    inputs = adapter.prepare(batch)
    tok = llama_tokenizer()
    spans, ids, mask = inputs.spans["vlm"], inputs.tensors["input_ids"], inputs.token_mask["vlm"]
    assert spans["image.agentview"] == list(range(16)) and spans["image.wrist"] == list(range(16, 32))
    assert spans["task"] == list(range(32, 96)) and spans["state"] == list(range(96, 128))  # 8 values: 4 x 8 slots
    assert spans["text"] == list(range(32, 138)) and inputs.seq_len == {"vlm": 138, "action": 50}
    assert inputs.spans["action"] == {"actions": list(range(50))}
    for i, (ep, step) in enumerate(batch):
        want, bins = _upstream_prompt_ids(tok, ep.instruction, step.state)  # the random model has no statistics
        real = mask[i].nonzero()[:, 0]
        assert ids[i, real[32:]].tolist() == want and (ids[i, :32] == 32000).all()
        state_ids = ids[i, spans["state"]][mask[i, spans["state"]]].tolist()
        assert tok.decode(state_ids).strip() == " ".join(str(int(b)) for b in bins)
    assert ((-1 <= bins) & (bins <= 255)).all() and (bins == -1).any()  # raw N(0, 1): below -1 is bin -1, unclipped


def test_the_slotted_prompt_runs_exactly_like_the_contiguous_upstream_prompt(adapter, batch):
    """Padding between the slots is masked and positions count real tokens, so the actions equal transformers'
    own ``sample_actions`` on the contiguous prompt (image tokens, then the prompt, right-padded)."""
    inputs = adapter.prepare(batch)
    t = inputs.tensors
    tok = llama_tokenizer()
    prompts = [_upstream_prompt_ids(tok, ep.instruction, step.state)[0] for ep, step in batch]
    seq = 32 + max(len(p) for p in prompts) + 5
    ids = torch.zeros(len(batch), seq, dtype=torch.long)
    mask = torch.zeros(len(batch), seq, dtype=torch.long)
    ids[:, :32], mask[:, :32] = 32000, 1
    for i, p in enumerate(prompts):
        ids[i, 32:32 + len(p)], mask[i, 32:32 + len(p)] = torch.tensor(p), 1
    noise = torch.stack([torch.randn(50, 32, generator=g) for g in generators(3)])
    with torch.no_grad():
        want = adapter.model.sample_actions(input_ids=ids, pixel_values=t["pixel_values"], noise=noise.clone(),
                                            attention_mask=mask, pixel_attention_mask=t["pixel_attention_mask"])
    got = adapter.run(inputs, generators(3)).actions
    np.testing.assert_allclose(got, want[..., :7].numpy(), atol=2e-5, rtol=1e-5)


def test_vlm_resid_post_equals_output_hidden_states(adapter, full_store, batch):
    got = full_store.read("vlm", "resid_post")[:3]  # (sample, layer, token, feature)
    assert got.shape == (3, 6, 138, 128)
    assert_resid_post_is_hidden_states(adapter, batch, got)


def _time_embedding(model, t: float, batch: int) -> torch.Tensor:
    """The action expert's conditioning, from the pi0.5 description: a sin/cos embedding of t (periods 4e-3 .. 4),
    through time_mlp_in -> swish -> time_mlp_out -> swish."""
    cfg, emb = model.config, model.embed_action_time
    half = cfg.dit_config.hidden_size // 2
    period = cfg.min_period * (cfg.max_period / cfg.min_period) ** torch.linspace(0, 1, half)
    angle = 2 * math.pi / period * t
    x = torch.cat([angle.sin(), angle.cos()])[None].expand(batch, -1)
    x = F.silu(x @ emb.time_mlp_in.weight.T + emb.time_mlp_in.bias)
    return F.silu(x @ emb.time_mlp_out.weight.T + emb.time_mlp_out.bias)


def test_action_expert_resid_post_equals_output_hidden_states_at_every_denoising_step(adapter, full_store, batch):
    """The flow written out here (prefix cache once, then t = 1.0 ... 0.1, Euler steps), each step's expert hidden
    states from transformers' ``output_hidden_states``; the last layer's through the adaptive final norm."""
    got = torch.from_numpy(full_store.read("action", "resid_post")[:3])  # (sample, layer, denoise, token, feature)
    assert got.shape == (3, 6, 10, 50, 64)
    t, model = adapter.prepare(batch).tensors, adapter.model
    mask = t["attention_mask"]
    x = torch.stack([torch.randn(50, 32, generator=sample_generator(0, i)) for i in range(3)])
    with torch.no_grad():
        emb = model.model.embed_prefix(t["input_ids"], t["pixel_values"], t["pixel_attention_mask"])
        cache = model.model.vlm(inputs_embeds=emb, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                                token_type_ids=torch.zeros_like(emb)[:, :, 0], use_cache=True).cache
        prefix = cache.get_seq_length()
        for k in range(10):
            time = torch.full((3,), 1.0 - k / 10)
            out = model(noise=x, timestep=time, attention_mask=mask, pixel_attention_mask=t["pixel_attention_mask"],
                        cache=cache, output_hidden_states=True)
            hs = out.hidden_states
            assert len(hs) == 7
            for layer in range(5):
                torch.testing.assert_close(got[:, layer, k], hs[layer + 1], atol=1e-5, rtol=1e-5)
            final, _ = model.model.dit.norm(got[:, 5, k], _time_embedding(model, 1.0 - k / 10, 3))
            torch.testing.assert_close(final, hs[6], atol=1e-5, rtol=1e-5)
            cache.crop(prefix - cache.get_seq_length())
            x = x - 0.1 * out.logits
    for k in range(1, 10):  # the time and the noisy actions change every step, so do the hidden states
        assert not np.allclose(got[:, :, k], got[:, :, k - 1])


def test_modulation_streams_equal_the_adaptive_norms_dense_layers(adapter, full_store):
    """scale, shift, gate per layer and step = dense(time embedding) split in three, computed here independently;
    and they tie the streams together: resid_mid = resid_pre + gate * attn_out (and the same after the MLP)."""
    model = adapter.model
    a = {s: torch.from_numpy(full_store.read("action", s)) for s in full_store.streams("action")}
    n = a["resid_post"].shape[0]
    for k, t in enumerate(np.linspace(1.0, 0.1, 10)):
        temb = _time_embedding(model, float(t), n)
        for layer, block in enumerate(model.model.dit.layers):
            for where, norm in (("pre_attn", block.input_layernorm), ("pre_mlp", block.post_attention_layernorm)):
                want = (temb @ norm.dense.weight.T + norm.dense.bias).chunk(3, -1)
                for part, w in zip(PARTS, want):
                    got = a[f"{where}_{part}"][:, layer, k]  # (sample, token, feature): the same for every token
                    torch.testing.assert_close(got, w[:, None].expand_as(got), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["resid_pre"] + a["pre_attn_gate"] * a["attn_out"], a["resid_mid"], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(a["resid_mid"] + a["pre_mlp_gate"] * a["mlp_out"], a["resid_post"], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(a["resid_post"][:, :-1], a["resid_pre"][:, 1:])
    rms = torch.rsqrt(a["resid_mid"].pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(a["pre_mlp_norm_scale"], rms)
    # the small model's dense layers are not transformers' zeros: the modulation depends on the time
    assert not torch.allclose(a["pre_attn_scale"][:, :, 0], a["pre_attn_scale"][:, :, 9])


def test_an_intervention_on_the_gate_of_one_step_changes_that_step_on(adapter, batch):
    from toolkit.capture.plan import build_plan

    inputs = adapter.prepare(batch[:1])
    plan = build_plan("pi05", adapter.experts, adapter.sites, sites=["action"], layers="1",
                      streams="pre_attn_gate,resid_post", pool="none", dtype="float32")

    def run(ivs):
        with Steering(adapter, ivs) as steer, quiet_capture(adapter, plan) as cap:
            cap.begin(inputs)
            steer.begin(inputs)
            out = adapter.run(inputs, [sample_generator(0, 0)])
            got = cap.collect()
        return out.actions, got["action/pre_attn_gate"][0, 0], got["action/resid_post"][0, 0]

    bare_actions, bare_gate, bare_resid = run([])
    actions, gate, resid = run([Intervention("action.layers.1.pre_attn_gate", "zero", 1.0, denoise=(4,))])
    np.testing.assert_array_equal(resid[:4], bare_resid[:4])  # the steps before are untouched
    assert np.abs(gate[4]).max() == 0 and np.abs(bare_gate[4]).max() > 0
    assert not np.allclose(resid[4:], bare_resid[4:]) and not np.allclose(actions, bare_actions)


def quiet_capture(adapter, plan):
    from toolkit.capture.hooks import Capture

    return Capture(adapter, plan)


def test_libero_sample_runs_and_steers_through_the_intervene_api(tmp_path):
    """The embedded LIBERO sample (real instructions, cameras and 8-dim states) through pi0.5, unmodified and with
    the action expert's layer-2 attention gate zeroed."""
    from toolkit.run.intervene import intervene

    run = quiet(intervene, out=tmp_path, model="pi05", dataset="libero", at=["action.layers.2.pre_attn_gate"],
                op="zero", alphas=[0, 1], figures=False, model_options={"num_steps": 2},
                dataset_options={"tasks": "0", "episodes": "0"}, max_steps=2)
    base = toolkit.open_store(run.baseline)
    zero, one = (toolkit.open_store(c.store) for c in run.conditions)
    assert base.attrs["model"]["name"] == "pi05" and base.n_samples == 2
    assert base.attrs["model"]["cameras"] and base.attrs["model"]["state_dim"] == 8
    assert np.array_equal(base.coord("policy_action"), zero.coord("policy_action"))
    assert not np.allclose(base.coord("policy_action"), one.coord("policy_action"))


def test_unknown_option_and_missing_checkpoint_are_one_line(tmp_path):
    with pytest.raises(ToolkitError, match="pi05 has no option 'nope'"):
        Pi05Adapter(nope=1)
    with pytest.raises(ToolkitError, match="does not exist") as err:
        Pi05Adapter(checkpoint=str(tmp_path / "no_such"))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- checkpoints in the upstream layouts

SMALL = dict(SMALL_EXPERTS)  # the real pi0.5 head layout at toy widths
PE = "paligemma_with_expert."
LEROBOT_CONFIG = {
    "type": "pi05", "n_obs_steps": 1, "chunk_size": 50, "n_action_steps": 50, "max_state_dim": 32,
    "max_action_dim": 32, "num_inference_steps": 10, "tokenizer_max_length": 200, "image_resolution": [224, 224],
    "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"},
    "input_features": {"observation.state": {"type": "STATE", "shape": [STATE_DIM]},
                       "observation.images.image": {"type": "VISUAL", "shape": [3, 224, 224]}},
    "output_features": {"action": {"type": "ACTION", "shape": [ACTION_DIM]}},
}


def native_weights(seed: int = 3) -> dict[str, torch.Tensor]:
    model = small_model("PI05ForConditionalGeneration", SMALL, seed)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():  # the adaptive norms' dense layers are zeros at init: not here
        out[k] = torch.randn(v.shape, generator=g) * 0.1 if ".dense." in k else v.detach().clone()
    return out


def file_key(name: str, layout: str) -> str:
    """Where a transformers PI05 weight lives in each upstream layout (written from the key facts, not the loader):
    openpi and lerobot's pi05_base have no prefix, a lerobot fine-tune puts ``model.`` in front of every key."""
    if name == "model.vlm.language_model.embed_tokens.weight":
        key = PE + "paligemma.model.language_model.embed_tokens.weight"
    elif name.startswith("model.vlm.language_model."):
        key = PE + "paligemma.model.language_model." + name.removeprefix("model.vlm.language_model.")
    elif name.startswith("model.vlm.vision_tower."):
        key = PE + "paligemma.model.vision_tower.vision_model." + name.removeprefix("model.vlm.vision_tower.")
    elif name.startswith("model.vlm.multi_modal_projector."):
        key = PE + "paligemma.model.multi_modal_projector." + name.removeprefix("model.vlm.multi_modal_projector.")
    elif name.startswith("model.dit."):
        key = PE + "gemma_expert.model." + name.removeprefix("model.dit.")
    elif name.startswith("embed_action_time."):
        key = name.removeprefix("embed_action_time.")  # action_in_proj, time_mlp_in, time_mlp_out
    else:
        assert name.startswith("action_out_proj."), name
        key = name
    return "model." + key if layout == "finetune" else key


def write_processors(d: Path, mapping: dict[str, str], relative: dict | None = None) -> None:
    """policy_preprocessor.json / policy_postprocessor.json and their normaliser step files (lerobot's pi05)."""
    device = {"registry_name": "device_processor", "config": {"device": "cpu"}}
    write_lerobot_processors(d, mapping, [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "relative_actions_processor", "config": relative or {"enabled": False}},
        NORMALISER,
        {"registry_name": "pi05_prepare_state_tokenizer_processor_step", "config": {"max_state_dim": 32}},
        tokenizer_step(200), device],
        [{"registry_name": "absolute_actions_processor", "config": {"enabled": bool(relative)}}, device])


def write_checkpoint(d: Path, layout: str, weights: dict[str, torch.Tensor], *, tied: bool = False,
                     config: dict | None = None, mapping: dict | None = None, relative: dict | None = None) -> Path:
    """A tiny checkpoint directory in one upstream layout (``lerobot``: pi05_base, no prefix, "type": "pi05";
    ``finetune``: lerobot's save, ``model.`` prefix; ``openpi``: the converter's output, no "type", assets).
    Current lerobot saves ``lm_head`` beside ``embed_tokens`` (different values); ``tied``: only ``lm_head``."""
    d.mkdir(parents=True, exist_ok=True)
    tensors = {file_key(n, layout): t for n, t in weights.items()}
    prefix = "model." if layout == "finetune" else ""
    embed = prefix + PE + "paligemma.model.language_model.embed_tokens.weight"
    head = prefix + PE + "paligemma.lm_head.weight"
    if tied:
        tensors[head] = tensors.pop(embed)
    elif layout != "openpi":
        tensors[head] = torch.randn(tensors[embed].shape)  # lerobot after PR #2964: an untied, unused head
    tensors[prefix + PE + "gemma_expert.lm_head.weight"] = torch.randn(32001, 32)  # saved, never read
    save_file(tensors, str(d / "model.safetensors"))
    if layout == "openpi":
        write_openpi_files(d, config)
    else:
        cfg = {**LEROBOT_CONFIG, **(config or {})}
        (d / "config.json").write_text(json.dumps(cfg))
        write_processors(d, mapping or cfg["normalization_mapping"], relative)
    return d


@pytest.fixture(scope="module")
def weights():
    return native_weights()


load = partial(pi_common.load, Pi05Adapter)  # load(ckpt, tokenizer_dir, **options)


def small_batch():
    return [(ep, next(ep.steps())) for ep in camera_episodes(INSTRUCTIONS)]


def actions(a: Pi05Adapter, batch=None) -> np.ndarray:
    batch = batch or small_batch()
    return a.run(a.prepare(batch), generators(len(batch))).actions


@pytest.mark.parametrize("layout, name", [("lerobot", "lerobot pi05"),
                                          ("finetune", "lerobot pi05 fine-tune (model. prefix)"),
                                          ("openpi", "openpi pi05 converted to PyTorch")])
def test_each_layout_loads_every_tensor_it_uses(layout, name, weights, tokenizer_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / layout, layout, weights)
    a = load(ckpt, tokenizer_dir)
    # every model tensor equals the file tensor at its upstream key (embed_tokens, not lm_head)
    file = assert_loaded_from_file(a, ckpt, weights, lambda n: file_key(n, layout))
    report = a.load_report
    assert a.layout == report.layout == name and report.missing == [] and report.unexpected == []
    prefix = "model." if layout == "finetune" else ""
    heads = [prefix + PE + "gemma_expert.lm_head.weight"] + ([] if layout == "openpi" else
                                                             [prefix + PE + "paligemma.lm_head.weight"])
    assert report.ignored == sorted(heads)  # upstream's policy reads neither: recorded, not loaded, no warning
    assert len(report.loaded) == len(weights) == len(file) - len(heads)
    assert_small_architecture(a)
    assert a.max_text_tokens == (200 if layout != "openpi" else 200) and a.action_dim == 7


@pytest.mark.parametrize("layout", ["finetune", "openpi"])
def test_a_used_tensor_changes_the_actions_an_unused_one_does_not(layout, weights, tokenizer_dir, tmp_path):
    base = actions(load(write_checkpoint(tmp_path / "base", layout, weights), tokenizer_dir))
    prefix = "model." if layout == "finetune" else ""
    used = [PE + "gemma_expert.model.layers.1.post_attention_layernorm.dense.weight", "time_mlp_in.weight",
            PE + "paligemma.model.language_model.embed_tokens.weight"]
    unused = [PE + "gemma_expert.lm_head.weight"] + ([PE + "paligemma.lm_head.weight"] if layout != "openpi" else [])
    for i, key in enumerate(used + unused):
        d = write_checkpoint(tmp_path / f"k{i}", layout, weights)
        file = load_file(str(d / "model.safetensors"))
        file[prefix + key] = file[prefix + key] + 0.5
        save_file(file, str(d / "model.safetensors"))
        got = actions(load(d, tokenizer_dir))
        assert np.array_equal(got, base) == (key in unused), key


def test_an_older_tied_save_embeds_with_its_lm_head(weights, tokenizer_dir, tmp_path):
    base = actions(load(write_checkpoint(tmp_path / "untied", "lerobot", weights), tokenizer_dir))
    a = load(write_checkpoint(tmp_path / "tied", "lerobot", weights, tied=True), tokenizer_dir)
    assert a.load_report.missing == [] and np.array_equal(actions(a), base)


def test_transformers_save_pretrained_round_trips(weights, tokenizer_dir, tmp_path):
    a = load(save_pretrained("PI05ForConditionalGeneration", SMALL, weights, tmp_path / "tf"), tokenizer_dir)
    assert a.layout == "transformers PI05 save_pretrained"
    assert_every_weight_loaded(a, weights)


def test_unexpected_tensors_warn_and_strict_refuses(weights, tokenizer_dir, tmp_path, caplog):
    d = write_checkpoint(tmp_path / "lora", "finetune", weights)
    file = load_file(str(d / "model.safetensors"))
    lora = "model." + PE + "paligemma.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    file[lora] = torch.ones(4, 64)
    save_file(file, str(d / "model.safetensors"))
    with caplog.at_level("WARNING"):
        a = load(d, tokenizer_dir)
    assert a.load_report.unexpected == [lora] and lora in caplog.text  # under its name in the file
    with pytest.raises(CheckpointError, match="--strict") as err:
        load(d, tokenizer_dir, strict=True)
    assert "\n" not in str(err.value)


def test_a_dropped_weight_is_one_line(weights, tokenizer_dir, tmp_path):
    d = write_checkpoint(tmp_path / "drop", "openpi", weights)
    file = load_file(str(d / "model.safetensors"))
    del file[PE + "gemma_expert.model.layers.0.input_layernorm.dense.bias"]
    save_file(file, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="input_layernorm.dense.bias") as err:
        load(d, tokenizer_dir)
    assert "\n" not in str(err.value)


def _pi0_checkpoint(d: Path, with_type: bool) -> Path:
    """A tiny pi0 in its own upstream layout (state_proj, action_time_mlp_*, plain RMSNorm scales)."""
    from transformers import PI0Config, PI0ForConditionalGeneration

    cfg = {k: v for k, v in SMALL.items() if k != "num_inference_steps"}
    m = PI0ForConditionalGeneration(PI0Config(**cfg, max_state_dim=32))
    m.save_pretrained(d)
    (d / "config.json").write_text(json.dumps({**LEROBOT_CONFIG, "type": "pi0"} if with_type else OPENPI_CONFIG))
    return d


@pytest.mark.parametrize("with_type", [True, False])
def test_a_pi0_checkpoint_says_use_model_pi0(with_type, tokenizer_dir, tmp_path):
    ckpt = _pi0_checkpoint(tmp_path / "pi0", with_type)
    res = toolkit_cli("extract", "--model", "pi05", "--checkpoint", ckpt, "--model-option",
                      f"tokenizer={tokenizer_dir}", "--store", tmp_path / "s.zarr", "--dataset", "libero",
                      "--max-episodes", "1", "--max-steps", "1", "--no-progress")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "use --model pi0" in lines[0] and "pi0.5" in lines[0] and not (tmp_path / "s.zarr").exists()


def _bins(x: np.ndarray) -> list[int]:
    return (np.digitize(x, np.linspace(-1, 1, 257)[:-1]) - 1).tolist()


def _state_bins_in_prompt(a: Pi05Adapter, batch) -> list[list[int]]:
    inputs = a.prepare(batch)
    span, ids, mask = inputs.spans["vlm"]["state"], inputs.tensors["input_ids"], inputs.token_mask["vlm"]
    return [[int(v) for v in a.tokenizer.decode(ids[i, span][mask[i, span]].tolist()).split()]
            for i in range(len(batch))]


@pytest.mark.parametrize("layout, mapping", [("finetune", None), ("lerobot", {"STATE": "MEAN_STD",
                                                                              "ACTION": "MEAN_STD"}),
                                             ("openpi", None)])
def test_statistics_normalise_the_state_before_binning_and_unnormalise_actions(layout, mapping, weights,
                                                                              tokenizer_dir, tmp_path):
    """Quantiles (q01/q99) by default, each pipeline's formula; mean/std where lerobot's mapping says so."""
    cfg = {"normalization_mapping": {"VISUAL": "IDENTITY", **mapping}} if mapping else None
    ckpt = write_checkpoint(tmp_path / layout, layout, weights, config=cfg)
    a = load(ckpt, tokenizer_dir)
    raw = load(ckpt, tokenizer_dir, normalise=False)
    batch = small_batch()
    states = [np.asarray(s.state, dtype=np.float32) for _, s in batch]
    q01, q99, mean, std = (STATE_STATS[k] for k in ("q01", "q99", "mean", "std"))
    aq01, aq99, amean, astd = (ACTION_STATS[k] for k in ("q01", "q99", "mean", "std"))
    if layout == "openpi":  # openpi.transforms.Normalize / Unnormalize(use_quantiles=True)
        want = [_bins((s - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0) for s in states]
        unnorm = lambda x: (x + 1.0) / 2.0 * (aq99 - aq01 + 1e-6) + aq01  # noqa: E731
    elif mapping is None:  # lerobot QUANTILES
        want = [_bins(2.0 * (s - q01) / (q99 - q01) - 1.0) for s in states]
        unnorm = lambda x: (x + 1.0) * (aq99 - aq01) / 2.0 + aq01  # noqa: E731
    else:  # lerobot MEAN_STD
        want = [_bins((s - mean) / (std + 1e-8)) for s in states]
        unnorm = lambda x: x * astd + amean  # noqa: E731
    assert _state_bins_in_prompt(a, batch) == want
    assert _state_bins_in_prompt(raw, batch) == [_bins(s) for s in states]
    # the actions: the policy's output (the same prompt through --no-normalise's model) mapped back
    inputs = a.prepare(batch)
    with torch.no_grad():
        t = inputs.tensors
        policy = a.model.sample_actions(input_ids=t["input_ids"], pixel_values=t["pixel_values"],
                                        noise=a.noise(generators(2)), attention_mask=t["attention_mask"],
                                        pixel_attention_mask=t["pixel_attention_mask"])
    np.testing.assert_allclose(a.run(inputs, generators(2)).actions, unnorm(policy[..., :7].numpy()), rtol=1e-5,
                               atol=1e-5)
    assert a.describe()["normalisation"]["action"]["mode"] in ("QUANTILES", "MEAN_STD")


def test_relative_actions_are_made_absolute_on_the_named_dimensions(weights, tokenizer_dir, tmp_path):
    names = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
    rel = {"use_relative_actions": True, "relative_exclude_joints": ["gripper"], "action_feature_names": names}
    step = {"enabled": True, "exclude_joints": ["gripper"], "action_names": names}  # lerobot's saved step
    a = load(write_checkpoint(tmp_path / "rel", "finetune", weights, config=rel, relative=step), tokenizer_dir)
    b = load(write_checkpoint(tmp_path / "abs", "finetune", weights), tokenizer_dir)
    batch = small_batch()
    got, plain = actions(a, batch), actions(b, batch)
    for i, (_, step) in enumerate(batch):  # + the raw state on every dimension but the gripper
        np.testing.assert_allclose(got[i, :, :6], plain[i, :, :6] + step.state[:6], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got[i, :, 6], plain[i, :, 6])
    assert a.describe()["relative_actions"]["relative_dims"] == [0, 1, 2, 3, 4, 5]


def test_pi05_is_recognised_from_its_weights_or_config(weights, tmp_path):
    """What another loader (``--model pi0``) can ask to name ``--model pi05``."""
    from toolkit_plugins.pi05.layouts import is_pi05

    keys = [file_key(n, "openpi") for n in weights]
    assert is_pi05(keys, {}) and is_pi05(keys, OPENPI_CONFIG) and is_pi05([], {"type": "pi05"})
    pi0 = list(load_file(str(_pi0_checkpoint(tmp_path / "pi0", False) / "model.safetensors")))
    assert not is_pi05(pi0, {}) and not is_pi05(pi0, {"type": "pi0"})


def test_bfloat16_model_runs(batch):
    bf = quiet(Pi05Adapter, dtype="bfloat16")
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    inputs = bf.prepare(batch)
    out = bf.run(inputs, generators(3))
    assert out.actions.shape == (3, 50, 7) and np.isfinite(out.actions).all()
