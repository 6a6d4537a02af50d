"""The project's own small Prismatic/OpenVLA-structured model, for tests and the offline default.

Same structure and attribute names as OpenVLA's remote code (``modeling_prismatic.py``), so one set of
hook paths serves both:

* ``vision_backbone.featurizer``: DINOv2 with 4 registers (transformers ``Dinov2WithRegistersModel``,
  blocks at ``.encoder.layer[i]``; OpenVLA: timm ViT-L/14-reg4, blocks at ``.blocks[i]``);
* ``vision_backbone.fused_featurizer``: SigLIP (``SiglipVisionModel``, blocks at ``.encoder.layers[i]``;
  OpenVLA: timm SO400M/14, ``.blocks[i]``);
  both give the **second-to-last block's patch tokens** (prefix tokens dropped, no final norm), fused on
  channels: ``vision_backbone(pixel_values[B, 6, H, W]) -> (B, patches, dino + siglip)``;
* ``projector``: the fused GELU MLP ``fc1 -> act_fn1 -> fc2 -> act_fn2 -> fc3``;
* ``language_model``: ``LlamaForCausalLM`` (decoder layers ``language_model.model.layers[i]``), text
  vocabulary padded to a multiple of 64 (``pad_to_multiple_of``) like OpenVLA's 32000 -> 32064.

``PrismaticStandInForActionPrediction.save_pretrained(DIR)`` writes a ``config.json`` with model_type
``toolkit_prismatic``; the class and config are registered with transformers' Auto classes, so the
directory loads again without remote code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

MODEL_TYPE = "toolkit_prismatic"

# The small default: real structure, toy sizes.  Text vocabulary: the mistral-common Llama tokenizer's 32000.
TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   patch_size=14, image_size=56)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32064, max_position_embeddings=512, pad_token_id=32000,
                 bos_token_id=1, eos_token_id=2)
# Synthetic un-normalisation statistics of the random model (7-D EEF delta + gripper, gripper unmasked).
TINY_NORM_STATS = {
    "toolkit_tiny": {"action": {
        "q01": [-0.75, -0.85, -0.9, -0.1, -0.15, -0.2, 0.0],
        "q99": [0.9, 0.85, 0.95, 0.12, 0.18, 0.25, 1.0],
        "mask": [True, True, True, True, True, True, False],
    }},
}
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class PrismaticStandInConfig(PretrainedConfig):
    """Configuration of the stand-in; sub-model configs are kept as plain dicts (JSON round trip)."""

    model_type = MODEL_TYPE

    def __init__(self, dino_config: dict | None = None, siglip_config: dict | None = None,
                 text_config: dict | None = None, image_sizes: tuple[int, int] | list[int] | None = None,
                 n_action_bins: int = 256, pad_to_multiple_of: int = 64, norm_stats: dict | None = None,
                 **kwargs: Any) -> None:
        self.dino_config = {**TINY_VISION, "num_register_tokens": 4, **(dino_config or {})}
        self.siglip_config = {**TINY_VISION, "vision_use_head": False, **(siglip_config or {})}
        self.text_config = {**TINY_TEXT, **(text_config or {})}
        size = self.dino_config["image_size"]
        self.image_sizes = list(image_sizes or (size, size))
        self.n_action_bins = n_action_bins
        self.pad_to_multiple_of = pad_to_multiple_of
        self.norm_stats = TINY_NORM_STATS if norm_stats is None else norm_stats
        kwargs.setdefault("pad_token_id", self.text_config.get("pad_token_id"))
        super().__init__(**kwargs)


class PrismaticVisionBackbone(nn.Module):
    """DINOv2-with-registers + SigLIP, fused on channels (OpenVLA's ``dinosiglip`` backbone)."""

    def __init__(self, config: PrismaticStandInConfig) -> None:
        super().__init__()
        self.featurizer = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config.dino_config))
        self.fused_featurizer = SiglipVisionModel(SiglipVisionConfig(**config.siglip_config))
        self.n_prefix = 1 + config.dino_config["num_register_tokens"]  # CLS + registers
        self.embed_dim = config.dino_config["hidden_size"] + config.siglip_config["hidden_size"]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        dino = self.featurizer(pixel_values=img, output_hidden_states=True).hidden_states[-2][:, self.n_prefix:]
        siglip = self.fused_featurizer(pixel_values=img_fused, output_hidden_states=True).hidden_states[-2]
        return torch.cat([dino, siglip], dim=2)


class PrismaticProjector(nn.Module):
    """OpenVLA's fused-gelu-mlp projector."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim, bias=True)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim, bias=True)
        self.fc3 = nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1, self.act_fn2 = nn.GELU(), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(x)))))


class PrismaticStandInForActionPrediction(PreTrainedModel):
    """Vision backbone -> projector -> Llama, with OpenVLA's attribute names."""

    config_class = PrismaticStandInConfig
    base_model_prefix = "prismatic"
    main_input_name = "pixel_values"
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: PrismaticStandInConfig) -> None:
        super().__init__(config)
        self.vision_backbone = PrismaticVisionBackbone(config)
        self.language_model = LlamaForCausalLM(LlamaConfig(**config.text_config))
        self.projector = PrismaticProjector(self.vision_backbone.embed_dim, config.text_config["hidden_size"])
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # sub-models initialise themselves
        if isinstance(module, PrismaticProjector):
            for fc in (module.fc1, module.fc2, module.fc3):
                nn.init.normal_(fc.weight, std=0.02)
                nn.init.zeros_(fc.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any):
        """OpenVLA's multimodal forward: the projected patches are inserted right after BOS."""
        patches = self.projector(self.vision_backbone(pixel_values))
        embeds = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([embeds[:, :1], patches.to(embeds.dtype), embeds[:, 1:]], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], patches.shape[1])
            attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` know model_type ``toolkit_prismatic`` (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, PrismaticStandInConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModel.register(PrismaticStandInConfig, PrismaticStandInForActionPrediction)
    except ValueError:
        pass


def build_tiny_model(seed: int, **config: Any) -> PrismaticStandInForActionPrediction:
    """A random stand-in whose greedy decoding picks action tokens (the last ``n_action_bins`` text ids):
    the other rows of the LM head are zeroed, so the decoded actions vary like a trained model's."""
    torch.manual_seed(seed)
    model = PrismaticStandInForActionPrediction(PrismaticStandInConfig(**config)).eval()
    cfg = model.config
    with torch.no_grad():
        head = model.language_model.get_output_embeddings().weight
        head[: cfg.text_config["vocab_size"] - cfg.pad_to_multiple_of - cfg.n_action_bins] = 0.0
    return model
