"""pi0.5 checkpoints as users hold them: recognise the layout, rename keys onto transformers' PI05 names, build
the matching ``PI05Config``, and refuse a pi0 (or other) checkpoint in one line naming the right ``--model``.

Layouts (key facts from lerobot ``policies/pi05``, openpi ``examples/convert_jax_model_to_pytorch.py`` and
transformers ``models/pi05``; see docs/checkpoints.md):

* lerobot (``lerobot/pi05_base``, ``pi05_libero``; config ``"type": "pi05"``): ``paligemma_with_expert.paligemma.
  model.{vision_tower.vision_model,multi_modal_projector,language_model}.*``, ``paligemma_with_expert.gemma_expert.
  model.*`` whose norms are adaptive (``...layernorm.dense.{weight,bias}``, ``norm.dense.*``), ``time_mlp_in``,
  ``time_mlp_out``, ``action_in_proj``, ``action_out_proj``; no ``state_proj``.  Fine-tunes saved by lerobot put
  ``model.`` in front of every key.  ``paligemma.lm_head`` is saved; the policy embeds with ``embed_tokens`` when
  the file has it (current lerobot), else with the tied ``lm_head`` (older saves);
* openpi converted to PyTorch: the same keys without ``model.``, and no ``type`` in its config.json;
* transformers' ``save_pretrained`` (the same names, ``...language_model.model.*``, and a config.json with
  ``"model_type": "pi05"``), or native names (``model.vlm.*``, ``model.dit.*``, ``embed_action_time.*``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from toolkit.sdk.checkpoint import CheckpointError, remap_keys
from toolkit_plugins.pi0 import layouts as pi0_layouts

NATIVE = "transformers PI05 (native names)"
HUB = "transformers PI05 save_pretrained"
LEROBOT = "lerobot pi05"
LEROBOT_FINETUNE = "lerobot pi05 fine-tune (model. prefix)"
OPENPI = "openpi pi05 converted to PyTorch"

PE = r"(model\.)?paligemma_with_expert\."
# checkpoint key -> transformers PI05 name; the first matching rule wins
RULES = [
    (rf"{PE}paligemma\.model\.language_model\.model\.", "model.vlm.language_model."),
    (rf"{PE}paligemma\.model\.language_model\.", "model.vlm.language_model."),
    (rf"{PE}paligemma\.(model\.)?vision_tower\.(vision_model\.)?", "model.vlm.vision_tower."),
    (rf"{PE}paligemma\.(model\.)?multi_modal_projector\.", "model.vlm.multi_modal_projector."),
    (rf"{PE}gemma_expert\.model\.", "model.dit."),
    (r"(model\.)?(action_in_proj|time_mlp_in|time_mlp_out)\.", r"embed_action_time.\2."),
    (r"model\.action_out_proj\.", "action_out_proj."),
]
EMBED = re.compile(r"^(model\.)?paligemma_with_expert\.paligemma\.model\.language_model\.(model\.)?"
                   r"embed_tokens\.weight$")
LM_HEAD = re.compile(r"^(model\.)?paligemma_with_expert\.paligemma\.(language_model\.)?lm_head\.weight$")
# saved by lerobot and openpi, never read by pi0.5's forward (the action expert runs on embeddings)
EXPERT_HEAD = re.compile(r"^(model\.)?paligemma_with_expert\.gemma_expert\.lm_head\.weight$")
# what only a pi0 checkpoint has: the state token's projection and the action-time MLP; pi0.5 has neither
PI0_ONLY = re.compile(r"^(model\.)?(embed_action_time\.)?(state_proj|action_time_mlp_in|action_time_mlp_out)\.")
ADARMS = re.compile(r"(gemma_expert\.model|model\.dit)\.layers\.\d+\.input_layernorm\.dense\.weight$")
USE_PI0 = "use --model pi0 for it"


def recognise(keys: list[str], meta: dict[str, Any]) -> str:
    """The layout name of a checkpoint from its tensor names; a pi0 checkpoint (or no known layout) is one line."""
    if any(PI0_ONLY.match(k) for k in keys) and not any(ADARMS.search(k) for k in keys):
        key = next(k for k in keys if PI0_ONLY.match(k))
        raise CheckpointError(f"the checkpoint is a pi0, not a pi0.5 (it has {key} and no adaptive norms): {USE_PI0}")

    def has(pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.match(k) for k in keys)

    if has(r"model\.vlm\.") or has(r"embed_action_time\.") or has(r"model\.dit\."):
        return NATIVE
    if has(r"paligemma_with_expert\.paligemma\.model\.language_model\.model\."):
        return HUB
    if has(r"model\.paligemma_with_expert\."):
        return LEROBOT_FINETUNE
    if has(r"paligemma_with_expert\."):
        return LEROBOT if meta.get("type") == "pi05" else OPENPI
    first = ", ".join(sorted(keys)[:3]) or "none"
    raise CheckpointError(f"the weights are not a pi0.5 layout the toolkit knows (first keys: {first}); expected "
                          "lerobot, openpi-converted or transformers pi0.5 keys (paligemma_with_expert.* or "
                          "model.vlm.*)")


def is_pi05(keys: list[str], meta: dict[str, Any]) -> bool:
    """Whether a checkpoint is a pi0.5 (its config says so, or its action expert has adaptive norms): for other
    loaders, to name ``--model pi05`` when it is handed to them."""
    kind = meta.get("type") or meta.get("model_type")
    return kind == "pi05" or (kind in (None, "pi0") and any(ADARMS.search(k) for k in keys))


def to_model_names(tensors: dict[str, Any], model_names: set[str]
                   ) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """(weights under transformers' PI05 names, the file keys dropped on purpose as upstream drops them, and each
    PI05 name's key in the file).

    The VLM's input embedding: the file's ``embed_tokens`` when it has one (current lerobot saves it apart from
    ``lm_head``, and embeds with it), else the ``lm_head`` it was tied to; ``lm_head`` itself is not used by the
    policy, nor is the action expert's ``lm_head``.  SigLIP keys gain or lose ``vision_model.`` to match the
    installed transformers' module tree.
    """
    rest = dict(tensors)
    dropped = [k for k in rest if EXPERT_HEAD.match(k)]
    heads = [k for k in rest if LM_HEAD.match(k)]
    if heads:
        if any(EMBED.match(k) for k in rest):
            dropped += heads
        else:  # an older, tied save: the head is the embedding
            rest["paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"] = rest[heads[0]]
            dropped += heads
    for k in dropped:
        rest.pop(k, None)
    names = remap_keys({k: k for k in rest}, RULES)  # PI05 name -> file key
    if any(".vision_tower.vision_model." in n for n in model_names):
        names = remap_keys(names, [(r"model\.vlm\.vision_tower\.(?!vision_model\.)",
                                    "model.vlm.vision_tower.vision_model.")])
    return {n: rest[k] for n, k in names.items()}, dropped, names


def config_from_weights(shapes: dict[str, tuple[int, ...]], meta: dict[str, Any]):
    """transformers ``PI05Config`` for weights under PI05 names (``shapes``) and the checkpoint's own config
    (lerobot ``"type": "pi05"`` or openpi's), which gives the chunk size and the number of denoising steps."""
    from transformers import PI05Config

    heads = ("embed_action_time.action_in_proj.weight", "model.dit.layers.0.input_layernorm.dense.weight")
    sizes, (action_in, _) = pi0_layouts.sizes_from_weights(shapes, meta, "pi0.5", heads, experts="pi0.5 ")
    return PI05Config(**sizes, max_action_dim=action_in[1])


def read_meta(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` ({} when absent); a pi0 or another policy is refused in one line."""
    return pi0_layouts.read_config(directory, "pi05", "pi0.5",
                                   {"pi0": f" describes a pi0 policy, not a pi0.5: {USE_PI0}"})
