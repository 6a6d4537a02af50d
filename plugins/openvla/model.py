"""Prismatic / OpenVLA, implemented in the project (no remote code), with the real checkpoint's module names.

The same class serves the real ``openvla/openvla-7b`` weights and the small random default, so one set of
hook paths serves both:

* ``vision_backbone.featurizer``: DINOv2 ViT-L/14 with 4 registers and LayerScale, and
  ``vision_backbone.fused_featurizer``: SigLIP So400m/14 (``toolkit_plugins.openvla.vit``, timm names,
  blocks at ``.blocks[i]``); each gives its **second-to-last block's patch tokens**, fused on channels:
  ``vision_backbone(pixel_values[B, 6, H, W]) -> (B, patches, 1024 + 1152)``;
* ``projector``: the fused GELU MLP ``fc1 -> act_fn1 -> fc2 -> act_fn2 -> fc3`` (2176 -> 8704 -> 4096 -> 4096);
* ``language_model``: the ``text_config``'s causal LM (Llama 2 for OpenVLA; decoder layers at
  ``language_model.model.layers[i]``), vocabulary padded to a multiple of 64 (``pad_to_multiple_of``, 32064).

``PrismaticConfig`` reads the checkpoint's own ``config.json`` (model_type ``openvla`` or ``prismatic``).
The real file names its towers only by timm model id; the architectures of those ids are
``vit.KNOWN_VITS``.  A config may carry ``toolkit_vit_overrides`` (one dict per tower, ``ViTSpec`` fields):
the project's only addition to the format, used by the small default model and the tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from toolkit.sdk.errors import ToolkitError
from toolkit_plugins.openvla.vit import KNOWN_VITS, VisionTransformer, ViTSpec, vit_spec

PRISMATIC_TYPES = ("openvla", "prismatic")
PRISMATIC_ARCHITECTURES = ("OpenVLAForActionPrediction", "PrismaticForConditionalGeneration")
OVERRIDES_KEY = "toolkit_vit_overrides"

# Synthetic un-normalisation statistics of the random model (7-D EEF delta + gripper, gripper unmasked), under
# a name the real openvla-7b also has, so docs/checkpoints.md's command runs on the small model too.
TINY_NORM_STATS = {
    "bridge_orig": {"action": {
        "q01": [-0.75, -0.85, -0.9, -0.1, -0.15, -0.2, 0.0],
        "q99": [0.9, 0.85, 0.95, 0.12, 0.18, 0.25, 1.0],
        "mask": [True, True, True, True, True, True, False],
    }},
}
_TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_hidden": 64}
# openvla-7b's config.json with toy sizes: the same fields, a 2-layer Llama of width 64, 32x32 ViTs at 56 px.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla",
    "vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-7b-pure",
    "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
    "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "timm_override_act_layers": [None, None], "image_sizes": [56, 56], "image_resize_strategy": "resize-naive",
    "llm_max_length": 2048, "pad_token_id": 32000, "pad_to_multiple_of": 64, "n_action_bins": 256,
    "output_projector_states": False, "norm_stats": TINY_NORM_STATS,
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32064,
                    "max_position_embeddings": 512, "pad_token_id": 32000, "bos_token_id": 1, "eos_token_id": 2},
    OVERRIDES_KEY: [_TINY_VIT, _TINY_VIT],
}


def is_prismatic_config(raw: dict) -> bool:
    """Whether a ``config.json`` is a Prismatic/OpenVLA one (by model_type or architecture; auto_map ignored)."""
    return raw.get("model_type") in PRISMATIC_TYPES or bool(set(raw.get("architectures") or ())
                                                           & set(PRISMATIC_ARCHITECTURES))


def native_support_problem(raw: dict) -> str | None:
    """Why the project's implementation cannot build this Prismatic config (None: it can)."""
    ids = raw.get("timm_model_ids")
    if not raw.get("use_fused_vision_backbone") or not isinstance(ids, list) or len(ids) != 2:
        return (f"vision backbone {raw.get('vision_backbone_id')!r} is not a fused DINOv2+SigLIP pair "
                f"(timm_model_ids {ids!r})")
    unknown = [i for i in ids if str(i).split(".")[0] not in KNOWN_VITS]
    if unknown:
        return f"vision tower {unknown[0]!r} is not one the toolkit implements ({', '.join(KNOWN_VITS)})"
    acts = [a for a in raw.get("timm_override_act_layers") or () if a is not None]
    if acts:
        return f"the vision towers' activation is overridden ({acts[0]!r}), which the toolkit does not implement"
    if not isinstance(raw.get("text_config"), dict) or "model_type" not in raw["text_config"]:
        return "config.json has no text_config with a model_type"
    return None


def vit_specs(raw: dict) -> list[ViTSpec]:
    """The two vision towers' architectures of a supported Prismatic ``config.json``."""
    overrides = raw.get(OVERRIDES_KEY) or [None, None]
    try:
        return [vit_spec(i, o) for i, o in zip(raw["timm_model_ids"], overrides)]
    except TypeError as e:
        raise ToolkitError(f"config.json {OVERRIDES_KEY} is not a list of ViTSpec fields ({e})") from None


