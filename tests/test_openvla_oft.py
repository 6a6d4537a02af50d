"""OpenVLA-OFT (moojink/openvla-oft, L1-regression variant) on a tiny checkpoint in the real layout.

The directory is what upstream's ``vla-scripts/finetune.py`` leaves: the merged OpenVLA model in openvla-7b's
layout (written as tests/test_openvla_checkpoint.py does, its config.json with OXE ``norm_stats``), and beside it
``action_head--{step}_checkpoint.pt`` and ``proprio_projector--{step}_checkpoint.pt`` (DDP state dicts: upstream's
key names under ``module.``, bf16) and the fine-tuning dataset's ``dataset_statistics.json``.

The reference forward below is written from upstream's description (``predict_action`` of
prismatic/extern/hf/modeling_prismatic.py, action_heads.py, projectors.py, openvla_utils.py), one sample at a
time with no padding, as upstream runs it: [BOS][patches of each camera][proprio token][prompt + "▁"]
[chunk*7 zero-embedded placeholders][</s>] through a fresh transformers Llama loaded from the shards with a
bidirectional (all-zero) mask, the final hidden states at [P + T : P + T + chunk*7], the MLPResNet head written
with torch.nn.functional on the file's tensors, then q01/q99 unnormalisation where mask.
"""

import argparse
import json
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

import toolkit
from synthetic import camera_episodes, dataset_registered
from test_openvla_checkpoint import INSTRUCTIONS, Steps, write_openvla_checkpoint
from toolkit.cli.main import cli
from toolkit.sdk.checkpoint import CheckpointError
from toolkit.sdk.errors import ToolkitError
from toolkit.testing import check_model_adapter, generators
from toolkit_plugins.openvla import OpenVLAAdapter, OpenVLAOFTAdapter
from toolkit_plugins.openvla.oft_adapter import center_crop

pytestmark = pytest.mark.usefixtures("pi0_single_thread")

HIDDEN, ACTION_DIM, PROPRIO_DIM, CHUNK = 64, 7, 8, 8  # the tiny LLM's width; LIBERO's constants
KEY = "libero_spatial_no_noops"
STATS = {KEY: {
    "action": {"mean": [0.0] * 7, "std": [1.0] * 7, "max": [0.9] * 6 + [1.0], "min": [-0.9] * 6 + [-1.0],
               "q01": [-0.74, -0.6, -0.9, -0.1, -0.2, -0.3, -1.0], "q99": [0.9, 0.85, 0.93, 0.14, 0.2, 0.35, 1.0],
               "mask": [True] * 6 + [False]},
    "proprio": {"mean": [0.0] * 8, "std": [1.0] * 8, "max": [1.0] * 8, "min": [-1.0] * 8,
                "q01": [-0.4, -0.3, 0.0, 2.0, -1.2, -0.6, 0.0, -0.04],
                "q99": [0.3, 0.4, 1.2, 3.4, 1.1, 0.7, 0.04, 0.0]},
    "num_transitions": 52970, "num_trajectories": 432,
}}
PROMPT = "In: What action should the robot take to {}?\nOut:"


