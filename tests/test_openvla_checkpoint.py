"""OpenVLA checkpoints in the real ``openvla/openvla-7b`` layout, loaded natively (no remote code).

The tests write the layout themselves at toy sizes: ``config.json`` with the real fields (model_type
``openvla``, ``timm_model_ids``, ``text_config``, ``norm_stats`` with q01/q99/mask), bf16 tensors under the
real key names split over three ``model-0000N-of-00003.safetensors`` shards with a
``model.safetensors.index.json``, and the tokenizer files.  The key names are checked against the real
7B's at full size on the meta device.
"""

import json
import logging
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import toolkit
from synthetic import camera_episodes, dataset_registered
from toolkit.sdk.adapters import DatasetAdapter
from toolkit.sdk.checkpoint import CheckpointError
from toolkit.cli.main import cli
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import llama_tokenizer
from toolkit.testing import check_model_adapter, generators
from toolkit_plugins.openvla import OpenVLAAdapter, loading
from toolkit_plugins.openvla.model import TINY_CONFIG, PrismaticConfig, PrismaticForActionPrediction, build_tiny_model

pytestmark = pytest.mark.usefixtures("pi0_single_thread")

INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "open the top drawer"]
# two datasets, as in the real file (which has one per OXE dataset); the gripper dimension is masked
NORM_STATS = {
    "fractal20220817_data": {"action": {"q01": [-0.2] * 7, "q99": [0.2] * 7, "mask": [True] * 6 + [False]}},
    "bridge_orig": {"action": {
        "mean": [0.0] * 7, "std": [1.0] * 7, "max": [1.0] * 7, "min": [-1.0] * 7,
        "q01": [-0.03, -0.04, -0.05, -0.2, -0.15, -0.3, 0.0],
        "q99": [0.03, 0.045, 0.04, 0.18, 0.16, 0.33, 1.0],
        "mask": [True, True, True, True, True, True, False]},
        "proprio": {"q01": [0.0] * 7, "q99": [0.0] * 7}, "num_transitions": 10, "num_trajectories": 2},
}
# the real openvla-7b config.json (text_config holds only what differs from Llama-2-7B's defaults)
OPENVLA_7B_CONFIG = {
    **{k: v for k, v in TINY_CONFIG.items() if k not in ("text_config", "toolkit_vit_overrides")},
    "image_sizes": [224, 224], "hf_llm_id": "meta-llama/Llama-2-7b-hf", "torch_dtype": "bfloat16",
    "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                 "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
    "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064},
}


