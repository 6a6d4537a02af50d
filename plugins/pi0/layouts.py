"""pi0 checkpoints as users hold them: recognise the layout, rename keys onto transformers' PI0 names, and
build the matching ``PI0Config``.

Layouts (key facts from lerobot, openpi and transformers; see docs/checkpoints.md, pi0):

* current lerobot (``lerobot/pi0_base``, ``pi0_libero`` ...): ``model.paligemma_with_expert.paligemma.model.
  {vision_tower.vision_model,multi_modal_projector,language_model}.*``, ``model.paligemma_with_expert.gemma_expert.
  model.*``, ``model.{state_proj,action_in_proj,action_out_proj,action_time_mlp_in,action_time_mlp_out}.*``; saves
  before lerobot PR #2964 hold only ``paligemma.lm_head`` (the input embedding tied to it); saves since (transformers
  v5) hold ``...language_model.embed_tokens.weight`` and ``paligemma.lm_head.weight`` as separate, different tensors:
  lerobot embeds tokens with ``embed_tokens`` (its key fix copies ``lm_head`` into ``embed_tokens`` only for files
  without one) and never uses the ``lm_head`` logits for actions, so ``embed_tokens`` is loaded and ``lm_head``
  is dropped (transformers' PI0 has no ``lm_head``) and recorded as ignored;
* openpi converted to PyTorch (``examples/convert_jax_model_to_pytorch.py``): the same keys without ``model.``;
* older lerobot (before lerobot PR #1415): ``...paligemma.language_model.model.*``, ``...paligemma.language_model.
  lm_head``, ``...paligemma.vision_tower.*``, ``...paligemma.multi_modal_projector.*``, and possibly the policy's
  normalisation buffers (``normalize_inputs.buffer_observation_state.mean`` ...);
* transformers' ``save_pretrained`` (hub names: ``...paligemma.model.language_model.model.*``) or native names
  (``model.vlm.*``, ``model.dit.*``, ``embed_action_time.*``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from toolkit.sdk.checkpoint import CheckpointError, remap_keys

NATIVE = "transformers PI0 (native names)"
UNTIED = "lerobot pi0 (current, embed_tokens saved beside lm_head)"
HUB = "transformers PI0 save_pretrained"
CURRENT = "lerobot pi0 (current)"
OPENPI = "openpi pi0 converted to PyTorch"
OLDER = "lerobot pi0 (older, before lerobot PR #1415)"

PE = r"paligemma_with_expert\."
HEADS = r"(state_proj|action_in_proj|action_time_mlp_in|action_time_mlp_out)\."
# checkpoint key -> transformers PI0 name; the first matching rule wins
RULES = [
    (rf"(model\.)?{PE}paligemma\.model\.language_model\.model\.", "model.vlm.language_model."),
    (rf"(model\.)?{PE}paligemma\.model\.language_model\.", "model.vlm.language_model."),
    (rf"(model\.)?{PE}paligemma\.language_model\.model\.", "model.vlm.language_model."),
    (rf"(model\.)?{PE}paligemma\.(language_model\.)?lm_head\.", "model.vlm.language_model.embed_tokens."),
    (rf"(model\.)?{PE}paligemma\.(model\.)?vision_tower\.(vision_model\.)?", "model.vlm.vision_tower."),
    (rf"(model\.)?{PE}paligemma\.(model\.)?multi_modal_projector\.", "model.vlm.multi_modal_projector."),
    (rf"(model\.)?{PE}gemma_expert\.model\.", "model.dit."),
    (rf"(model\.)?{PE}gemma_expert\.lm_head\.", "model.dit.embed_tokens."),
    (rf"(model\.)?{HEADS}", r"embed_action_time.\2."),
    (r"model\.action_out_proj\.", "action_out_proj."),
]
# the older lerobot policies kept their normalisation statistics among the weights
STATS_BUFFERS = re.compile(r"^(normalize_inputs|normalize_targets|unnormalize_outputs)\.buffer_(\w+)\.(\w+)$")
# never used by PI0's forward (the action expert runs on embeddings), so a checkpoint may lack it
UNUSED = ("model.dit.embed_tokens.weight",)
EMBED = re.compile(r"paligemma\.(model\.)?language_model\.(model\.)?embed_tokens\.weight$")
LM_HEAD = re.compile(r"paligemma\.(language_model\.)?lm_head\.weight$")
# pi0.5 (lerobot "type": "pi05", openpi-converted, transformers PI05): a time MLP instead of pi0's action-time MLP,
# adaptive RMS norms (``...layernorm.dense.*``, ``norm.dense.*``) in the action expert, and no state projection
PI05_MARKS = re.compile(r"(^|\.)(time_mlp_(in|out)|(input_layernorm|post_attention_layernorm|norm)\.dense)\.")
VISION_HEADS = 16  # SigLIP So400m/14, the only vision tower pi0 and pi0.5 use (not recoverable from weight shapes)
KV_HEADS = 1  # both Gemma variants pi0 and pi0.5 use (gemma_2b, gemma_300m) have one KV head


def other_family(keys: list[str], meta: dict[str, Any] | None = None, directory: Path | None = None) -> str | None:
    """A one-line refusal naming the ``--model`` for a checkpoint of a family the toolkit knows that is not pi0
    (pi0.5, OpenVLA, OpenVLA-OFT), from its config.json and tensor names; None when nothing says so."""
    kind = (meta or {}).get("type") or (meta or {}).get("model_type")
    pi05 = kind == "pi05" or (not any(re.search(r"(^|\.)state_proj\.", k) for k in keys)
                              and any(PI05_MARKS.search(k) for k in keys))
    if pi05:
        why = (f"its config.json says {kind!r}" if kind == "pi05" else
               "its tensors have pi0.5's time MLP / adaptive-norm weights and no state_proj")
        return f"this is a pi0.5 checkpoint ({why}), not pi0: use --model pi05"
    if any(k.startswith("vision_backbone.") for k in keys) and any(k.startswith("language_model.") for k in keys):
        if directory is not None and any(directory.glob("action_head--*checkpoint.pt")):
            return ("this is an OpenVLA-OFT checkpoint (action_head--*.pt beside the LLM), not pi0: "
                    "use --model openvla-oft")
        return "this is an OpenVLA checkpoint (vision_backbone.*, language_model.*), not pi0: use --model openvla"
    return None


def refuse_other_family(source: str, keys: list[str], meta: dict[str, Any] | None = None,
                        directory: Path | None = None) -> None:
    """``other_family`` as a ``CheckpointError``."""
    why = other_family(keys, meta, directory)
    if why:
        raise CheckpointError(f"{source}: {why}")


def recognise(keys: list[str]) -> str:
    """The layout name of a checkpoint from its tensor names (one line error when it is not a pi0 layout)."""
    ks = set(keys)
    refuse_other_family("the weights", keys)

    def has(pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.match(k) for k in ks)

    if has(r"model\.vlm\.") or has(r"embed_action_time\."):
        return NATIVE
    if has(rf"(model\.)?{PE}paligemma\.language_model\.model\."):
        return OLDER
    if has(rf"{PE}paligemma\.model\.language_model\.model\."):
        return HUB
    if has(rf"model\.{PE}paligemma\.model\."):
        untied = any(EMBED.search(k) for k in ks) and has(rf"model\.{PE}paligemma\.lm_head\.")
        return UNTIED if untied else CURRENT
    if has(rf"{PE}paligemma\.model\."):
        return OPENPI
    first = ", ".join(sorted(ks)[:3]) or "none"
    raise CheckpointError(f"the weights are not a pi0 layout the toolkit knows (first keys: {first}); expected "
                          "lerobot, openpi-converted or transformers pi0 keys (paligemma_with_expert.* or model.vlm.*)")


def to_model_names(tensors: dict[str, Any], model_names: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights under transformers' PI0 names, normalisation buffers of the older layout by their own key).

    The VLM's input embedding is ``embed_tokens`` when the file has it (tied to ``lm_head`` or not, as lerobot
    loads it), else the tied ``lm_head`` (``dropped_lm_head`` names the head left out).  SigLIP keys gain or lose
    ``vision_model.`` to match the installed transformers' module tree.
    """
    stats = {k: v for k, v in tensors.items() if STATS_BUFFERS.match(k)}
    drop = set(dropped_lm_head(list(tensors)))
    rest = {k: v for k, v in tensors.items() if k not in stats and k not in drop}
    mapped = remap_keys(rest, RULES)
    if not any(".vision_tower.vision_model." in n for n in model_names):
        return mapped, stats
    siglip = (r"model\.vlm\.vision_tower\.(?!vision_model\.)", "model.vlm.vision_tower.vision_model.")
    return remap_keys(mapped, [siglip]), stats


