"""OpenVLA (Prismatic: DINOv2 + SigLIP -> MLP projector -> Llama 2) as a model adapter.

One policy call is OpenVLA's ``predict_action``: the prompt ``In: What action should the robot take to
{instruction}?\\nOut:`` (plus the "▁" token OpenVLA appends), the projected image patches inserted right
after BOS, greedy decoding of ``action_dim`` (7) tokens with the KV cache, and the 256-bin decode
``bin_centers[clip(vocab - id - 1, 0, 254)]`` un-normalised with the dataset's q01/q99
(``--model-option unnorm_key=...``).

Sequence layout of the ``llm`` and ``embedding`` experts (identical for every sample of a batch)::

    [BOS][vision patches][left padding to prompt_tokens][prompt tokens]          capture=prefix (default)
    [BOS][vision patches][left padding to prompt_tokens][prompt tokens][a1..a6]  capture=actions

Padding is masked out (attention, pooling) and position ids skip it, so padded and unpadded prompts
give the same values.  During generation each LLM layer fires once over the full sequence and once
per further generated token.  ``capture=prefix`` keeps the full-sequence forward only;
``capture=actions`` additionally runs one teacher-forced forward over the prompt and the generated
tokens after generation, and keeps that one (``Expert.record_call``): it holds every generated action
token's state.  The ``action`` span is the positions whose outputs predicted the action tokens (the
last prompt position, then a1..a6); ``capture=prefix`` has only the first of them.

Checkpoints in openvla-7b's layout load natively (``toolkit_plugins.openvla.loading``: shard by shard onto
the meta-built model, every weight checked); other Prismatic variants run their own code with
``--trust-remote-code``.  Without a checkpoint a small randomly initialised model of the same architecture
is built (``toolkit_plugins.openvla.model``), announced by one warning.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from toolkit.sdk.adapters import Episode, Expert, ModelAdapter, ModelInputs, PolicyOutput, SiteInfo, Step
from toolkit.sdk.adapters import DECODER_STREAMS
from toolkit.sdk.options import AdapterOptions, parse_options
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import cast_model, image_tensor, llama_tokenizer, one_line
from toolkit_plugins.openvla.loading import load_native, load_remote, load_tokenizer, local_checkpoint, read_config
from toolkit_plugins.openvla.model import (
    TINY_CONFIG,
    PrismaticConfig,
    build_random,
    build_tiny_model,
    is_prismatic_config,
    native_support_problem,
    vit_specs,
)
from toolkit_plugins.openvla.oft import oft_head_file
from toolkit_plugins.openvla.vit import IMAGENET_MEAN, IMAGENET_STD


class OpenVLAOptions(AdapterOptions):
    """The ``--model-option`` names of openvla."""

    unnorm_key: str | None = Field(None, description="the norm_stats dataset that un-normalises actions (needed "
                                                     "when the checkpoint has several, e.g. bridge_orig)")
    capture: Literal["prefix", "actions"] = Field("prefix", description="keep the prompt forward, or also a "
                                                                        "teacher-forced forward over the action tokens")
    prompt_tokens: int = Field(64, ge=4, description="prompt length after BOS (left-padded)")
    camera: str | None = Field(None, description="camera fed to the model (default: agentview, else the first)")
    action_dim: int | None = Field(None, ge=1, description="action tokens to generate (default: the statistics' "
                                                           "width, else 7)")
    tokenizer: str | None = Field(None, description="local tokenizer: a directory or a file in it (default: the "
                                                    "checkpoint's)")


PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
RANDOM_WARNING = ("openvla: no --checkpoint given, using a small randomly initialised OpenVLA (the same Prismatic "
                  "architecture at toy sizes, random weights) - results are for smoke tests only")
OUTPUT_STREAM = {"resid_post": ("output", "")}


def _tower(tower: torch.nn.Module, path: str) -> dict[str, Any]:
    """Block path, depth, width, patch size, prefix tokens and image normalisation of a vision tower: the
    project's ViT (``vit.VisionTransformer``) or a timm one (remote code); both keep blocks at ``.blocks``."""
    blocks = getattr(tower, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ToolkitError(f"openvla: cannot find the transformer blocks of {path} ({type(tower).__name__})")
    spec = getattr(tower, "spec", None)
    if spec is not None:
        patch, prefix, mean, std = spec.patch_size, tower.n_prefix, spec.mean, spec.std
    else:  # timm
        patch, prefix = tower.patch_embed.patch_size[0], tower.num_prefix_tokens
        pcfg = getattr(tower, "pretrained_cfg", None) or {}
        default = (IMAGENET_MEAN, IMAGENET_STD) if prefix else ((0.5,) * 3, (0.5,) * 3)  # DINOv2 / SigLIP
        mean, std = pcfg.get("mean", default[0]), pcfg.get("std", default[1])
    return {"path": f"{path}.blocks", "layers": len(blocks), "width": int(tower.embed_dim), "patch": int(patch),
            "prefix": int(prefix), "mean": tuple(mean), "std": tuple(std)}


def refuse_oft(ckpt: Path, checkpoint: str) -> None:
    """An OpenVLA-OFT fine-tune (an ``action_head--*checkpoint`` file beside the LLM) run as plain OpenVLA would
    decode tokens and ignore its head: one line naming the file and the right --model."""
    head = oft_head_file(ckpt)
    if head is not None:
        raise ToolkitError(f"openvla: {checkpoint!r} is an OpenVLA-OFT fine-tune ({head.name} beside the LLM), "
                           "which plain OpenVLA decoding would run wrongly; pass --model openvla-oft")


def _config_value(cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(cfg, name, None)
    if value is None and isinstance(getattr(cfg, "text_config", None), dict):
        value = cfg.text_config.get(name)
    elif value is None and getattr(cfg, "text_config", None) is not None:
        value = getattr(cfg.text_config, name, None)
    return default if value is None else value


SITES = {
    "llm": SiteInfo("llm", "llm", "all", "mean", "Llama layers, every real token"),
    "embedding": SiteInfo("embedding", "embedding", "all", "mean", "layer-0 input embeddings"),
    "dino": SiteInfo("dino", "dino", "patches", "mean", "DINOv2 vision blocks, patch tokens"),
    "siglip": SiteInfo("siglip", "siglip", "all", "mean", "SigLIP vision blocks"),
    "projector": SiteInfo("projector", "projector", "all", "mean", "projected vision tokens"),
}


def openvla_experts(n_layers: int, hidden: int, dino: dict[str, Any], siglip: dict[str, Any],
                    capture: str) -> dict[str, Expert]:
    """The experts of a Prismatic model: LLM depth and width, each tower's block path, depth and width."""
    keep = 0 if capture == "prefix" else -1
    return {
        "llm": Expert("llm", "language_model.model.layers", n_layers, hidden,
                      ("bos", "vision", "prompt", "action"), streams=dict(DECODER_STREAMS), record_call=keep,
                      description="Llama decoder layers over [BOS][vision][prompt]"
                                  + ("[generated action tokens]" if keep else "")),
        "embedding": Expert("embedding", "language_model.model.layers.0", 1, hidden,
                            ("bos", "vision", "prompt", "action"), streams={"resid_post": ("input", "")},
                            record_call=keep, layered=False,
                            description="the LLM's input embeddings (token embeddings with the projected "
                                        "patches inserted after BOS), i.e. layer 0's input"),
        "dino": Expert("dino", dino["path"], dino["layers"], dino["width"], ("prefix", "patches"),
                       streams=dict(OUTPUT_STREAM), description="DINOv2 blocks (CLS + 4 registers + patches)"),
        "siglip": Expert("siglip", siglip["path"], siglip["layers"], siglip["width"], ("patches",),
                         streams=dict(OUTPUT_STREAM), description="SigLIP blocks (patches)"),
        "projector": Expert("projector", "projector", 1, hidden, ("patches",), streams=dict(OUTPUT_STREAM),
                            layered=False, description="projector output: the vision tokens the LLM sees"),
    }


class OpenVLAAdapter(ModelAdapter):
    """OpenVLA-7B (the project's Prismatic implementation; other variants with ``--trust-remote-code``), or a
    small random instance of the same architecture."""

    name = "openvla"
    description = "OpenVLA (Prismatic DINOv2+SigLIP -> Llama 2, 256-bin action tokens)"
    Options = OpenVLAOptions

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, *, allow_missing: bool = False, random_weights: bool = False,
                 **options: Any) -> None:
        super().__init__(checkpoint, device, dtype, seed, trust_remote_code, allow_missing=allow_missing,
                         random_weights=random_weights, **options)
        opts = self.opts
        self.capture: str = opts["capture"]
        self.prompt_tokens: int = opts["prompt_tokens"]
        self.camera: str | None = opts["camera"]
        torch_dtype = self.torch_dtype
        if checkpoint is None:
            warnings.warn(RANDOM_WARNING, stacklevel=2)
            self.model = build_tiny_model(seed)
            self.tokenizer = llama_tokenizer()
        else:
            self._load(checkpoint, torch_dtype, opts["tokenizer"])
        try:
            cast_model(self.model, self.device, torch_dtype)
        except (RuntimeError, AssertionError) as e:
            raise ToolkitError(f"cannot put openvla on device {device!r} as {dtype} ({one_line(e)})") from None
        self.torch_dtype = torch_dtype
        self._setup(opts)

    # loading ------------------------------------------------------------------------------
    def _load(self, checkpoint: str, torch_dtype: torch.dtype, tokenizer: str | None) -> None:
        """The checkpoint's model and tokenizer: natively for the layouts the project implements (openvla-7b's),
        through the checkpoint's own code for other Prismatic variants when the user trusts it."""
        ckpt = local_checkpoint(checkpoint)
        refuse_oft(ckpt, checkpoint)
        raw = read_config(ckpt)
        if not is_prismatic_config(raw):
            raise ToolkitError(f"openvla checkpoint {checkpoint!r} is not an OpenVLA/Prismatic model (its config.json "
                               f"has model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')})")
        problem = native_support_problem(raw)
        if problem is None:
            config = PrismaticConfig(raw)
            if self.random_weights:
                self.model = build_random(config, self.seed, torch_dtype)
            else:
                self.model, self.load_report = load_native(ckpt, config, source=checkpoint, device=self.device,
                                                           dtype=torch_dtype, seed=self.seed,
                                                           allow_missing=self.allow_missing, strict=self.strict)
        elif not self.trust_remote_code:
            raise ToolkitError(f"openvla checkpoint {checkpoint!r}: {problem}, which the toolkit does not implement; "
                               "pass --trust-remote-code to run the checkpoint's own model code (only for checkpoints "
                               "you trust)")
        elif self.random_weights:
            raise ToolkitError(f"openvla: --random-weights needs a checkpoint the toolkit implements ({problem})")
        else:
            self.model, self.load_report = load_remote(ckpt, source=checkpoint, dtype=torch_dtype,
                                                       allow_missing=self.allow_missing, strict=self.strict)
        self.tokenizer = load_tokenizer(ckpt, tokenizer, self.trust_remote_code)

    def _setup(self, opts: dict[str, Any]) -> None:
        m, cfg = self.model, self.model.config
        lm = m.language_model
        self.lm = lm
        self.n_layers = lm.config.num_hidden_layers
        self.hidden = lm.config.hidden_size
        sizes = getattr(cfg, "image_sizes", None) or [224, 224]
        self.image_size = (int(sizes[0]), int(sizes[1])) if isinstance(sizes, (list, tuple)) else (int(sizes),) * 2
        self.n_bins = int(getattr(cfg, "n_action_bins", 256))
        pad_multiple = int(getattr(cfg, "pad_to_multiple_of", 0) or 0)
        self.vocab = lm.config.vocab_size - pad_multiple  # OpenVLA: 32064 - 64 = 32000
        bins = np.linspace(-1, 1, self.n_bins)
        self.bin_centers = (bins[:-1] + bins[1:]) / 2.0
        self.norm_stats = dict(getattr(cfg, "norm_stats", None) or {})
        key = opts["unnorm_key"]
        if key is None and len(self.norm_stats) > 1:
            raise ToolkitError(f"openvla: this checkpoint has un-normalisation statistics for several datasets; "
                               f"pick one with --model-option unnorm_key=KEY ({', '.join(sorted(self.norm_stats))})")
        if key is not None and key not in self.norm_stats:
            raise ToolkitError(f"openvla: unnorm_key {key!r} is not in the checkpoint's norm_stats; keys: "
                               f"{', '.join(sorted(self.norm_stats)) or 'none'}")
        self.unnorm_key = key if key is not None else next(iter(self.norm_stats), None)
        stats = (self.norm_stats.get(self.unnorm_key) or {}).get("action") if self.unnorm_key else None
        self.action_stats = {k: np.asarray(v) for k, v in stats.items()} if stats else None
        self.action_dim = int(opts["action_dim"] or (len(self.action_stats["q01"]) if self.action_stats else 7))
        vb = m.vision_backbone
        self.dino = _tower(vb.featurizer, "vision_backbone.featurizer")
        self.siglip = _tower(vb.fused_featurizer, "vision_backbone.fused_featurizer")
        patch = self.dino["patch"]
        self.n_patches = (self.image_size[0] // patch) * (self.image_size[1] // patch)
        self.dino_prefix = self.dino["prefix"]
        tok = self.tokenizer
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else 1
        self.pad_id = int(_config_value(cfg, "pad_token_id", 0) or 0)
        space = tok.convert_tokens_to_ids("▁")
        self.space_id = space if isinstance(space, int) and space != tok.unk_token_id else None
        # the KV-cache keyword: ``cache`` where transformers has renamed ``past_key_values`` (which then warns
        # until its removal in 5.40), ``past_key_values`` in the releases before
        self.cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    # what the adapter exposes ----------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.model

    @property
    def experts(self) -> dict[str, Expert]:
        return openvla_experts(self.n_layers, self.hidden, self.dino, self.siglip, self.capture)

    @property
    def sites(self) -> dict[str, SiteInfo]:
        return dict(SITES)

    @classmethod
    def architecture(cls, checkpoint: str | None = None,
                     **options: Any) -> tuple[dict[str, Expert], dict[str, SiteInfo]] | None:
        """From the small default's config, or a local checkpoint's config.json (no weight is read); None for a
        hub id (only loading resolves it, perhaps downloading) and for variants run with their own code.  The
        small default's sizes are read from its config dict, without importing transformers."""
        opts = parse_options(cls, options, cls.name)
        if checkpoint is None:
            raw, text = TINY_CONFIG, TINY_CONFIG["text_config"]  # every size given explicitly
            llm = (text["num_hidden_layers"], text["hidden_size"])
        elif Path(checkpoint).expanduser().exists():
            refuse_oft(local_checkpoint(checkpoint), checkpoint)
            raw = read_config(local_checkpoint(checkpoint))
            if not is_prismatic_config(raw) or native_support_problem(raw) is not None:
                return None  # loading gives the one-line reason, or runs the checkpoint's own code
            text = PrismaticConfig(raw).text_config  # transformers fills the sizes the file leaves out
            llm = (text.num_hidden_layers, text.hidden_size)
        else:
            return None
        towers = [{"path": f"vision_backbone.{name}.blocks", "layers": spec.depth, "width": spec.embed_dim}
                  for name, spec in zip(("featurizer", "fused_featurizer"), vit_specs(raw))]
        return openvla_experts(*llm, *towers, opts["capture"]), dict(SITES)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "capture": self.capture,
                "unnorm_key": self.unnorm_key, "action_dim": self.action_dim, "prompt_tokens": self.prompt_tokens,
                "camera": self.camera, "prompt": PROMPT}

    # inputs ------------------------------------------------------------------------------------
    def _pixels(self, img: Any) -> torch.Tensor:
        """(H, W, 3) uint8 -> (6, H', W'): DINO-normalised and SigLIP-normalised copies (resize-naive)."""
        x = image_tensor(img, self.image_size, "openvla")
        norm = lambda t: (x - torch.tensor(t["mean"])[:, None, None]) / torch.tensor(t["std"])[:, None, None]  # noqa: E731
        return torch.cat([norm(self.dino), norm(self.siglip)], 0)

    def prompt_ids(self, instruction: str) -> list[int]:
        """The prompt's token ids after BOS (with the "▁" token OpenVLA's predict_action appends)."""
        prompt = PROMPT.format(instruction=instruction.strip().lower())
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.space_id is not None and (not ids or ids[-1] != self.space_id):
            ids = [*ids, self.space_id]
        return ids

    def _pick_camera(self, step: Step, ep: Episode) -> np.ndarray:
        if self.camera is None:
            if not step.images:
                raise ToolkitError(f"openvla needs a camera image per step; a step of {ep.key} has none")
            self.camera = "agentview" if "agentview" in step.images else sorted(step.images)[0]
        if self.camera not in step.images:
            raise ToolkitError(f"openvla: a step of {ep.key} has no {self.camera!r} camera; it has "
                               f"{', '.join(sorted(step.images)) or 'none'} (choose with --model-option camera=NAME)")
        return step.images[self.camera]

    def prepare(self, batch: Sequence[tuple[Episode, Step]]) -> ModelInputs:
        n_vis, n_prompt = self.n_patches, self.prompt_tokens
        text = torch.full((len(batch), 1 + n_prompt), self.pad_id, dtype=torch.long)
        text[:, 0] = self.bos_id
        text_mask = torch.zeros(len(batch), 1 + n_prompt, dtype=torch.bool)
        text_mask[:, 0] = True
        pixels = torch.zeros(len(batch), 6, *self.image_size)
        for i, (ep, step) in enumerate(batch):
            pixels[i] = self._pixels(self._pick_camera(step, ep))
            ids = self.prompt_ids(ep.instruction)
            if len(ids) > n_prompt:
                raise ToolkitError(f"openvla: the prompt of {ep.key} is {len(ids)} tokens, more than "
                                   f"prompt_tokens={n_prompt}; raise it with --model-option prompt_tokens={len(ids)}")
            text[i, 1 + n_prompt - len(ids):] = torch.tensor(ids, dtype=torch.long)  # left padding
            text_mask[i, 1 + n_prompt - len(ids):] = True
        mask = torch.cat([text_mask[:, :1], torch.ones(len(batch), n_vis, dtype=torch.bool), text_mask[:, 1:]], 1)
        seq0 = 1 + n_vis + n_prompt
        extra = self.action_dim - 1 if self.capture == "actions" else 0
        seq = seq0 + extra
        full_mask = torch.cat([mask, torch.ones(len(batch), extra, dtype=torch.bool)], 1)
        dev = self.device
        llm_spans = {"bos": [0], "vision": list(range(1, 1 + n_vis)), "prompt": list(range(1 + n_vis, seq0)),
                     "action": list(range(seq0 - 1, seq0 + extra))}
        tensors = {"text_ids": text.to(dev), "attention_mask": mask.long().to(dev),
                   "pixel_values": pixels.to(dev, self.torch_dtype)}
        return ModelInputs(
            tensors=tensors, batch_size=len(batch),
            spans={"llm": llm_spans, "embedding": llm_spans,
                   "dino": {"prefix": list(range(self.dino_prefix)),
                            "patches": list(range(self.dino_prefix, self.dino_prefix + n_vis))},
                   "siglip": {"patches": list(range(n_vis))}, "projector": {"patches": list(range(n_vis))}},
            token_mask={"llm": full_mask.to(dev), "embedding": full_mask.to(dev)},
            seq_len={"llm": seq, "embedding": seq, "dino": self.dino_prefix + n_vis, "siglip": n_vis,
                     "projector": n_vis},
        )

    # running -----------------------------------------------------------------------------------
    def _embed_prefix(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        t = inputs.tensors
        patches = self.model.projector(self.model.vision_backbone(t["pixel_values"]))
        emb = self.lm.get_input_embeddings()(t["text_ids"])
        return torch.cat([emb[:, :1], patches.to(emb.dtype), emb[:, 1:]], 1), t["attention_mask"]

    def _generate(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Greedy decoding of action_dim tokens with the KV cache (OpenVLA's generate)."""
        from transformers import DynamicCache

        cache = {self.cache_kw: DynamicCache(config=self.lm.config)}  # filled in place by every call
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                      **cache)  # only the last position's logits (32064 per position otherwise)
        tokens = [out.logits[:, -1].argmax(-1)]
        embed = self.lm.get_input_embeddings()
        for _ in range(self.action_dim - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            pos = pos[:, -1:] + 1
            out = self.lm(inputs_embeds=embed(tokens[-1])[:, None], attention_mask=mask, position_ids=pos,
                          use_cache=True, **cache)
            tokens.append(out.logits[:, -1].argmax(-1))
        return torch.stack(tokens, 1)

    def _replay_inputs(self, embeds: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor):
        """The prompt followed by the generated tokens a1..a(n-1), for the teacher-forced forward."""
        gen = self.lm.get_input_embeddings()(tokens[:, :-1])
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], gen.shape[1])], 1)
        return torch.cat([embeds, gen], 1), mask, (mask.cumsum(-1) - 1).clamp_min(0)

    def decode_actions(self, tokens: np.ndarray) -> np.ndarray:
        """Action token ids (B, action_dim) -> actions: 256-bin centres, then q01/q99 un-normalisation."""
        disc = np.clip(self.vocab - tokens - 1, 0, self.bin_centers.shape[0] - 1)
        actions = self.bin_centers[disc]
        if self.action_stats is None:
            self.warn_once("openvla: the checkpoint has no norm_stats; actions stay normalised in [-1, 1]")
            return actions.astype(np.float32)
        q01, q99 = self.action_stats["q01"], self.action_stats["q99"]
        mask = self.action_stats.get("mask", np.ones_like(q01, dtype=bool)).astype(bool)
        n = min(actions.shape[-1], len(q01))
        out = actions.copy()
        un = 0.5 * (actions[..., :n] + 1) * (q99[:n] - q01[:n]) + q01[:n]
        out[..., :n] = np.where(mask[:n], un, actions[..., :n])
        return out.astype(np.float32)

    def run(self, inputs: ModelInputs, generators: Sequence[torch.Generator]) -> PolicyOutput:
        if len(generators) != inputs.batch_size:
            raise ToolkitError(f"openvla.run got {len(generators)} generators for a batch of {inputs.batch_size}")
        embeds, mask = self._embed_prefix(inputs)
        tokens = self._generate(embeds, mask)
        if self.capture == "actions" and self.action_dim > 1:
            e, m, p = self._replay_inputs(embeds, mask, tokens)
            self.lm.model(inputs_embeds=e, attention_mask=m, position_ids=p, use_cache=False)
        self.last_tokens = tokens.cpu().numpy()
        return PolicyOutput(actions=self.decode_actions(self.last_tokens)[:, None, :])

    def reference_hidden_states(self, inputs: ModelInputs, generators: Sequence[torch.Generator]
                                ) -> dict[str, torch.Tensor]:
        """Each LLM layer's output from transformers' own ``output_hidden_states`` (B, L, seq, hidden).

        The final norm is bypassed (``hidden_states[-1]`` is post-norm in transformers 5.x).
        """
        embeds, mask = self._embed_prefix(inputs)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        if self.capture == "actions" and self.action_dim > 1:
            embeds, mask, pos = self._replay_inputs(embeds, mask, self._generate(embeds, mask))
        return self._llm_layer_outputs(embeds, mask, pos)

    def _llm_layer_outputs(self, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
                           ) -> dict[str, torch.Tensor]:
        """``{"llm": (B, L, seq, hidden)}``: every LLM layer's output by transformers' ``output_hidden_states``,
        the final norm bypassed (``hidden_states[-1]`` is post-norm in transformers 5.x)."""
        base = self.lm.model
        norm, base.norm = base.norm, torch.nn.Identity()
        try:
            out = base(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False,
                       output_hidden_states=True)
        finally:
            base.norm = norm
        return {"llm": torch.stack(out.hidden_states[1:], 1)}