def head_state_dict(seed=0):
    """An L1RegressionActionHead's state_dict under upstream's names (MLPResNet with 2 blocks), as DDP saves it."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=0.1: torch.randn(*s, generator=g) * std  # noqa: E731
    d_in = HIDDEN * ACTION_DIM
    sd = {"model.layer_norm1.weight": 1 + rnd(d_in), "model.layer_norm1.bias": rnd(d_in),
          "model.fc1.weight": rnd(HIDDEN, d_in, std=d_in ** -0.5), "model.fc1.bias": rnd(HIDDEN),
          "model.layer_norm2.weight": 1 + rnd(HIDDEN), "model.layer_norm2.bias": rnd(HIDDEN),
          "model.fc2.weight": rnd(ACTION_DIM, HIDDEN, std=0.3), "model.fc2.bias": rnd(ACTION_DIM)}
    for i in range(2):
        sd |= {f"model.mlp_resnet_blocks.{i}.ffn.0.weight": 1 + rnd(HIDDEN),
               f"model.mlp_resnet_blocks.{i}.ffn.0.bias": rnd(HIDDEN),
               f"model.mlp_resnet_blocks.{i}.ffn.1.weight": rnd(HIDDEN, HIDDEN, std=HIDDEN ** -0.5),
               f"model.mlp_resnet_blocks.{i}.ffn.1.bias": rnd(HIDDEN)}
    return {f"module.{k}": v.bfloat16() for k, v in sd.items()}


def proprio_state_dict(seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = {"fc1.weight": torch.randn(HIDDEN, PROPRIO_DIM, generator=g) * 0.3,
          "fc1.bias": torch.randn(HIDDEN, generator=g) * 0.1,
          "fc2.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.1,
          "fc2.bias": torch.randn(HIDDEN, generator=g) * 0.1}
    return {f"module.{k}": v.bfloat16() for k, v in sd.items()}


def write_oft_checkpoint(path, *, head=None, proprio=None, stats=STATS, step=50000):
    written = write_openvla_checkpoint(path)
    torch.save(head if head is not None else head_state_dict(), path / f"action_head--{step}_checkpoint.pt")
    torch.save(proprio if proprio is not None else proprio_state_dict(),
               path / f"proprio_projector--{step}_checkpoint.pt")
    if stats is not None:
        (path / "dataset_statistics.json").write_text(json.dumps(stats))
    return written


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("oft") / "openvla-7b-oft-finetuned-libero-spatial"
    write_oft_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def loaded(ckpt):
    return OpenVLAOFTAdapter(checkpoint=str(ckpt))


@pytest.fixture(scope="module")
def batch():
    return [(ep, step) for ep in camera_episodes(INSTRUCTIONS) for step in ep.steps()][:3]


def fresh_llama(ckpt):
    """transformers' Llama with the shards' ``language_model.model.*`` tensors (float32)."""
    from transformers import LlamaConfig, LlamaModel

    cfg = json.loads((ckpt / "config.json").read_text())["text_config"]
    model = LlamaModel(LlamaConfig(**cfg)).eval()
    tensors = {}
    for f in sorted(ckpt.glob("model-*.safetensors")):
        tensors |= load_file(str(f))
    own = {k[len("language_model.model."):]: v.float() for k, v in tensors.items()
           if k.startswith("language_model.model.")}
    missing, unexpected = model.load_state_dict(own, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    return model


def upstream_forward(adapter, ckpt, batch):
    """(actions (B, chunk, 7), head inputs (B, chunk*7, hidden)) computed one sample at a time, unpadded."""
    head = {k[len("module."):]: v.float() for k, v in torch.load(next(ckpt.glob("action_head--*")),
                                                                   weights_only=True).items()}
    proj = {k[len("module."):]: v.float() for k, v in torch.load(next(ckpt.glob("proprio_projector--*")),
                                                                   weights_only=True).items()}
    stats = json.loads((ckpt / "dataset_statistics.json").read_text())[KEY]
    llama, tok = fresh_llama(ckpt), adapter.tokenizer
    inputs = adapter.prepare(batch)  # only the pixel values are taken from the adapter (tested elsewhere)
    actions, hiddens = [], []
    k = CHUNK * ACTION_DIM
    for i, (ep, step) in enumerate(batch):
        ids = tok(PROMPT.format(ep.instruction.lower()), add_special_tokens=False)["input_ids"]
        space = tok.convert_tokens_to_ids("▁")
        ids = [tok.bos_token_id, *ids] + ([space] if ids[-1] != space else [])
        input_ids = torch.tensor([ids + [1] * k + [2]])
        emb = llama.embed_tokens(input_ids)
        emb[:, len(ids):len(ids) + k] = 0.0  # the placeholder action embeddings are zeroed
        px = inputs.tensors["pixel_values"][i:i + 1]
        patches = torch.cat([adapter.model.projector(adapter.model.vision_backbone(im))
                             for im in torch.split(px, 6, dim=1)], 1)
        q01, q99 = np.asarray(stats["proprio"]["q01"]), np.asarray(stats["proprio"]["q99"])
        m = np.asarray(stats["proprio"].get("mask", [True] * PROPRIO_DIM))
        p = np.clip(np.where(m, 2 * (step.state - q01) / (q99 - q01 + 1e-8) - 1, step.state), -1, 1)
        p = torch.tensor(p, dtype=torch.float32)[None]
        ptok = F.linear(F.gelu(F.linear(p, proj["fc1.weight"], proj["fc1.bias"])), proj["fc2.weight"], proj["fc2.bias"])
        seq = torch.cat([emb[:, :1], patches, ptok[:, None], emb[:, 1:]], 1)
        out = llama(inputs_embeds=seq, attention_mask=torch.zeros(1, 1, seq.shape[1], seq.shape[1]),
                    use_cache=False).last_hidden_state  # bidirectional: nothing masked
        n_patches, n_prompt = patches.shape[1] + 1, len(ids) - 1
        h = out[:, n_patches + n_prompt: n_patches + n_prompt + k]
        x = h.reshape(1, CHUNK, ACTION_DIM * HIDDEN)
        x = F.layer_norm(x, (x.shape[-1],), head["model.layer_norm1.weight"], head["model.layer_norm1.bias"])
        x = F.relu(F.linear(x, head["model.fc1.weight"], head["model.fc1.bias"]))
        for b in range(2):
            pre = f"model.mlp_resnet_blocks.{b}.ffn."
            y = F.layer_norm(x, (HIDDEN,), head[pre + "0.weight"], head[pre + "0.bias"])
            x = x + F.relu(F.linear(y, head[pre + "1.weight"], head[pre + "1.bias"]))
        x = F.layer_norm(x, (HIDDEN,), head["model.layer_norm2.weight"], head["model.layer_norm2.bias"])
        a = F.linear(x, head["model.fc2.weight"], head["model.fc2.bias"])[0].detach().numpy()
        lo, hi, mask = (np.asarray(stats["action"][n]) for n in ("q01", "q99", "mask"))
        actions.append(np.where(mask, 0.5 * (a + 1) * (hi - lo + 1e-8) + lo, a))
        hiddens.append(h[0].detach())
    return np.stack(actions), torch.stack(hiddens)


@pytest.fixture(scope="module")
def reference(loaded, ckpt, batch):
    with torch.no_grad():
        return upstream_forward(loaded, ckpt, batch)


def test_actions_equal_the_upstream_forward(loaded, reference, batch):
    """A padded batch of 3 (two prompts, two cameras, the proprio token) gives upstream's unpadded chunk."""
    with torch.no_grad():
        out = loaded.run(loaded.prepare(batch), generators(3))
    want, _ = reference
    assert out.actions.shape == (3, CHUNK, ACTION_DIM)
    np.testing.assert_allclose(out.actions, want, rtol=1e-4, atol=2e-5)
    assert np.abs(np.diff(out.actions, axis=1)).max() > 1e-3  # the chunk's actions differ from each other
    assert np.all(out.actions[..., 6] == np.asarray(loaded.last_normalised)[..., 6])  # the gripper is masked
    d = loaded.describe()
    assert (d["unnorm_key"], d["statistics"], d["chunk"], d["normalization"]) == (
        KEY, "dataset_statistics.json", 8, "bounds_q99")
    assert d["wrist_cameras"] == ["wrist"] and d["camera"] == "agentview"