def write_openvla_checkpoint(path, *, seed=1, drop=(), extra=None, dtype=torch.bfloat16):
    """A tiny checkpoint in openvla-7b's layout; returns {key: tensor} as written."""
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(seed)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if k not in drop}
    tensors.update(extra or {})
    keys = list(tensors)
    shards = [keys[: len(keys) // 3], keys[len(keys) // 3: 2 * len(keys) // 3], keys[2 * len(keys) // 3:]]
    weight_map = {}
    for i, part in enumerate(shards, 1):
        name = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config = {**TINY_CONFIG, "norm_stats": NORM_STATS, "torch_dtype": "bfloat16",
              "auto_map": OPENVLA_7B_CONFIG["auto_map"]}
    (path / "config.json").write_text(json.dumps(config))
    llama_tokenizer().save_pretrained(path)
    return tensors


def ckpt_tokenizer_id(token):
    return llama_tokenizer().convert_tokens_to_ids(token)


class Steps(DatasetAdapter):
    name = "openvla_ckpt_steps"

    def episodes(self):
        yield from camera_episodes(INSTRUCTIONS)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("openvla") / "openvla-7b"
    return path, write_openvla_checkpoint(path)


@pytest.fixture(scope="module")
def loaded(ckpt):
    """The checkpoint loaded in float32 (cast from the bf16 file)."""
    return OpenVLAAdapter(checkpoint=str(ckpt[0]), unnorm_key="bridge_orig")


@pytest.fixture(scope="module")
def batch():
    return [(ep, step) for ep in camera_episodes(INSTRUCTIONS) for step in ep.steps()][:3]


def test_full_size_layout_is_openvla_7b():
    """The real config.json (no size overrides) builds, on the meta device, exactly openvla-7b's 982 keys."""
    with torch.device("meta"):
        model = PrismaticForActionPrediction(PrismaticConfig(OPENVLA_7B_CONFIG))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 982
    assert sum(p.numel() for p in model.parameters()) == 7_541_237_184  # "7.54B params"
    want = {
        "vision_backbone.featurizer.cls_token": (1, 1, 1024), "vision_backbone.featurizer.reg_token": (1, 4, 1024),
        "vision_backbone.featurizer.pos_embed": (1, 256, 1024),
        "vision_backbone.featurizer.patch_embed.proj.weight": (1024, 3, 14, 14),
        "vision_backbone.featurizer.blocks.23.attn.qkv.weight": (3072, 1024),
        "vision_backbone.featurizer.blocks.0.ls1.scale_factor": (1024,),
        "vision_backbone.featurizer.blocks.0.ls2.scale_factor": (1024,),
        "vision_backbone.featurizer.blocks.0.mlp.fc1.weight": (4096, 1024),
        "vision_backbone.featurizer.norm.bias": (1024,),
        "vision_backbone.fused_featurizer.pos_embed": (1, 256, 1152),
        "vision_backbone.fused_featurizer.blocks.26.attn.qkv.bias": (3456,),
        "vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight": (4304, 1152),
        "vision_backbone.fused_featurizer.attn_pool.latent": (1, 1, 1152),
        "vision_backbone.fused_featurizer.attn_pool.kv.weight": (2304, 1152),
        "vision_backbone.fused_featurizer.attn_pool.mlp.fc2.weight": (1152, 4304),
        "projector.fc1.weight": (8704, 2176), "projector.fc2.weight": (4096, 8704), "projector.fc3.bias": (4096,),
        "language_model.model.embed_tokens.weight": (32064, 4096),
        "language_model.model.layers.31.mlp.down_proj.weight": (4096, 11008),
        "language_model.model.layers.0.self_attn.q_proj.weight": (4096, 4096),
        "language_model.model.norm.weight": (4096,), "language_model.lm_head.weight": (32064, 4096),
    }
    assert {k: shapes[k] for k in want} == want
    assert not any(re.search(r"fused_featurizer\.(cls_token|reg_token|blocks\.\d+\.ls)", k) for k in shapes)
    assert sum(1 for k in shapes if k.startswith("language_model.model.layers.")) == 32 * 9
    assert not any(k.endswith(".bias") for k in shapes if k.startswith("language_model"))


def test_loads_every_tensor_exactly(ckpt, loaded):
    path, written = ckpt
    report = loaded.load_report
    assert report.missing == [] and report.unexpected == [] and report.derived == []
    assert sorted(report.loaded) == sorted(written) and report.n_params == len(written)
    assert "openvla" in report.layout and "3 files" in report.layout
    own = loaded.model.state_dict()
    for f in sorted(path.glob("model-*.safetensors")):
        for key, t in load_file(str(f)).items():  # read independently of the loader
            assert own[key].dtype == torch.float32
            torch.testing.assert_close(own[key], t.float(), atol=0, rtol=0, msg=key)
    assert not any(p.is_meta for p in loaded.model.parameters())
    assert not any(b.is_meta for b in loaded.model.buffers())
    d = loaded.describe()
    assert d["random_init"] is False and d["load_report"]["n_loaded"] == len(written)
    assert d["load_report"]["n_missing"] == 0


def test_bf16_weights_are_the_file_tensors(ckpt, monkeypatch):
    """--model-dtype bfloat16 on a bf16 checkpoint: the model is built on the meta device and every parameter
    *is* a tensor read from a shard (assigned, never copied), so no weight is held twice."""
    built_on_meta, read = [], {}
    original_assign = loading.assign_from_safetensors

    def spy_assign(model, files, **kw):
        built_on_meta.append(all(p.is_meta for p in model.parameters()))
        return original_assign(model, files, **kw)

    import safetensors

    real_open = safetensors.safe_open

    class SpyOpen:
        def __init__(self, *a, **kw):
            self.h = real_open(*a, **kw)

        def __enter__(self):
            self.h.__enter__()
            return self

        def __exit__(self, *exc):
            return self.h.__exit__(*exc)

        def keys(self):
            return self.h.keys()

        def get_slice(self, key):
            return self.h.get_slice(key)

        def get_tensor(self, key):
            t = self.h.get_tensor(key)
            read[key] = t.untyped_storage().data_ptr()
            return t

    monkeypatch.setattr(loading, "assign_from_safetensors", spy_assign)
    monkeypatch.setattr(safetensors, "safe_open", SpyOpen)
    a = OpenVLAAdapter(checkpoint=str(ckpt[0]), dtype="bfloat16", unnorm_key="bridge_orig")
    assert built_on_meta == [True]
    params = dict(a.model.named_parameters())
    assert set(read) == set(ckpt[1]) and set(params) == set(read)
    assert all(params[k].dtype == torch.bfloat16 and params[k].untyped_storage().data_ptr() == read[k] for k in read)
    for k, t in ckpt[1].items():
        assert torch.equal(params[k], t), k


def test_a_dropped_key_is_a_one_line_cli_error_unless_allowed(tmp_path):
    dropped = "vision_backbone.fused_featurizer.blocks.1.attn.qkv.weight"
    path = tmp_path / "ckpt"
    write_openvla_checkpoint(path, drop=[dropped])
    with dataset_registered(Steps) as dataset:
        args = ["extract", "--model", "openvla", "--checkpoint", str(path), "--dataset", dataset,
                "--model-option", "unnorm_key=bridge_orig", "--sites", "llm", "--layers", "-1", "--max-steps", "1",
                "--no-progress"]
        res = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "bad.zarr")])
        assert res.exit_code != 0 and not (tmp_path / "bad.zarr").exists()
        line = res.output.strip()
        assert "\n" not in line and "Traceback" not in line
        assert f"1 of {len(build_tiny_model(0).state_dict())} weights are not in the checkpoint" in line
        assert dropped in line and "openvla (dinosiglip-vit-so-224px)" in line and "--allow-missing" in line
        ok = CliRunner().invoke(cli, [*args, "--allow-missing", "--store", str(tmp_path / "ok.zarr")])
        assert ok.exit_code == 0, ok.output
    report = toolkit.open_store(tmp_path / "ok.zarr").attrs["model"]["load_report"]
    assert report["missing"] == [dropped] and report["n_missing"] == 1


