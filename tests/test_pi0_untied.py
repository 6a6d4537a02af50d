"""pi0 saved by current lerobot (after lerobot PR #2964, transformers v5): the VLM's ``embed_tokens.weight`` and
``paligemma.lm_head.weight`` are separate, different tensors.  lerobot embeds tokens with ``embed_tokens`` and never
uses the LM head's logits for actions, so the toolkit loads ``embed_tokens``, leaves ``lm_head`` out (recorded as
ignored), and its captured residuals equal a plain transformers PaliGemma forward that embeds with the file's
``embed_tokens``.  Older, tied saves (``lm_head`` only) keep loading (tests/test_pi0_checkpoints.py)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from synthetic import camera_episodes
from test_pi0_checkpoints import SMALL, file_key, load, native_weights, write_checkpoint
from toolkit.capture.plan import build_plan
from toolkit.sdk.adapters import SiteInfo
from toolkit.testing import run_captured

pytestmark = pytest.mark.usefixtures("pi0_single_thread")

PE = "model.paligemma_with_expert.paligemma."
EMBED_KEY = PE + "model.language_model.embed_tokens.weight"  # lerobot's key names (pi_gemma.py, modeling_pi0.py)
HEAD_KEY = PE + "lm_head.weight"
EMBED = "model.vlm.language_model.embed_tokens.weight"


@pytest.fixture(scope="module")
def weights():
    return native_weights()


def untied_tensors(weights, embed=None, head=None):
    """Every tensor at its current-lerobot key, with ``embed_tokens`` and a different ``lm_head`` both saved."""
    tensors = {file_key(n, "current"): t.clone() for n, t in weights.items()}
    assert tensors[HEAD_KEY].shape == weights[EMBED].shape  # file_key puts the tied embedding at lm_head
    g = torch.Generator().manual_seed(11)
    tensors[EMBED_KEY] = weights[EMBED].clone() if embed is None else embed
    tensors[HEAD_KEY] = (weights[EMBED] + torch.randn(weights[EMBED].shape, generator=g)) if head is None else head
    return tensors


def write_untied(d, weights, **kw):
    write_checkpoint(d, "current", weights)  # config.json and the lerobot processor files
    tensors = untied_tensors(weights, **kw)
    save_file(tensors, str(d / "model.safetensors"))
    return d, tensors


def vlm_residuals(adapter, batch):
    """(actions, captured VLM residuals (B, layers, seq, hidden)) of one policy call."""
    inputs = adapter.prepare(batch)
    plan = build_plan(adapter.name, adapter.experts, {"all_vlm": SiteInfo("all_vlm", "vlm", "all", "none")},
                      streams="resid_post", pool="none", dtype="float32")
    out, arrays = run_captured(adapter, inputs, plan)
    return inputs, out.actions, torch.from_numpy(arrays["all_vlm/resid_post"])


def plain_paligemma(tensors):
    """transformers' PaliGemmaModel built from the tiny config, filled from the file by hand (the embedding from the
    file's embed_tokens), its final norm removed so that hidden_states[i + 1] is layer i's output."""
    from transformers import PaliGemmaConfig, PaliGemmaModel

    pg = PaliGemmaModel(PaliGemmaConfig(**{k: v for k, v in SMALL["vlm_config"].items() if k != "model_type"}))
    own = pg.state_dict()
    sd = {}
    for key, t in tensors.items():
        if key.startswith(PE + "model.language_model."):
            sd["language_model." + key.removeprefix(PE + "model.language_model.")] = t
        elif key.startswith(PE + "model.multi_modal_projector."):
            sd["multi_modal_projector." + key.removeprefix(PE + "model.multi_modal_projector.")] = t
        elif key.startswith(PE + "model.vision_tower.vision_model."):
            rest = key.removeprefix(PE + "model.vision_tower.vision_model.")
            name = "vision_tower.vision_model." + rest
            sd[name if name in own else "vision_tower." + rest] = t
    missing, unexpected = pg.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"language_model.norm.weight"} - set(sd), (missing, unexpected)
    pg.language_model.norm = torch.nn.Identity()
    return pg.eval()


def plain_forward(pg, inputs):
    """Image features in the image-token slots, the file's embed_tokens on the others, then PaliGemma's own
    forward over the prefix (token types 0: bidirectional over the real tokens)."""
    t = inputs.tensors
    ids, mask = t["input_ids"], t["attention_mask"]
    image = ids == pg.config.image_token_id
    with torch.no_grad():
        feats = pg.get_image_features(t["pixel_values"].flatten(0, 1)).pooler_output
        table = pg.language_model.embed_tokens.weight  # the file's embed_tokens, scaled by sqrt(width) as Gemma does
        embeds = torch.nn.functional.embedding(ids.masked_fill(image, 0), table) * table.shape[1] ** 0.5
        embeds[image] = feats.reshape(-1, feats.shape[-1])  # cameras in prompt order, batch-major
        out = pg(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                 token_type_ids=torch.zeros_like(ids), output_hidden_states=True)
    return torch.stack(out.hidden_states[1:], 1)


@pytest.fixture(scope="module")
def batch():
    return [(ep, step) for ep in camera_episodes(["pick up the bowl", "open the drawer"]) for step in ep.steps()][:2]


@pytest.fixture(scope="module")
def untied(weights, tokenizer_dir, tmp_path_factory, batch):
    ckpt, tensors = write_untied(tmp_path_factory.mktemp("untied") / "ck", weights)
    a = load(ckpt, tokenizer_dir)
    return a, tensors, vlm_residuals(a, batch)


def test_untied_embed_tokens_and_lm_head_load_and_embed_tokens_is_used(untied):
    a, tensors, _ = untied
    assert not torch.equal(tensors[EMBED_KEY], tensors[HEAD_KEY])
    assert torch.equal(a.model.state_dict()[EMBED], tensors[EMBED_KEY])
    rep = a.load_report
    assert rep.layout == "lerobot pi0 (current, embed_tokens saved beside lm_head)" == a.layout
    assert rep.missing == [] and rep.unexpected == [] and rep.ignored == [HEAD_KEY]
    assert len(rep.loaded) == len(tensors) - 1  # every tensor but the unused lm_head
    attrs = a.describe()["load_report"]
    assert attrs["n_ignored"] == 1 and attrs["ignored"] == [HEAD_KEY]


def test_captured_vlm_residuals_equal_a_plain_transformers_forward_with_embed_tokens(untied):
    a, tensors, (inputs, _, captured) = untied
    ref = plain_forward(plain_paligemma(tensors), inputs)
    assert captured.shape == ref.shape == (2, 2, captured.shape[2], 64)
    mask = inputs.token_mask["vlm"].cpu()
    # padding positions carry no meaning (the policy masks them); every real token must match
    torch.testing.assert_close(captured[mask[:, None].expand(-1, 2, -1)], ref[mask[:, None].expand(-1, 2, -1)],
                               atol=2e-5, rtol=2e-5)
    # the same forward embedding with the lm_head instead differs: the check can tell the two apart
    wrong = dict(tensors)
    wrong[EMBED_KEY] = tensors[HEAD_KEY]
    other = plain_forward(plain_paligemma(wrong), inputs)
    assert not torch.allclose(captured[:, :, -5:], other[:, :, -5:], atol=1e-3)


def test_embed_tokens_changes_the_output_and_lm_head_does_not(weights, tokenizer_dir, tmp_path, untied, batch):
    _, tensors, (_, actions, captured) = untied
    g = torch.Generator().manual_seed(5)
    changed_embed = tensors[EMBED_KEY] + torch.randn(tensors[EMBED_KEY].shape, generator=g)
    changed_head = tensors[HEAD_KEY] + torch.randn(tensors[HEAD_KEY].shape, generator=g)
    ckpt_e, _ = write_untied(tmp_path / "e", weights, embed=changed_embed, head=tensors[HEAD_KEY])
    ckpt_h, _ = write_untied(tmp_path / "h", weights, embed=tensors[EMBED_KEY], head=changed_head)
    _, actions_e, captured_e = vlm_residuals(load(ckpt_e, tokenizer_dir), batch)
    _, actions_h, captured_h = vlm_residuals(load(ckpt_h, tokenizer_dir), batch)
    assert not np.allclose(actions_e, actions, atol=1e-4) and not torch.allclose(captured_e, captured, atol=1e-4)
    np.testing.assert_array_equal(actions_h, actions)
    assert torch.equal(captured_h, captured)


def test_a_tied_save_of_both_tensors_loads_as_before(weights, tokenizer_dir, tmp_path):
    ckpt, tensors = write_untied(tmp_path / "tied", weights, head=weights[EMBED].clone())
    a = load(ckpt, tokenizer_dir)
    assert torch.equal(a.model.state_dict()[EMBED], weights[EMBED])
    assert a.load_report.missing == [] and a.load_report.unexpected == [] and a.load_report.ignored == [HEAD_KEY]