class PrismaticConfig:
    """A Prismatic/OpenVLA ``config.json``: the fields the model needs, and the raw dict for provenance."""

    def __init__(self, raw: dict) -> None:
        from transformers import AutoConfig

        problem = native_support_problem(raw)
        if problem:
            raise ToolkitError(f"this Prismatic checkpoint is not supported natively: {problem}")
        self.raw = raw
        self.model_type = raw.get("model_type", "openvla")
        self.timm_model_ids = list(raw["timm_model_ids"])
        sizes = raw.get("image_sizes") or [224, 224]
        self.image_sizes = [int(s) for s in sizes] * (2 if len(sizes) == 1 else 1)
        self.vit_specs: list[ViTSpec] = vit_specs(raw)
        text = dict(raw["text_config"])
        try:
            self.text_config = AutoConfig.for_model(**text)
        except (ValueError, KeyError) as e:
            raise ToolkitError(f"config.json text_config cannot be built by transformers ({e})") from None
        self.n_action_bins = int(raw.get("n_action_bins", 256))
        self.pad_to_multiple_of = int(raw.get("pad_to_multiple_of", 0) or 0)
        self.pad_token_id = raw.get("pad_token_id", getattr(self.text_config, "pad_token_id", None))
        self.norm_stats = raw.get("norm_stats") or {}

    @property
    def layout(self) -> str:
        """The recognised layout, for messages and the store's load report."""
        return f"{self.model_type} ({self.raw.get('vision_backbone_id', '+'.join(self.timm_model_ids))})"


class PrismaticVisionBackbone(nn.Module):
    """DINOv2 + SigLIP, fused on channels (OpenVLA's ``dinosiglip`` backbone)."""

    def __init__(self, config: PrismaticConfig) -> None:
        super().__init__()
        (dino, siglip), (s0, s1) = config.vit_specs, config.image_sizes
        self.featurizer = VisionTransformer(dino, s0)
        self.fused_featurizer = VisionTransformer(siglip, s1)
        if self.featurizer.n_patches != self.fused_featurizer.n_patches:
            raise ToolkitError("the two vision towers give different numbers of patches; they cannot be fused")
        self.embed_dim = dino.embed_dim + siglip.embed_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(img), self.fused_featurizer(img_fused)], dim=2)


class PrismaticProjector(nn.Module):
    """OpenVLA's fused-gelu-mlp projector (first layer 4x the fused vision width)."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim, bias=True)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim, bias=True)
        self.fc3 = nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1, self.act_fn2 = nn.GELU(), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(x)))))


class PrismaticForActionPrediction(nn.Module):
    """Vision backbone -> projector -> causal LM, with OpenVLA's attribute (and checkpoint key) names."""

    def __init__(self, config: PrismaticConfig) -> None:
        from transformers import AutoModelForCausalLM

        super().__init__()
        self.config = config
        self.vision_backbone = PrismaticVisionBackbone(config)
        self.projector = PrismaticProjector(self.vision_backbone.embed_dim, config.text_config.hidden_size)
        # the build dtype, not the config's ``torch_dtype`` (``default_dtype`` picks it; meta builds ignore it)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.get_default_dtype())

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random weights for the towers and the projector (the LLM initialises itself when built)."""
        self.vision_backbone.featurizer.init_weights()
        self.vision_backbone.fused_featurizer.init_weights()
        for fc in (self.projector.fc1, self.projector.fc2, self.projector.fc3):
            nn.init.normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any):
        """OpenVLA's multimodal forward: the projected patches are inserted right after BOS."""
        patches = self.projector(self.vision_backbone(pixel_values))
        embeds = self.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([embeds[:, :1], patches.to(embeds.dtype), embeds[:, 1:]], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], patches.shape[1])
            attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build floating-point weights directly in ``dtype`` (a random 7B in bf16 never exists in float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_random(config: PrismaticConfig, seed: int, dtype: torch.dtype = torch.float32) -> PrismaticForActionPrediction:
    """The config's architecture with seeded random weights (the random-weights baseline)."""
    with torch.random.fork_rng(devices=[]), default_dtype(dtype):
        torch.manual_seed(seed)
        model = PrismaticForActionPrediction(config)
        model.init_weights()
    return model.eval()


def build_tiny_model(seed: int) -> PrismaticForActionPrediction:
    """The small random default, whose greedy decoding picks action tokens (the last ``n_action_bins`` text
    ids): the other rows of the LM head are zeroed, so the decoded actions vary like a trained model's."""
    model = build_random(PrismaticConfig(TINY_CONFIG), seed)
    cfg = model.config
    with torch.no_grad():
        head = model.language_model.get_output_embeddings().weight
        head[: cfg.text_config.vocab_size - cfg.pad_to_multiple_of - cfg.n_action_bins] = 0.0
    return model