def test_unexpected_keys_are_reported_and_bad_shapes_are_one_line(tmp_path):
    extra = {"vision_backbone.featurizer.head.weight": torch.zeros(3, 32, dtype=torch.bfloat16)}
    write_openvla_checkpoint(tmp_path / "extra", extra=extra)
    a = OpenVLAAdapter(checkpoint=str(tmp_path / "extra"), unnorm_key="bridge_orig")
    assert a.load_report.unexpected == list(extra) and a.load_report.missing == []
    assert a.describe()["load_report"]["unexpected"] == list(extra)
    bad = {"projector.fc3.bias": torch.zeros(5, dtype=torch.bfloat16)}
    write_openvla_checkpoint(tmp_path / "bad", extra=bad)
    with pytest.raises(CheckpointError, match=r"weight projector.fc3.bias has shape \(5,\) in model-0000") as e:
        OpenVLAAdapter(checkpoint=str(tmp_path / "bad"), unnorm_key="bridge_orig")
    assert "\n" not in str(e.value)


def test_seven_action_tokens_decode_through_the_files_norm_stats(ckpt, loaded, batch):
    """The generated tokens, decoded by the formula of OpenVLA's predict_action written out here, with the
    statistics read from config.json: 256 bins over [-1, 1], q01/q99 where mask is true."""
    out = loaded.run(loaded.prepare(batch), generators(3))
    tokens = loaded.last_tokens
    assert tokens.shape == (3, 7) and ((tokens >= 32000 - 256) & (tokens < 32000)).mean() > 0.5
    s = json.loads((ckpt[0] / "config.json").read_text())["norm_stats"]["bridge_orig"]["action"]
    edges = np.linspace(-1.0, 1.0, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    want = np.empty((3, 7))
    for i in range(3):
        for j in range(7):
            a = centres[min(max(32064 - 64 - int(tokens[i, j]) - 1, 0), 254)]
            if s["mask"][j]:
                a = 0.5 * (a + 1) * (s["q99"][j] - s["q01"][j]) + s["q01"][j]
            want[i, j] = a
    np.testing.assert_allclose(out.actions[:, 0], want, rtol=1e-6, atol=1e-7)
    assert loaded.describe()["unnorm_key"] == "bridge_orig"


def test_a_loaded_checkpoint_passes_the_adapter_contract(loaded, batch):
    """Conformance on the loaded weights: hooks change nothing, and the captured LLM residuals equal the LLM's
    own ``output_hidden_states`` (``check_reference_hidden_states``), in both capture modes."""
    check_model_adapter(loaded, batch)
    options = loaded.options
    loaded.capture, loaded.options = "actions", {**options, "capture": "actions"}  # as if built with the option
    try:
        check_model_adapter(loaded, batch)
    finally:
        loaded.capture, loaded.options = "prefix", options


def test_generation_emits_no_deprecation_warning(loaded, batch, caplog):
    """The KV cache goes through transformers' current keyword: no 'past_key_values' deprecation per run."""
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loaded.run(loaded.prepare(batch[:1]), generators(1))
    said = [str(w.message) for w in rec] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "deprecat" in m.lower() or "past_key_values" in m], said


