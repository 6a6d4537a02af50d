"""OpenVLA-OFT (moojink/openvla-oft, L1-regression variant) as a model adapter: ``--model openvla-oft``.

One policy call is OFT's ``predict_action``: the OpenVLA prompt (with the "▁" token), then ``chunk * action_dim``
placeholder action positions whose input embeddings are zero and a stop token (id 2), all decoded in **one**
forward pass with **bidirectional** attention (upstream's transformers fork makes Llama's attention non-causal;
padding is masked out of the keys).  The images' patches (one 256-patch block per camera: the primary camera,
then the wrist cameras) and the projected proprioceptive state follow BOS:

    [BOS][vision: camera 1, camera 2, ...][proprio][left padding][prompt][placeholders x chunk*action_dim][stop]

The LLM's final (post-norm) hidden states at upstream's action positions, ``[P + T : P + T + chunk*action_dim]``
(P = vision + proprio tokens, T = prompt tokens after BOS: the last prompt position and all but the last
placeholder), are the L1-regression head's input; the head gives a (chunk, action_dim) chunk, unnormalised with
the fine-tuning dataset's ``dataset_statistics.json`` (q01/q99 bounds for LIBERO and Bridge, min/max for ALOHA,
where ``mask`` is true; the gripper is left as is).  The proprio state is normalised with the same statistics
(clipped to [-1, 1]) before the projector.

Experts: ``llm`` and ``embedding`` (as OpenVLA's, spans ``bos``, ``vision``, ``proprio``, ``prompt``,
``placeholders``, ``stop`` and ``action`` = the head's input positions), ``dino``/``siglip`` (the primary camera's
image), ``projector`` (every camera's patches) and ``head``: the head's input, (chunk*action_dim, hidden) per
sample: the same idea as RoboVLMs' act_head context.

Not implemented (refused in one line naming the file): the diffusion head (``noisy_action_projector--*``) and FiLM
(``vision_backbone--*``).  Image preprocessing follows upstream's LIBERO evaluation (resize to the model's size,
then ``center_crop``: the central 90% area resampled bilinearly, TF's ``crop_and_resize`` sampling) without its
JPEG and uint8 round trips and with a bicubic instead of a Lanczos resize.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from toolkit.sdk.adapters import Episode, Expert, ModelAdapter, ModelInputs, PolicyOutput, SiteInfo, Step
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import cast_model, image_tensor, llama_tokenizer, one_line
from toolkit.sdk.options import AdapterOptions, parse_options
from toolkit_plugins.openvla.adapter import PROMPT, SITES, OpenVLAAdapter, openvla_experts
from toolkit_plugins.openvla.loading import HUB_FILES, load_native, load_tokenizer, local_checkpoint, read_config
from toolkit_plugins.openvla.model import (
    TINY_CONFIG,
    TINY_NORM_STATS,
    PrismaticConfig,
    build_random,
    build_tiny_model,
    is_prismatic_config,
    native_support_problem,
    vit_specs,
)
from toolkit_plugins.openvla.oft import (
    ACTION_HEAD,
    PLATFORMS,
    PROPRIO_PROJECTOR,
    STATISTICS,
    attach_heads,
    component_file,
    head_shapes,
    load_heads,
    read_statistics,
    refuse_unsupported,
)

log = logging.getLogger("toolkit.openvla-oft")

STOP_INDEX = 2  # upstream's STOP_INDEX, Llama's "</s>"
CROP_SCALE = 0.9  # upstream's center_crop area fraction
RANDOM_WARNING = ("openvla-oft: no --checkpoint given, using a small randomly initialised OpenVLA-OFT (Prismatic at "
                  "toy sizes with an L1-regression head and a proprio projector, random weights) - results are for "
                  "smoke tests only")
# the small default's statistics: LIBERO-like action bounds (gripper unmasked) and an 8-D proprio state
TINY_OFT_STATS = {"libero_spatial_no_noops": {
    "action": TINY_NORM_STATS["bridge_orig"]["action"],
    "proprio": {"q01": [-0.5, -0.4, 0.0, 2.0, -1.0, -0.5, 0.0, -0.04],
                "q99": [0.3, 0.4, 1.2, 3.3, 1.0, 0.6, 0.04, 0.0]},
}}
HEAD_SITE = SiteInfo("head", "head", "all", "none", "the L1-regression head's input: the LLM's final hidden states "
                                                   "at the chunk's action positions")


class OpenVLAOFTOptions(AdapterOptions):
    """The ``--model-option`` names of openvla-oft."""

    unnorm_key: str | None = Field(None, description="the dataset_statistics.json dataset that (un)normalises actions "
                                                     "and proprio (needed when it has several; a LIBERO suite name "
                                                     "also finds its _no_noops key, as upstream's eval does)")
    platform: Literal["libero", "aloha", "bridge"] | None = Field(
        None, description="upstream's constants (action chunk, bounds_q99 or min/max normalisation); default: from "
                          "the unnorm key's name (aloha, bridge), else libero")
    chunk: int | None = Field(None, ge=1, description="actions per chunk (default: the platform's: libero 8, aloha 25, "
                                                      "bridge 5)")
    prompt_tokens: int = Field(64, ge=4, description="prompt length after BOS (left-padded)")
    camera: str | None = Field(None, description="primary camera (default: agentview, else the first)")
    wrist_cameras: str | None = Field(None, description="comma-separated extra cameras, or 'none' (default: the "
                                                        "step's cameras with 'wrist' in their name, as upstream)")
    center_crop: bool = Field(True, description="upstream's eval center crop (the central 90 percent of the area, "
                                                "resized back)")
    tokenizer: str | None = Field(None, description="local tokenizer: a directory or a file in it (default: the "
                                                    "checkpoint's)")


def resolve_unnorm_key(stats: dict[str, Any], key: str | None) -> str:
    """Upstream's choice: the only dataset, or the one named (``SUITE`` finds ``SUITE_no_noops``)."""
    keys = ", ".join(sorted(stats)) or "none"
    if key is None:
        if len(stats) != 1:
            raise ToolkitError(f"openvla-oft: the statistics hold several datasets ({keys}); pick one with "
                               "--model-option unnorm_key=KEY")
        return next(iter(stats))
    if key not in stats and f"{key}_no_noops" in stats:
        return f"{key}_no_noops"
    if key not in stats:
        raise ToolkitError(f"openvla-oft: unnorm_key {key!r} is not in the statistics; keys: {keys}")
    return key