def test_head_input_site_is_the_llms_final_hidden_states(ckpt, reference, tmp_path):
    """`toolkit.extract(sites=["head"])` stores the head's input: the final hidden states at the action positions."""
    with dataset_registered(Steps) as dataset, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = toolkit.open_store(toolkit.extract(model="openvla-oft", dataset=dataset, store=tmp_path / "h.zarr",
                                               checkpoint=str(ckpt), sites=["head", "llm"], layers="-1",
                                               dtype="float32", max_episodes=2))
    got = s.read("head.layers.0.head_input")
    assert got.shape == (4, CHUNK * ACTION_DIM, HIDDEN)
    _, hidden = reference  # samples 0, 1 (episode 0), 2 (episode 1, step 0)
    np.testing.assert_allclose(got[:3], hidden.numpy(), rtol=1e-4, atol=1e-5)
    m = s.attrs["model"]
    assert m["load_report"]["n_missing"] == 0 and m["load_report"]["n_unexpected"] == 0
    assert "action_head--50000_checkpoint.pt" in m["load_report"]["layout"]
    n_llm = len(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"])
    assert m["load_report"]["n_loaded"] == n_llm + 16 + 4  # the shards' tensors, the head's, the projector's
    assert s.coord("policy_action").shape == (4, CHUNK, ACTION_DIM)


def test_the_conformance_contract_holds(loaded, batch):
    """Hooks change nothing and the captured residuals equal output_hidden_states of the bidirectional pass."""
    check_model_adapter(loaded, batch)


def _perturbed(src, dst, name, key, scale=1.5):
    shutil.copytree(src, dst)
    f = next(dst.glob(f"{name}--*"))
    sd = torch.load(f, weights_only=True)
    sd[key] = (sd[key].float() * scale + 0.05).bfloat16()
    torch.save(sd, f)
    return OpenVLAOFTAdapter(checkpoint=str(dst))


@pytest.mark.slow
def test_actions_depend_on_the_head_and_projector_files_not_on_the_lm_head(ckpt, loaded, batch, tmp_path):
    inputs = loaded.prepare(batch)
    with torch.no_grad():
        base = loaded.run(inputs, generators(3)).actions
        for name, key in [("action_head", "module.model.fc2.weight"),
                          ("action_head", "module.model.mlp_resnet_blocks.1.ffn.1.weight"),
                          ("proprio_projector", "module.fc1.weight")]:
            other = _perturbed(ckpt, tmp_path / key, name, key)
            assert np.abs(other.run(other.prepare(batch), generators(3)).actions - base).max() > 1e-3, key
        # the LM head (token logits) is in the checkpoint but unused by parallel decoding with a regression head
        w = loaded.model.language_model.lm_head.weight
        saved = w.detach().clone()
        try:
            w.data.mul_(3.0).add_(1.0)
            np.testing.assert_array_equal(loaded.run(inputs, generators(3)).actions, base)
        finally:
            w.data.copy_(saved)


def test_cli_extract_openvla_oft(ckpt, tmp_path):
    with dataset_registered(Steps) as dataset:
        res = CliRunner().invoke(cli, ["extract", "--model", "openvla-oft", "--checkpoint", str(ckpt),
                                       "--dataset", dataset, "--store", str(tmp_path / "c.zarr"), "--sites", "head",
                                       "--max-episodes", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    s = toolkit.open_store(tmp_path / "c.zarr")
    assert s.attrs["model"]["name"] == "openvla-oft" and s.attrs["model"]["unnorm_key"] == KEY
    assert s.read("head.layers.0.head_input").shape == (2, CHUNK * ACTION_DIM, HIDDEN)


def test_plain_openvla_refuses_an_oft_directory(ckpt):
    with pytest.raises(ToolkitError, match="is an OpenVLA-OFT fine-tune \\(action_head--50000_checkpoint.pt .*"
                                           "pass --model openvla-oft") as e:
        OpenVLAAdapter(checkpoint=str(ckpt), unnorm_key="bridge_orig")
    assert "\n" not in str(e.value)
    with pytest.raises(ToolkitError, match="--model openvla-oft"):
        OpenVLAAdapter.architecture(str(ckpt))


@pytest.mark.parametrize("name, match", [
    ("noisy_action_projector--50000_checkpoint.pt", "diffusion"),
    ("vision_backbone--50000_checkpoint.pt", "FiLM"),
])
def test_unsupported_variants_are_refused_naming_the_file(ckpt, tmp_path, name, match):
    path = tmp_path / "variant"
    shutil.copytree(ckpt, path)
    torch.save({"module.fc1.weight": torch.zeros(HIDDEN, 1)}, path / name)
    for call in (lambda: OpenVLAOFTAdapter(checkpoint=str(path)), lambda: OpenVLAOFTAdapter.architecture(str(path))):
        with pytest.raises(CheckpointError, match=f"{name} is .*{match}.*only L1-regression") as e:
            call()
        assert "\n" not in str(e.value)


def test_head_file_keys_are_checked(ckpt, tmp_path, caplog):
    """Unprefixed keys load too; an extra tensor is one warning (an error with --strict); a missing one and a
    file that pickles more than tensors are one-line errors."""
    sd = {k[len("module."):]: v for k, v in head_state_dict().items()}
    path = tmp_path / "extra"
    write_oft_checkpoint(path, head={**sd, "model.fc3.weight": torch.zeros(2, 2)})
    with caplog.at_level(logging.WARNING):
        a = OpenVLAOFTAdapter(checkpoint=str(path))
    assert a.load_report.unexpected == ["action_head.model.fc3.weight"]
    assert any("1 checkpoint tensors are not used" in r.getMessage() and "model.fc3.weight" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(CheckpointError, match="action_head--50000_checkpoint.pt: 1 checkpoint tensors .*--strict"):
        OpenVLAOFTAdapter(checkpoint=str(path), strict=True)
    path = tmp_path / "missing"
    write_oft_checkpoint(path, head={k: v for k, v in sd.items() if k != "model.layer_norm2.bias"})
    with pytest.raises(CheckpointError, match="1 of 16 weights are not in the checkpoint .*model.layer_norm2.bias"):
        OpenVLAOFTAdapter(checkpoint=str(path))
    path = tmp_path / "pickled"
    write_oft_checkpoint(path, head={"model.fc2.weight": torch.zeros(7, 64), "config": argparse.Namespace(lr=1e-4)})
    with pytest.raises(CheckpointError, match="cannot read .*action_head--50000_checkpoint.pt .*weights_only") as e:
        OpenVLAOFTAdapter(checkpoint=str(path))
    assert "\n" not in str(e.value)


def test_unnorm_key_is_chosen_as_upstream_does(ckpt, tmp_path):
    path = tmp_path / "two"
    shutil.copytree(ckpt, path)
    two = {**STATS, "libero_object_no_noops": STATS[KEY]}
    (path / "dataset_statistics.json").write_text(json.dumps(two))
    with pytest.raises(ToolkitError, match="several datasets \\(libero_object_no_noops, libero_spatial_no_noops\\)"
                                           ".*unnorm_key=KEY") as e:
        OpenVLAOFTAdapter(checkpoint=str(path))
    assert "\n" not in str(e.value)
    a = OpenVLAOFTAdapter(checkpoint=str(path), unnorm_key="libero_spatial")  # the suite name finds _no_noops
    assert a.unnorm_key == KEY
    with pytest.raises(ToolkitError, match="unnorm_key 'bridge_orig' is not in the statistics; keys: libero_obj"):
        OpenVLAOFTAdapter(checkpoint=str(path), unnorm_key="bridge_orig")
    (path / "dataset_statistics.json").unlink()
    with pytest.raises(ToolkitError, match="no dataset_statistics.json.*unnorm_key=KEY to use config.json's"):
        OpenVLAOFTAdapter(checkpoint=str(path))


def test_bounds_normalisation_and_a_missing_state(loaded, batch):
    """ALOHA's min/max bounds (upstream's BOUNDS) unnormalise with max/min; a step without state is one line."""
    a = loaded
    saved = a.normalization, a.action_bounds
    try:
        stats = json.loads(json.dumps(STATS[KEY]["action"]))
        a.action_bounds = (np.asarray(stats["min"]), np.asarray(stats["max"]), np.asarray(stats["mask"]))
        x = np.linspace(-1, 1, 14).reshape(2, 7)
        lo, hi = np.asarray(stats["min"]), np.asarray(stats["max"])
        want = np.where(stats["mask"], 0.5 * (x + 1) * (hi - lo + 1e-8) + lo, x)
        np.testing.assert_allclose(a.unnormalise(x), want, rtol=1e-6)
    finally:
        a.normalization, a.action_bounds = saved
    ep, step = batch[0]
    bad = type(step)(index=0, images=step.images, state=None)
    with pytest.raises(ToolkitError, match="takes a 8-D state; a step of task_0/episode_0 has no state"):
        a.prepare([(ep, bad)])


def test_center_crop_samples_as_tf_crop_and_resize():
    """Bilinear samples at y = (off + i (s / (H - 1))) (H - 1) over the central sqrt(0.9) box, as TF's op."""
    x = torch.rand(3, 10, 12)
    got = center_crop(x)
    s = 0.9 ** 0.5
    off = (1 - s) / 2
    ys = (off + np.arange(10) * s / 9) * 9
    xs = (off + np.arange(12) * s / 11) * 11
    a = x.numpy()
    want = np.empty_like(a)
    for i, y in enumerate(ys):
        y0, wy = int(np.floor(y)), y - np.floor(y)
        for j, xx in enumerate(xs):
            x0, wx = int(np.floor(xx)), xx - np.floor(xx)
            y1, x1 = min(y0 + 1, 9), min(x0 + 1, 11)
            top = a[:, y0, x0] * (1 - wx) + a[:, y0, x1] * wx
            bot = a[:, y1, x0] * (1 - wx) + a[:, y1, x1] * wx
            want[:, i, j] = top * (1 - wy) + bot * wy
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_small_default_runs_and_matches_its_architecture(batch):
    with pytest.warns(UserWarning, match="small randomly initialised OpenVLA-OFT"):
        a = OpenVLAOFTAdapter()
    experts, sites = OpenVLAOFTAdapter.architecture()
    assert experts == a.experts and sites == a.sites and "head" in sites
    with torch.no_grad():
        out = a.run(a.prepare(batch[:1]), generators(1))
    assert out.actions.shape == (1, 8, 7) and np.isfinite(out.actions).all()


def test_strict_refuses_unused_llm_tensors_in_both_openvla_models(tmp_path):
    """A stray LoRA factor in the shards is one warning by default and, with --strict, a one-line refusal."""
    lora = {"language_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, HIDDEN).bfloat16()}
    plain, oft = tmp_path / "plain", tmp_path / "oft"
    write_openvla_checkpoint(plain, extra=lora)
    write_oft_checkpoint(oft)
    write_openvla_checkpoint(oft, extra=lora)  # the same shards, with the stray tensor
    for make in (lambda **kw: OpenVLAAdapter(checkpoint=str(plain), unnorm_key="bridge_orig", **kw),
                 lambda **kw: OpenVLAOFTAdapter(checkpoint=str(oft), **kw)):
        assert make().load_report.unexpected == list(lora)
        with pytest.raises(CheckpointError, match="1 checkpoint tensors are not used .*lora_A.*--strict") as e:
            make(strict=True)
        assert "\n" not in str(e.value)


def test_random_weights_keep_the_files_architecture(ckpt, loaded, batch):
    a = OpenVLAOFTAdapter(checkpoint=str(ckpt), random_weights=True, seed=4)
    assert a.load_report is None and a.describe()["random_init"] is True
    assert {k: v.shape for k, v in a.model.state_dict().items()} == {
        k: v.shape for k, v in loaded.model.state_dict().items()}
    with torch.no_grad():
        x = a.run(a.prepare(batch[:1]), generators(1)).actions
        y = loaded.run(loaded.prepare(batch[:1]), generators(1)).actions
    assert x.shape == y.shape and np.abs(x - y).max() > 1e-3


def test_bfloat16_runs_close_to_float32(ckpt, loaded, batch):
    """The dtype upstream deploys in: the bidirectional mask and the head run in bf16 too."""
    a = OpenVLAOFTAdapter(checkpoint=str(ckpt), dtype="bfloat16")
    with torch.no_grad():
        x = a.run(a.prepare(batch[:2]), generators(2)).actions
        y = loaded.run(loaded.prepare(batch[:2]), generators(2)).actions
    scale = np.asarray(STATS[KEY]["action"]["q99"]) - np.asarray(STATS[KEY]["action"]["q01"])
    assert np.abs((x - y) / scale).max() < 0.1