def test_random_weights_use_the_checkpoints_architecture(ckpt):
    path, written = ckpt
    a = OpenVLAAdapter(checkpoint=str(path), random_weights=True, seed=3, unnorm_key="bridge_orig")
    b = OpenVLAAdapter(checkpoint=str(path), random_weights=True, seed=3, unnorm_key="bridge_orig")
    d = a.describe()
    assert d["random_init"] is True and d["load_report"] is None and a.load_report is None
    own, other = a.model.state_dict(), b.model.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in written.items()}
    assert all(torch.equal(own[k], other[k]) for k in own)  # seeded
    assert not torch.equal(own["projector.fc1.weight"].bfloat16(), written["projector.fc1.weight"])


def test_readme_openvla_command_runs_on_the_same_layout(ckpt, tmp_path):
    """docs/checkpoints.md's OpenVLA command, run verbatim except for the paths (a tiny RLDS dataset, this tiny
    checkpoint in the real layout, CPU instead of CUDA)."""
    from test_rlds import write_libero_rlds

    readme = (toolkit.__file__.rsplit("/toolkit/", 1)[0] + "/docs/checkpoints.md")
    text = open(readme).read()
    cmd = re.search(r"toolkit extract --model openvla .*?--store \S+", text, re.S).group(0)
    args = cmd.replace("\\\n", " ").split()[1:]
    assert "--trust-remote-code" not in args and "openvla/openvla-7b" in args and "bfloat16" in args
    data = write_libero_rlds(tmp_path / "rlds")
    hub = tmp_path / "hub" / "openvla-7b"
    shutil.copytree(ckpt[0], hub)
    swap = {"openvla/openvla-7b": str(hub), "cuda": "cpu", "stores/openvla.zarr": str(tmp_path / "openvla.zarr")}
    args = [swap.get(a, str(data) if a.startswith("~/tfds/") else a) for a in args]
    res = CliRunner().invoke(cli, [*args, "--max-episodes", "1", "--max-steps", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    s = toolkit.open_store(tmp_path / "openvla.zarr")
    m = s.attrs["model"]
    assert m["random_init"] is False and m["dtype"] == "bfloat16" and m["load_report"]["n_missing"] == 0
    assert m["load_report"]["n_loaded"] == len(ckpt[1]) and m["unnorm_key"] == "bridge_orig"
    assert s.read("llm", "resid_post").shape[:2] == (2, 2) and s.coord("policy_action").shape == (2, 1, 7)


@pytest.mark.parametrize("change, match", [
    ({"vision_backbone_id": "siglip-vit-so400m", "use_fused_vision_backbone": False,
      "timm_model_ids": ["vit_so400m_patch14_siglip_224"]}, "not a fused DINOv2\\+SigLIP pair .*--trust-remote-code"),
    ({"timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_large_patch14_clip_336.openai"]},
     "'vit_large_patch14_clip_336.openai' is not one the toolkit implements.*--trust-remote-code"),
    ({"timm_override_act_layers": [None, "quick_gelu"]}, "activation is overridden \\('quick_gelu'\\)"),
    ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}, "is not an OpenVLA/Prismatic"),
])
def test_other_variants_need_their_remote_code(tmp_path, change, match):
    path = tmp_path / "v"
    write_openvla_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ToolkitError, match=match) as e:
        OpenVLAAdapter(checkpoint=str(path))
    assert "\n" not in str(e.value)