def bounds(stats: dict[str, Any], what: str, normalization: str, width: int, key: str) -> tuple[np.ndarray, ...]:
    """(low, high, mask) of ``stats[what]`` for upstream's normalisation type, checked against ``width``."""
    lo, hi = ("q01", "q99") if normalization == "bounds_q99" else ("min", "max")
    s = stats.get(what)
    if not isinstance(s, dict) or lo not in s or hi not in s:
        raise ToolkitError(f"openvla-oft: the {key!r} statistics have no {what} {lo}/{hi} ({normalization} "
                           "normalisation); choose another --model-option unnorm_key or platform")
    low, high = np.asarray(s[lo], dtype=np.float64), np.asarray(s[hi], dtype=np.float64)
    mask = np.asarray(s.get("mask", np.ones(len(low), dtype=bool)), dtype=bool)
    if not (len(low) == len(high) == len(mask) == width):
        raise ToolkitError(f"openvla-oft: the {key!r} {what} statistics are {len(low)}-D but the model's {what} is "
                           f"{width}-D")
    return low, high, mask


def center_crop(x: torch.Tensor, scale: float = CROP_SCALE) -> torch.Tensor:
    """(3, H, W) -> the central ``scale`` of the area, bilinearly resampled back to (H, W) at the points
    ``tf.image.crop_and_resize`` samples (box corners mapped onto pixel centres 0 and H-1)."""
    import torch.nn.functional as F

    side = math.sqrt(scale)
    off = (1 - side) / 2
    h, w = x.shape[-2:]
    ys = torch.linspace(2 * off - 1, 2 * (off + side) - 1, h)
    xs = torch.linspace(2 * off - 1, 2 * (off + side) - 1, w)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]  # (1, H, W, (x, y))
    out = F.grid_sample(x[None], grid, mode="bilinear", align_corners=True)
    return out[0].clamp(0.0, 1.0)