def dropped_lm_head(keys: list[str]) -> list[str]:
    """The VLM ``lm_head`` key(s) a file holds beside its own ``embed_tokens``: pi0 never uses the LM head's logits
    (lerobot keeps the untied head in its module but embeds with ``embed_tokens``), so they are left out."""
    if not any(EMBED.search(k) for k in keys):
        return []
    return [k for k in keys if LM_HEAD.search(k)]


def file_names(keys: list[str], model_names: set[str]) -> dict[str, str]:
    """transformers PI0 name -> the file's key, for reporting tensors under the names users see in their file."""
    return to_model_names({k: k for k in keys}, model_names)[0]


def _layers(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _gemma(shapes: dict[str, tuple[int, ...]], prefix: str, what: str) -> dict[str, Any]:
    """A Gemma text config from weight shapes (depth, width, MLP, heads; one KV head as in pi0's and pi0.5's
    variants)."""
    try:
        q = shapes[f"{prefix}layers.0.self_attn.q_proj.weight"]
        k = shapes[f"{prefix}layers.0.self_attn.k_proj.weight"]
        gate = shapes[f"{prefix}layers.0.mlp.gate_proj.weight"]
    except KeyError as e:
        raise CheckpointError(f"the {what} has no weight {e.args[0]}; cannot build its architecture") from None
    head_dim = k[0] // KV_HEADS
    return dict(model_type="gemma", hidden_size=q[1], num_hidden_layers=_layers(shapes, f"{prefix}layers."),
                intermediate_size=gate[0], num_attention_heads=q[0] // head_dim, num_key_value_heads=KV_HEADS,
                head_dim=head_dim)


def sizes_from_weights(shapes: dict[str, tuple[int, ...]], meta: dict[str, Any], family: str,
                       heads: tuple[str, ...], experts: str = "") -> tuple[dict[str, Any], list[tuple[int, ...]]]:
    """What pi0's and pi0.5's transformers configs share (the VLM, the action expert, the chunk size and the step
    count), from weights under transformers' names (``shapes``) and the checkpoint's own config (lerobot's or
    openpi's converted ``config.json``), and the shapes of the model's own ``heads`` weights.  ``family`` and
    ``experts`` (a prefix for the experts' names) go into the messages for a missing weight."""
    vt = "model.vlm.vision_tower."
    if f"{vt}vision_model.embeddings.patch_embedding.weight" in shapes:
        vt += "vision_model."
    try:
        patch = shapes[f"{vt}embeddings.patch_embedding.weight"]
        positions = shapes[f"{vt}embeddings.position_embedding.weight"][0]
        fc1 = shapes[f"{vt}encoder.layers.0.mlp.fc1.weight"]
        proj = shapes["model.vlm.multi_modal_projector.linear.weight"]
        vocab = shapes["model.vlm.language_model.embed_tokens.weight"][0]
        own = [shapes[k] for k in heads]
    except KeyError as e:
        raise CheckpointError(f"the checkpoint has no weight {e.args[0]}; cannot build the {family} "
                              "architecture") from None
    side = math.isqrt(positions)
    text = _gemma(shapes, "model.vlm.language_model.", f"{experts}VLM")
    dit = _gemma(shapes, "model.dit.", f"{experts}action expert")
    chunk = meta.get("chunk_size") or meta.get("action_horizon") or 50
    steps = meta.get("num_inference_steps") or meta.get("num_steps") or 10
    return dict(
        vlm_config=dict(
            model_type="paligemma", text_config={**text, "vocab_size": vocab},
            vision_config=dict(model_type="siglip_vision_model", hidden_size=patch[0], intermediate_size=fc1[0],
                               num_hidden_layers=_layers(shapes, f"{vt}encoder.layers."),
                               num_attention_heads=VISION_HEADS, patch_size=patch[-1], image_size=side * patch[-1],
                               vision_use_head=False),
            projection_dim=proj[0], image_token_id=vocab),
        dit_config=dit, chunk_size=int(chunk), num_inference_steps=int(steps)), own


def config_from_weights(shapes: dict[str, tuple[int, ...]], meta: dict[str, Any]):
    """transformers ``PI0Config`` for weights under PI0 names (``shapes``) and the checkpoint's own config
    (lerobot ``"type": "pi0"`` or openpi's converted ``config.json``), which gives chunk size and step count."""
    from transformers import PI0Config

    sizes, (state_in, action_in) = sizes_from_weights(
        shapes, meta, "pi0", ("embed_action_time.state_proj.weight", "embed_action_time.action_in_proj.weight"))
    return PI0Config(**sizes, max_state_dim=state_in[1], max_action_dim=action_in[1])


def read_config(directory: Path, kind: str, family: str, others: dict[str, str]) -> dict[str, Any]:
    """The checkpoint's ``config.json`` ({} when absent) for ``--model kind``; a policy of another kind is refused
    in one line: ``others`` says what is wrong for the kinds the toolkit loads with another ``--model``."""
    f = directory / "config.json"
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: not a checkpoint config (a JSON object expected)")
    given = meta.get("type") or meta.get("model_type")
    if given in others:
        raise CheckpointError(f"{f}{others[given]}")
    if given not in (None, kind):
        raise CheckpointError(f"{f} describes a {given!r} policy; --model {kind} loads {family} checkpoints only")
    return meta


def read_meta(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` ({} when absent); a lerobot policy other than pi0 is refused."""
    return read_config(directory, "pi0", "pi0", {"pi05": f": {other_family([], {'type': 'pi05'})}"})


def action_size(meta: dict[str, Any]) -> int | None:
    """The action feature size a lerobot config declares (lerobot cuts the policy's 32-dim chunk to it)."""
    shape = ((meta.get("output_features") or {}).get("action") or {}).get("shape")
    return int(shape[0]) if shape else None