def test_missing_tokenizer_and_offline_hub_id_are_one_line_errors(ckpt, tmp_path):
    path = tmp_path / "notok"
    shutil.copytree(ckpt[0], path)
    for f in path.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ToolkitError, match="no tokenizer in .*tokenizer.model, tokenizer.json.*tokenizer=DIR"):
        OpenVLAAdapter(checkpoint=str(path), unnorm_key="bridge_orig")
    a = OpenVLAAdapter(checkpoint=str(path), unnorm_key="bridge_orig", tokenizer=str(ckpt[0] / "tokenizer.json"))
    assert a.tokenizer.convert_tokens_to_ids("▁open") == ckpt_tokenizer_id("▁open")
    with pytest.raises(ToolkitError, match="not in the Hugging Face cache .*--checkpoint DIR") as e:
        OpenVLAAdapter(checkpoint="someone/no-such-openvla")
    assert "\n" not in str(e.value)


def test_extract_in_process_matches_the_loaded_model(ckpt, loaded, tmp_path):
    """toolkit.run.pipeline over the checkpoint reproduces the adapter's own forward on the same steps."""
    with dataset_registered(Steps) as dataset, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = toolkit.open_store(toolkit.extract(model="openvla", dataset=dataset, store=tmp_path / "s.zarr",
                                               checkpoint=str(ckpt[0]), sites=["llm"], layers="-1",
                                               dtype="float32", max_episodes=1,
                                               model_options={"unnorm_key": "bridge_orig"}))
    ep = next(iter(camera_episodes(INSTRUCTIONS)))
    steps = [(ep, st) for st in ep.steps()][: s.n_samples]
    out = loaded.run(loaded.prepare(steps), generators(len(steps)))
    np.testing.assert_allclose(s.coord("policy_action"), out.actions, rtol=1e-5, atol=1e-6)
    assert s.attrs["model"]["load_report"]["layout"] == loaded.load_report.layout