def oft_experts(n_layers: int, hidden: int, dino: dict[str, Any], siglip: dict[str, Any],
                proprio: bool) -> dict[str, Expert]:
    """OpenVLA's experts over the OFT sequence, plus the head's input."""
    base = openvla_experts(n_layers, hidden, dino, siglip, "prefix")
    spans = ("bos", "vision", *(("proprio",) if proprio else ()), "prompt", "placeholders", "stop", "action")
    seq = ("[BOS][vision per camera]" + ("[proprio]" if proprio else "")
           + "[prompt][placeholder actions][stop], one bidirectional pass")
    return {
        "llm": dataclasses.replace(base["llm"], spans=spans, description=f"Llama decoder layers over {seq}"),
        "embedding": dataclasses.replace(base["embedding"], spans=spans),
        "dino": dataclasses.replace(base["dino"], record_call=0, description="DINOv2 blocks, primary camera"),
        "siglip": dataclasses.replace(base["siglip"], record_call=0, description="SigLIP blocks, primary camera"),
        "projector": dataclasses.replace(base["projector"], description="projector output: every camera's tokens"),
        "head": Expert("head", ACTION_HEAD, 1, hidden, ("action",), streams={"head_input": ("input", "")},
                       layered=False, description="the L1-regression head's input: the LLM's final (post-norm) "
                                                  "hidden states at the chunk*action_dim action positions"),
    }


