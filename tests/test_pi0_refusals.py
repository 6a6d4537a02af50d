"""Nothing loads into pi0 silently: tensors the model does not use (unmerged LoRA factors) are one warning with their
count and names as the file has them, ``--strict`` refuses them in one line; a checkpoint of another family the
toolkit knows (pi0.5 from lerobot or openpi, OpenVLA) is one line naming the ``--model`` to use."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import toolkit
from pi_common import toolkit_cli
from test_pi0_checkpoints import native_weights, write_checkpoint
from toolkit.sdk.checkpoint import CheckpointError
from toolkit_plugins.pi0 import Pi0Adapter

pytestmark = pytest.mark.usefixtures("pi0_single_thread")

Q = "model.paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj."
LORA = {Q + "lora_A.weight": torch.ones(4, 64), Q + "lora_B.weight": torch.ones(64, 4)}


@pytest.fixture(scope="module")
def weights():
    return native_weights()


def add_tensors(ckpt, extra=None, drop=(), rename=None):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors = {(rename(k) if rename else k): v for k, v in tensors.items() if not any(d in k for d in drop)}
    tensors.update(extra or {})
    save_file(tensors, str(ckpt / "model.safetensors"))
    return tensors


def one_line_refusal(*args):
    res = toolkit_cli(*args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1 and "Traceback" not in res.output, res.stderr
    return lines[0]


def test_unmerged_lora_factors_are_one_warning_and_strict_refuses_them(weights, tokenizer_dir, tmp_path, caplog):
    ckpt = write_checkpoint(tmp_path / "ck", "current", weights)
    add_tensors(ckpt, LORA)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = Pi0Adapter(checkpoint=str(ckpt), tokenizer=str(tokenizer_dir))
    lines = [r.getMessage() for r in caplog.records if "not used by the model" in r.getMessage()]
    assert len(lines) == 1, lines
    # the names as they are in the file (not the toolkit's internal ones), with the count
    assert "2 checkpoint tensors are not used by the model" in lines[0]
    assert f"first: {Q}lora_A.weight, {Q}lora_B.weight" in lines[0] and "--strict refuses them" in lines[0]
    assert "(2 are unmerged LoRA factors: merge them into the base weights" in lines[0]
    assert a.load_report.unexpected == sorted(LORA) and a.load_report.missing == []
    for n, t in weights.items():  # the LoRA factors were not merged into anything
        if n != "model.dit.embed_tokens.weight":
            assert torch.equal(a.model.state_dict()[n], t), n

    store = tmp_path / "s.zarr"
    base = ["extract", "--model", "pi0", "--checkpoint", ckpt, "--model-option", f"tokenizer={tokenizer_dir}",
            "--store", store, "--max-episodes", "1", "--max-steps", "1", "--no-progress"]
    line = one_line_refusal(*base, "--strict")
    assert "2 checkpoint tensors are not used by the model" in line and "refused (--strict)" in line
    assert "lora_A.weight" in line and "unmerged LoRA factors" in line and not store.exists()
    res = toolkit_cli(*base)  # without --strict: runs, and the store names them
    assert res.returncode == 0, res.stderr
    assert toolkit.open_store(store).attrs["model"]["load_report"]["unexpected"] == sorted(LORA)


def pi05_from_pi0(ckpt):
    """pi0.5's weight names (openpi's converter, no ``type``): no state_proj, ``time_mlp_*`` instead of
    ``action_time_mlp_*``, adaptive RMS norms (``...layernorm.dense``) in the action expert."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    out = {}
    for k, v in tensors.items():
        if k.startswith("state_proj.") or k.startswith("action_time_mlp_out."):
            continue
        if k.startswith("action_time_mlp_in."):
            out["time_mlp_in." + k.split(".", 1)[1]] = v
            continue
        m = "gemma_expert.model.layers."
        if m in k and k.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            out[k.replace("layernorm.weight", "layernorm.dense.weight")] = torch.zeros(3 * v.shape[0], v.shape[0])
            continue
        out[k] = v
    save_file(out, str(ckpt / "model.safetensors"))


def test_a_pi05_checkpoint_names_the_right_model(weights, tokenizer_dir, tmp_path):
    lerobot = write_checkpoint(tmp_path / "lerobot", "current", weights)
    cfg = json.loads((lerobot / "config.json").read_text())
    (lerobot / "config.json").write_text(json.dumps({**cfg, "type": "pi05"}))
    openpi = write_checkpoint(tmp_path / "openpi", "openpi", weights)
    pi05_from_pi0(openpi)
    for ckpt, why in ((lerobot, "its config.json says 'pi05'"), (openpi, "pi0.5's time MLP / adaptive-norm")):
        line = one_line_refusal("extract", "--model", "pi0", "--checkpoint", ckpt, "--model-option",
                                f"tokenizer={tokenizer_dir}", "--store", tmp_path / "s.zarr", "--no-progress")
        assert "is a pi0.5 checkpoint" in line and why in line and "use --model pi05" in line, line
        assert "state_proj.weight; cannot build" not in line
        with pytest.raises(CheckpointError, match="use --model pi05"):
            Pi0Adapter(checkpoint=str(ckpt), tokenizer=str(tokenizer_dir))
    assert not (tmp_path / "s.zarr").exists()


def test_an_openvla_checkpoint_names_the_right_model(tmp_path):
    save_file({"vision_backbone.featurizer.patch_embed.proj.weight": torch.zeros(2, 3, 14, 14),
               "projector.fc1.weight": torch.zeros(4, 2),
               "language_model.model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"an OpenVLA checkpoint .* use --model openvla$"):
        Pi0Adapter(checkpoint=str(tmp_path))
    (tmp_path / "action_head--150000_checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"an OpenVLA-OFT checkpoint .* use --model openvla-oft$"):
        Pi0Adapter(checkpoint=str(tmp_path))