def _randomised(tower):
    """The tower with every parameter redrawn (LayerScale 1e-5 would hide the blocks)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return tower


def test_vision_towers_compute_what_transformers_dinov2_and_siglip_compute():
    """Our timm-named towers against transformers' independent DINOv2-with-registers and SigLIP, with the
    checkpoint's weights renamed onto them: the second-to-last block's patch tokens agree."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, SiglipVisionModel

    vb = build_tiny_model(0).vision_backbone
    dino, siglip = _randomised(vb.featurizer), _randomised(vb.fused_featurizer)
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                layer_norm_eps=1e-6, hidden_act="gelu")  # timm 0.9 (OpenVLA's) uses exact GELU for both
    hf_dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**size, mlp_ratio=2, num_register_tokens=4)).eval()
    hf_siglip = SiglipVisionModel(SiglipVisionConfig(**size, intermediate_size=64, vision_use_head=False)).eval()

    def renamed(own, hf, rules):
        sd = {}
        for key in hf.state_dict():
            for pattern, fn in rules:
                if (m := re.fullmatch(pattern, key)):
                    sd[key] = fn(own, m)
                    break
        hf.load_state_dict(sd, strict=False)
        assert set(hf.state_dict()) - set(sd) <= {"embeddings.mask_token"}

    def qkv(i):
        return lambda o, m: o[f"blocks.{m[1]}.attn.qkv.{m[2]}"].chunk(3)[i]

    own = dino.state_dict()
    renamed(own, hf_dino, [
        (r"embeddings\.cls_token", lambda o, m: o["cls_token"]),
        (r"embeddings\.register_tokens", lambda o, m: o["reg_token"]),
        (r"embeddings\.position_embeddings", lambda o, m: torch.cat([torch.zeros(1, 1, 32), o["pos_embed"]], 1)),
        (r"embeddings\.patch_embeddings\.projection\.(\w+)", lambda o, m: o[f"patch_embed.proj.{m[1]}"]),
        (r"encoder\.layer\.(\d+)\.attention\.q_proj\.(\w+)", qkv(0)),
        (r"encoder\.layer\.(\d+)\.attention\.k_proj\.(\w+)", qkv(1)),
        (r"encoder\.layer\.(\d+)\.attention\.v_proj\.(\w+)", qkv(2)),
        (r"encoder\.layer\.(\d+)\.attention\.o_proj\.(\w+)", lambda o, m: o[f"blocks.{m[1]}.attn.proj.{m[2]}"]),
        (r"encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1", lambda o, m: o[f"blocks.{m[1]}.ls{m[2]}.scale_factor"]),
        (r"encoder\.layer\.(\d+)\.(norm\d|mlp\.fc\d)\.(\w+)", lambda o, m: o[f"blocks.{m[1]}.{m[2]}.{m[3]}"]),
        (r"layernorm\.(\w+)", lambda o, m: o[f"norm.{m[1]}"]),
    ])
    own = siglip.state_dict()
    renamed(own, hf_siglip, [
        (r"embeddings\.patch_embedding\.(\w+)", lambda o, m: o[f"patch_embed.proj.{m[1]}"]),
        (r"embeddings\.position_embedding\.weight", lambda o, m: o["pos_embed"][0]),
        (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(\w+)", qkv(0)),
        (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(\w+)", qkv(1)),
        (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(\w+)", qkv(2)),
        (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(\w+)", lambda o, m: o[f"blocks.{m[1]}.attn.proj.{m[2]}"]),
        (r"encoder\.layers\.(\d+)\.layer_norm(\d)\.(\w+)", lambda o, m: o[f"blocks.{m[1]}.norm{m[2]}.{m[3]}"]),
        (r"encoder\.layers\.(\d+)\.(mlp\.fc\d)\.(\w+)", lambda o, m: o[f"blocks.{m[1]}.{m[2]}.{m[3]}"]),
        (r"post_layernorm\.(\w+)", lambda o, m: o[f"norm.{m[1]}"]),
    ])
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_dino = hf_dino(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1 + 4:]
        want_siglip = hf_siglip(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(dino(x), want_dino, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(siglip(x), want_siglip, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dino(x), siglip(x), atol=1e-2)


def test_trusted_remote_code_failure_is_one_line(tmp_path):
    """--trust-remote-code on a variant the toolkit does not implement runs the checkpoint's own code; here it
    names a module the directory lacks, which is one line, not a traceback."""
    path = tmp_path / "clip"
    write_openvla_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    config["timm_model_ids"][1] = "vit_large_patch14_clip_336.openai"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ToolkitError, match="cannot load openvla checkpoint .* with its own code") as e:
        OpenVLAAdapter(checkpoint=str(path), trust_remote_code=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ToolkitError, match="--random-weights needs a checkpoint the toolkit implements"):
        OpenVLAAdapter(checkpoint=str(path), trust_remote_code=True, random_weights=True)