class OpenVLAOFTAdapter(OpenVLAAdapter):
    """OpenVLA-OFT: parallel decoding of an action chunk, L1-regression head, proprio projector."""

    name = "openvla-oft"
    description = "OpenVLA-OFT (Prismatic + parallel decoding, L1-regression action head, proprio projector)"
    Options = OpenVLAOFTOptions

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, *, allow_missing: bool = False, random_weights: bool = False,
                 **options: Any) -> None:
        ModelAdapter.__init__(self, checkpoint, device, dtype, seed, trust_remote_code, allow_missing=allow_missing,
                              random_weights=random_weights, **options)
        opts = self.opts
        self.capture = "prefix"
        self.prompt_tokens, self.camera = opts["prompt_tokens"], opts["camera"]
        self.center_crop = opts["center_crop"]
        self.wrist: list[str] | None = None  # fixed at the first step seen
        if opts["wrist_cameras"] is not None:
            names = [c.strip() for c in opts["wrist_cameras"].split(",") if c.strip()]
            self.wrist = [] if names == ["none"] else names
        if checkpoint is None:
            warnings.warn(RANDOM_WARNING, stacklevel=2)
            self.model = build_tiny_model(seed)
            self._random_heads(7, 8)
            self.model.config.norm_stats = TINY_OFT_STATS
            self.tokenizer = llama_tokenizer()
        else:
            self._load(checkpoint, self.torch_dtype, opts["tokenizer"])
        try:
            cast_model(self.model, self.device, self.torch_dtype)
        except (RuntimeError, AssertionError) as e:
            raise ToolkitError(f"cannot put openvla-oft on device {device!r} as {dtype} ({one_line(e)})") from None
        self._setup(opts)

    # loading ------------------------------------------------------------------------------
    def _random_heads(self, action_dim: int, proprio_dim: int | None) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            attach_heads(self.model, self.model.language_model.config.hidden_size, action_dim, proprio_dim)

    def _load(self, checkpoint: str, torch_dtype: torch.dtype, tokenizer: str | None) -> None:
        ckpt = local_checkpoint(checkpoint, patterns=[*HUB_FILES, "*checkpoint.pt"])
        refuse_unsupported(ckpt)
        raw = read_config(ckpt)
        if not is_prismatic_config(raw):
            raise ToolkitError(f"openvla-oft checkpoint {checkpoint!r} is not an OpenVLA/Prismatic model (its "
                               f"config.json has model_type {raw.get('model_type')!r})")
        problem = native_support_problem(raw)
        if problem:
            raise ToolkitError(f"openvla-oft checkpoint {checkpoint!r}: {problem}, which the toolkit does not "
                               "implement (OFT runs only on the native OpenVLA layout)")
        config = PrismaticConfig(raw)
        if self.random_weights:
            head = component_file(ckpt, ACTION_HEAD)
            if head is None:
                raise ToolkitError(f"openvla-oft: {ckpt} has no action_head--*checkpoint.pt: it is not an OFT "
                                   "fine-tune (run plain OpenVLA checkpoints with --model openvla)")
            _, _, action_dim, proprio_dim = head_shapes(head, component_file(ckpt, PROPRIO_PROJECTOR))
            self.model = build_random(config, self.seed, torch_dtype)
            self._random_heads(action_dim, proprio_dim)
        else:
            self.model, base = load_native(ckpt, config, source=checkpoint, device=self.device, dtype=torch_dtype,
                                           seed=self.seed, allow_missing=self.allow_missing, strict=self.strict)
            self.load_report = load_heads(self.model, ckpt, base, allow_missing=self.allow_missing,
                                          strict=self.strict)
        stats = read_statistics(ckpt)
        if stats is None:
            key = self.opts["unnorm_key"]
            if key is None or key not in config.norm_stats:
                raise ToolkitError(f"openvla-oft: {ckpt} has no {STATISTICS}, the fine-tuning dataset's statistics "
                                   "that OFT unnormalises with; put it back, or pass --model-option unnorm_key=KEY to "
                                   f"use config.json's norm_stats ({', '.join(sorted(config.norm_stats)) or 'none'})")
            log.warning("openvla-oft: %s has no %s; using config.json's norm_stats[%r]", ckpt, STATISTICS, key)
        else:
            config.norm_stats = stats  # upstream's _load_dataset_stats replaces the config's
        self.stats_source = STATISTICS if stats is not None else "config.json norm_stats"
        self.tokenizer = load_tokenizer(ckpt, tokenizer, False)

    def _setup(self, opts: dict[str, Any]) -> None:
        stats = self.model.config.norm_stats
        key = resolve_unnorm_key(stats, opts["unnorm_key"])
        head = self.model.action_head
        super()._setup({**opts, "capture": "prefix", "action_dim": head.action_dim, "unnorm_key": key})
        self.platform = opts["platform"] or next((p for p in ("aloha", "bridge") if p in key.lower()), "libero")
        self.chunk = int(opts["chunk"] or PLATFORMS[self.platform]["chunk"])
        self.normalization = PLATFORMS[self.platform]["normalization"]
        self.action_bounds = bounds(stats[key], "action", self.normalization, head.action_dim, key)
        self.projector_in = getattr(self.model, "proprio_projector", None)
        self.proprio_bounds = None
        if self.projector_in is not None:
            width = self.projector_in.fc1.in_features
            self.proprio_bounds = bounds(stats[key], "proprio", self.normalization, width, key)
        self.n_tokens = self.chunk * head.action_dim  # placeholder action positions
        self.stats_source = getattr(self, "stats_source", "the small default's synthetic statistics")

    # what the adapter exposes ----------------------------------------------------------------
    @property
    def experts(self) -> dict[str, Expert]:
        return oft_experts(self.n_layers, self.hidden, self.dino, self.siglip, self.projector_in is not None)

    @property
    def sites(self) -> dict[str, SiteInfo]:
        return {**SITES, "head": HEAD_SITE}

    @classmethod
    def architecture(cls, checkpoint: str | None = None,
                     **options: Any) -> tuple[dict[str, Expert], dict[str, SiteInfo]] | None:
        """From the small default's config, or a local checkpoint's config.json and file names (no weight read)."""
        parse_options(cls, options, cls.name)
        if checkpoint is None:
            raw, text = TINY_CONFIG, TINY_CONFIG["text_config"]
            llm, proprio = (text["num_hidden_layers"], text["hidden_size"]), True
        elif Path(checkpoint).expanduser().exists():
            ckpt = local_checkpoint(checkpoint)
            refuse_unsupported(ckpt)
            raw = read_config(ckpt)
            if not is_prismatic_config(raw) or native_support_problem(raw) is not None:
                return None  # loading gives the one-line reason
            text = PrismaticConfig(raw).text_config
            llm = (text.num_hidden_layers, text.hidden_size)
            proprio = component_file(ckpt, PROPRIO_PROJECTOR) is not None
        else:
            return None
        towers = [{"path": f"vision_backbone.{name}.blocks", "layers": spec.depth, "width": spec.embed_dim}
                  for name, spec in zip(("featurizer", "fused_featurizer"), vit_specs(raw))]
        return oft_experts(*llm, *towers, proprio), {**SITES, "head": HEAD_SITE}

    def describe(self) -> dict[str, Any]:
        return {**ModelAdapter.describe(self), "unnorm_key": self.unnorm_key, "statistics": self.stats_source,
                "platform": self.platform, "normalization": self.normalization, "chunk": self.chunk,
                "action_dim": self.action_dim, "proprio": self.projector_in is not None,
                "prompt_tokens": self.prompt_tokens, "camera": self.camera, "wrist_cameras": self.wrist,
                "center_crop": self.center_crop, "prompt": PROMPT}

    # inputs ------------------------------------------------------------------------------------
    def _image(self, img: Any) -> torch.Tensor:
        """(H, W, 3) -> (6, H', W'): resized, center-cropped as upstream's eval, normalised for each tower."""
        x = image_tensor(img, self.image_size, "openvla-oft")
        if self.center_crop:
            x = center_crop(x)
        return torch.cat([(x - torch.tensor(t["mean"])[:, None, None]) / torch.tensor(t["std"])[:, None, None]
                          for t in (self.dino, self.siglip)], 0)

    def _cameras(self, step: Step, ep: Episode) -> list[str]:
        self._pick_camera(step, ep)  # checks the step has it; sets self.camera on the first step
        primary = self.camera
        if self.wrist is None:
            self.wrist = sorted(c for c in step.images if "wrist" in c.lower() and c != primary)
            log.info("openvla-oft: feeding cameras %s (wrist cameras: upstream's num_images_in_input = %d)",
                     [primary, *self.wrist], 1 + len(self.wrist))
        missing = [c for c in self.wrist if c not in step.images]
        if missing:
            raise ToolkitError(f"openvla-oft: a step of {ep.key} has no {missing[0]!r} camera; it has "
                               f"{', '.join(sorted(step.images))} (choose with --model-option wrist_cameras=A,B|none)")
        return [primary, *self.wrist]

    def _proprio(self, step: Step, ep: Episode) -> torch.Tensor:
        """The step's state normalised as upstream's ``normalize_proprio`` (bounds where mask, clipped)."""
        low, high, mask = self.proprio_bounds
        if step.state is None or np.asarray(step.state).size != len(low):
            got = "no state" if step.state is None else f"a {np.asarray(step.state).size}-D state"
            raise ToolkitError(f"openvla-oft: the proprio projector takes a {len(low)}-D state; a step of {ep.key} "
                               f"has {got}")
        p = np.asarray(step.state, dtype=np.float64).reshape(-1)
        p = np.clip(np.where(mask, 2 * (p - low) / (high - low + 1e-8) - 1, p), -1.0, 1.0)
        return torch.from_numpy(p).float()

    def layout(self, n_images: int) -> dict[str, list[int]]:
        """The ``llm`` spans for ``n_images`` cameras."""
        n_vis = self.n_patches * n_images
        n_prop = int(self.projector_in is not None)
        p, t, k = n_vis + n_prop, self.prompt_tokens, self.n_tokens
        spans = {"bos": [0], "vision": list(range(1, 1 + n_vis)), "prompt": list(range(1 + p, 1 + p + t)),
                 "placeholders": list(range(1 + p + t, 1 + p + t + k)), "stop": [1 + p + t + k],
                 "action": list(range(p + t, p + t + k))}  # upstream's slice: starts at the last prompt position
        if n_prop:
            spans["proprio"] = [1 + n_vis]
        return spans

    def prepare(self, batch: Sequence[tuple[Episode, Step]]) -> ModelInputs:
        b, t = len(batch), self.prompt_tokens
        text = torch.full((b, 1 + t), self.pad_id, dtype=torch.long)
        text[:, 0] = self.bos_id
        text_mask = torch.zeros(b, 1 + t, dtype=torch.bool)
        text_mask[:, 0] = True
        pixels, proprio = [], []
        for i, (ep, step) in enumerate(batch):
            pixels.append(torch.cat([self._image(step.images[c]) for c in self._cameras(step, ep)], 0))
            if self.projector_in is not None:
                proprio.append(self._proprio(step, ep))
            ids = self.prompt_ids(ep.instruction)
            if len(ids) > t:
                raise ToolkitError(f"openvla-oft: the prompt of {ep.key} is {len(ids)} tokens, more than "
                                   f"prompt_tokens={t}; raise it with --model-option prompt_tokens={len(ids)}")
            text[i, 1 + t - len(ids):] = torch.tensor(ids, dtype=torch.long)  # left padding
            text_mask[i, 1 + t - len(ids):] = True
        n_images = pixels[0].shape[0] // 6
        spans = self.layout(n_images)
        n_front = len(spans["vision"]) + len(spans.get("proprio", ()))
        ones = lambda n: torch.ones(b, n, dtype=torch.bool)  # noqa: E731
        mask = torch.cat([text_mask[:, :1], ones(n_front), text_mask[:, 1:], ones(self.n_tokens + 1)], 1)
        dev, seq = self.device, mask.shape[1]
        tensors = {"text_ids": text.to(dev), "attention_mask": mask.long().to(dev),
                   "pixel_values": torch.stack(pixels).to(dev, self.torch_dtype)}
        if proprio:
            tensors["proprio"] = torch.stack(proprio).to(dev, self.torch_dtype)
        n_vis = len(spans["vision"])
        return ModelInputs(
            tensors=tensors, batch_size=b,
            spans={"llm": spans, "embedding": spans,
                   "dino": {"prefix": list(range(self.dino_prefix)),
                            "patches": list(range(self.dino_prefix, self.dino_prefix + self.n_patches))},
                   "siglip": {"patches": list(range(self.n_patches))}, "projector": {"patches": list(range(n_vis))},
                   "head": {"action": list(range(self.n_tokens))}},
            token_mask={"llm": mask.to(dev), "embedding": mask.to(dev)},
            seq_len={"llm": seq, "embedding": seq, "dino": self.dino_prefix + self.n_patches,
                     "siglip": self.n_patches, "projector": n_vis, "head": self.n_tokens},
        )

    # running -----------------------------------------------------------------------------------
    def _embed(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input embeddings, the bidirectional (padding-only) additive mask and the position ids."""
        t, m = inputs.tensors, self.model
        images = torch.split(t["pixel_values"], 6, dim=1)
        patches = m.projector(torch.cat([m.vision_backbone(img) for img in images], 1))
        embed = self.lm.get_input_embeddings()
        emb = embed(t["text_ids"])
        b = emb.shape[0]
        front = [emb[:, :1], patches.to(emb.dtype)]
        if self.projector_in is not None:
            front.append(m.proprio_projector(t["proprio"])[:, None].to(emb.dtype))
        stop = embed(torch.full((b, 1), STOP_INDEX, dtype=torch.long, device=emb.device))
        zeros = emb.new_zeros(b, self.n_tokens, emb.shape[-1])  # placeholder embeddings are zeroed upstream
        embeds = torch.cat([*front, emb[:, 1:], zeros, stop], 1)
        mask = t["attention_mask"].bool()
        additive = torch.zeros(b, 1, mask.shape[1], mask.shape[1], dtype=embeds.dtype, device=embeds.device)
        additive.masked_fill_(~mask[:, None, None, :], torch.finfo(embeds.dtype).min)
        return embeds, additive, (mask.long().cumsum(-1) - 1).clamp_min(0)

    def unnormalise(self, actions: np.ndarray) -> np.ndarray:
        """Upstream's ``_unnormalize_actions``: 0.5 (a + 1) (high - low + 1e-8) + low where mask."""
        low, high, mask = self.action_bounds
        return np.where(mask, 0.5 * (actions + 1) * (high - low + 1e-8) + low, actions).astype(np.float32)

    def run(self, inputs: ModelInputs, generators: Sequence[torch.Generator]) -> PolicyOutput:
        if len(generators) != inputs.batch_size:
            raise ToolkitError(f"openvla-oft.run got {len(generators)} generators for a batch of {inputs.batch_size}")
        embeds, mask, pos = self._embed(inputs)
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                               use_cache=False).last_hidden_state  # after the final norm, as upstream's [-1]
        start = inputs.spans["llm"]["action"][0]
        normalised = self.model.action_head(hidden[:, start:start + self.n_tokens])  # the hooked call
        self.last_normalised = normalised.detach().float().cpu().numpy()
        return PolicyOutput(actions=self.unnormalise(self.last_normalised))

    def reference_hidden_states(self, inputs: ModelInputs, generators: Sequence[torch.Generator]
                                ) -> dict[str, torch.Tensor]:
        """Each LLM layer's output from transformers' ``output_hidden_states`` (final norm bypassed)."""
        embeds, mask, pos = self._embed(inputs)
        return self._llm_layer_outputs(embeds, mask, pos)
