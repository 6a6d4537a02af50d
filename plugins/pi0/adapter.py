"""pi0 on transformers' native ``PI0ForConditionalGeneration``.

Two experts share one attention cache: the VLM (PaliGemma's Gemma, ``model.vlm.language_model``) runs the
prefix ``[image tokens per camera][BOS instruction \\n, padded to 48]`` once per policy call; the action
expert (``model.dit``) runs the suffix ``[state][50 noisy actions]`` once per flow-matching step
(t = 1.0, 0.9, ..., 0.1).  Without a checkpoint a small randomly initialised pi0 of the same architecture
is built (smoke tests only).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.adapters import Episode, Expert, ModelAdapter, ModelInputs, PolicyOutput, SiteInfo, Step
from toolkit.capture import DECODER_STREAMS
from toolkit.errors import ToolkitError
from toolkit.hf import cast_model, from_cache_or_hub, image_tensor, llama_tokenizer, one_line

log = logging.getLogger("toolkit.pi0")

PALIGEMMA_TOKENIZER = "google/paligemma-3b-pt-224"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
OPTIONS = {"action_dim": 7, "max_text_tokens": 48, "cameras": None, "num_steps": None}

# The small random pi0: the real architecture at toy sizes.  The VLM and the action expert must share
# the number of layers, KV heads and head_dim (the action expert reuses the VLM's cache per layer).
TINY_VOCAB = 32000  # the mistral-common Llama-style SentencePiece model; the image token is appended
TINY_CONFIG = dict(
    vlm_config=dict(
        model_type="paligemma",
        text_config=dict(model_type="gemma", hidden_size=128, num_hidden_layers=6, intermediate_size=256,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=16, vocab_size=TINY_VOCAB + 1),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56,
                           vision_use_head=False),
        projection_dim=128,
        image_token_id=TINY_VOCAB,
    ),
    dit_config=dict(model_type="gemma", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
                    num_attention_heads=8, num_key_value_heads=1, head_dim=16),
    chunk_size=50, max_state_dim=32, max_action_dim=32, num_inference_steps=10,
)
RANDOM_WARNING = ("pi0: no --checkpoint given, using a small randomly initialised pi0 (same architecture, "
                  "random weights) - results are for smoke tests only")








def build_tiny_model(seed: int):
    from transformers import PI0Config, PI0ForConditionalGeneration

    torch.manual_seed(seed)
    return PI0ForConditionalGeneration(PI0Config(**TINY_CONFIG)).eval()





def _normalisation_stats(checkpoint: Path) -> dict[str, np.ndarray]:
    """state/actions mean and std from a checkpoint dir's processor config, if any."""
    keys = ("state_mean", "state_std", "actions_mean", "actions_std")
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = checkpoint / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ToolkitError(f"cannot read {f}: {one_line(e)}") from None
        for d in [cfg, *(v for v in cfg.values() if isinstance(v, dict))]:
            if all(d.get(k) is not None for k in keys):
                return {k: np.asarray(d[k], dtype=np.float32) for k in keys}
    return {}





class Pi0Adapter(ModelAdapter):
    """pi0 (PaliGemma VLM + flow-matching action expert) on transformers' PI0ForConditionalGeneration."""

    name = "pi0"
    description = "pi0 (PaliGemma VLM + flow-matching action expert), transformers-native"
    option_defaults = OPTIONS

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, **options: Any) -> None:
        super().__init__(checkpoint, device, dtype, seed, trust_remote_code, **options)
        opts = self.opts
        torch_dtype = self.torch_dtype
        self.stats: dict[str, np.ndarray] = {}
        if checkpoint is None:
            warnings.warn(RANDOM_WARNING, stacklevel=2)
            self.model = build_tiny_model(seed)
            self.tokenizer = llama_tokenizer()
        else:
            self.model = self._load(checkpoint, torch_dtype)
            self.tokenizer = self._load_tokenizer(checkpoint)
            local = Path(checkpoint).expanduser()
            self.stats = _normalisation_stats(local) if local.is_dir() else {}
        try:
            cast_model(self.model, self.device, torch_dtype)
        except (RuntimeError, AssertionError) as e:
            raise ToolkitError(f"cannot put pi0 on device {device!r} as {dtype} ({one_line(e)})") from None
        self.torch_dtype = torch_dtype

        cfg = self.model.config
        vision = cfg.vlm_config.vision_config
        self.image_size = vision.image_size
        self.tokens_per_image = (vision.image_size // vision.patch_size) ** 2
        self.image_token_id = cfg.vlm_config.image_token_id
        self.chunk_size = cfg.chunk_size
        self.max_state_dim, self.max_action_dim = cfg.max_state_dim, cfg.max_action_dim
        self.num_steps = int(opts["num_steps"] or cfg.num_inference_steps)
        self.action_dim = min(int(opts["action_dim"] or self.max_action_dim), self.max_action_dim)
        self.max_text_tokens = int(opts["max_text_tokens"])
        cams = opts["cameras"]
        self.cameras: list[str] | None = (cams.split(",") if isinstance(cams, str) else list(cams)) if cams else None

    # loading ------------------------------------------------------------------------------
    @staticmethod
    def _load(checkpoint: str, torch_dtype: torch.dtype):
        from transformers import PI0ForConditionalGeneration

        local = Path(checkpoint).expanduser()
        if not local.exists() and (checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1):
            raise ToolkitError(f"pi0 checkpoint {checkpoint!r} does not exist: give a checkpoint directory "
                               "or a Hugging Face hub id (owner/name)")
        try:
            model = from_cache_or_hub(PI0ForConditionalGeneration.from_pretrained,
                                       str(local) if local.exists() else checkpoint, dtype=torch_dtype)
        except Exception as e:  # noqa: BLE001 - any load failure is reported as one line
            raise ToolkitError(f"cannot load pi0 checkpoint {checkpoint!r} ({one_line(e)}); it must be a "
                               "transformers PI0 or lerobot/openpi pi0 checkpoint") from None
        return model.eval()

    @staticmethod
    def _load_tokenizer(checkpoint: str):
        from transformers import AutoTokenizer

        local = Path(checkpoint).expanduser()
        sources = [str(local)] if any((local / f).is_file() for f in TOKENIZER_FILES) else []
        if not local.exists():
            sources.append(checkpoint)
        sources.append(PALIGEMMA_TOKENIZER)
        for src in sources:
            try:
                return from_cache_or_hub(AutoTokenizer.from_pretrained, src)
            except Exception as e:  # noqa: BLE001
                log.debug("pi0: tokenizer from %s failed: %s", src, one_line(e))
        raise ToolkitError(f"pi0 checkpoint {checkpoint!r} has no tokenizer and {PALIGEMMA_TOKENIZER} cannot be "
                           "loaded: save the PaliGemma tokenizer into the checkpoint directory "
                           "(tokenizer.save_pretrained(CHECKPOINT_DIR)) or make it available in the HF cache")

    # what the adapter exposes ----------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.model

    @property
    def experts(self) -> dict[str, Expert]:
        cfg = self.model.config
        cams = tuple(f"image.{c}" for c in self.cameras or ())
        return {
            "vlm": Expert("vlm", "model.vlm.language_model.layers", cfg.vlm_config.text_config.num_hidden_layers,
                          cfg.vlm_config.text_config.hidden_size, ("image", *cams, "text"),
                          streams=dict(DECODER_STREAMS),
                          description="PaliGemma language model over the prefix (images, instruction)"),
            "action": Expert("action", "model.dit.layers", cfg.dit_config.num_hidden_layers,
                             cfg.dit_config.hidden_size, ("state", "actions"), denoise_steps=self.num_steps,
                             streams=dict(DECODER_STREAMS),
                             description="action expert over the suffix (state, noisy actions), once per denoising step"),
        }

    @property
    def sites(self) -> dict[str, SiteInfo]:
        return {
            "vlm": SiteInfo("vlm", "vlm", "all", "mean", "VLM expert, every prefix token"),
            "text_only": SiteInfo("text_only", "vlm", "text", "mean", "VLM expert, instruction tokens only"),
            "action": SiteInfo("action", "action", "all", "mean", "action expert, state and action tokens"),
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cameras": self.cameras,
                "num_steps": self.num_steps, "action_dim": self.action_dim, "normalised": bool(self.stats)}

    # inputs ------------------------------------------------------------------------------------
    def _image(self, img: Any) -> torch.Tensor:
        """(H, W, 3) uint8 (or float in [0, 1]) -> (3, S, S) float32 in [-1, 1]."""
        x = image_tensor(img, (self.image_size, self.image_size), "pi0")
        return (x - 0.5) / 0.5

    def _text(self, instruction: str) -> list[int]:
        tok = self.tokenizer
        ids = tok(instruction.strip().replace("\n", " ") + "\n", add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        if len(ids) > self.max_text_tokens:
            self.warn_once(f"pi0: instruction {instruction[:40]!r}... is {len(ids)} tokens, truncated to "
                            f"{self.max_text_tokens}")
            ids = ids[: self.max_text_tokens]
        return ids

    def _state(self, state: np.ndarray | None) -> torch.Tensor:
        out = torch.zeros(self.max_state_dim)
        if state is None:
            return out
        s = np.asarray(state, dtype=np.float32).reshape(-1)
        if self.stats:
            n = min(len(s), len(self.stats["state_mean"]))
            s = s.copy()
            s[:n] = (s[:n] - self.stats["state_mean"][:n]) / (self.stats["state_std"][:n] + 1e-8)
        s = s[: self.max_state_dim]
        out[: len(s)] = torch.from_numpy(s)
        return out

    def prepare(self, batch: Sequence[tuple[Episode, Step]]) -> ModelInputs:
        if self.cameras is None:  # fixed by the first batch, so every batch has the same layout
            self.cameras = sorted(batch[0][1].images)
            if not self.cameras:
                raise ToolkitError("pi0 needs at least one camera image per step; the first step has none")
        n_cam, per = len(self.cameras), self.tokens_per_image
        n_img = n_cam * per
        seq = n_img + self.max_text_tokens
        pad_id = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
        ids[:, :n_img] = self.image_token_id
        mask = torch.zeros(len(batch), seq, dtype=torch.bool)
        pixels = torch.zeros(len(batch), n_cam, 3, self.image_size, self.image_size)
        states = torch.zeros(len(batch), self.max_state_dim)
        for i, (ep, step) in enumerate(batch):
            for c, cam in enumerate(self.cameras):
                if cam in step.images:
                    pixels[i, c] = self._image(step.images[cam])
                    mask[i, c * per:(c + 1) * per] = True
                else:  # like openpi: a missing camera is a zero image whose tokens are masked out
                    self.warn_once(f"pi0: a step of {ep.key} has no {cam!r} camera; its tokens are masked")
            extra = set(step.images) - set(self.cameras)
            if extra:
                self.warn_once(f"pi0: cameras {sorted(extra)} are ignored (the model uses {self.cameras})")
            text = self._text(ep.instruction)
            ids[i, n_img:n_img + len(text)] = torch.tensor(text, dtype=torch.long)
            mask[i, n_img:n_img + len(text)] = True
            states[i] = self._state(step.state)
        dev, dt = self.device, self.torch_dtype
        tensors = {
            "input_ids": ids.to(dev),
            "attention_mask": mask.long().to(dev),
            "pixel_values": pixels.to(dev, dt),
            # every camera slot holds its own camera, so image features map 1:1 onto the image tokens;
            # missing cameras are masked out through attention_mask instead
            "pixel_attention_mask": torch.ones(len(batch), n_cam, dtype=torch.bool, device=dev),
            "state": states.to(dev, dt),
        }
        spans = {
            "vlm": {"image": list(range(n_img)),
                    **{f"image.{cam}": list(range(c * per, (c + 1) * per)) for c, cam in enumerate(self.cameras)},
                    "text": list(range(n_img, seq))},
            "action": {"state": [0], "actions": list(range(1, self.chunk_size + 1))},
        }
        return ModelInputs(
            tensors=tensors, batch_size=len(batch), spans=spans,
            token_mask={"vlm": mask.to(dev), "action": torch.ones(len(batch), self.chunk_size + 1, dtype=torch.bool,
                                                                   device=dev)},
            seq_len={"vlm": seq, "action": self.chunk_size + 1},
        )

    # running -----------------------------------------------------------------------------------
    def denoise_t(self) -> list[float]:
        return [round(1.0 - k / self.num_steps, 6) for k in range(self.num_steps)]

    def run(self, inputs: ModelInputs, generators: Sequence[torch.Generator]) -> PolicyOutput:
        if len(generators) != inputs.batch_size:
            raise ToolkitError(f"pi0.run got {len(generators)} generators for a batch of {inputs.batch_size}")
        noise = torch.stack([torch.randn(self.chunk_size, self.max_action_dim, generator=g) for g in generators])
        t = inputs.tensors
        actions = self.model.sample_actions(
            state=t["state"], input_ids=t["input_ids"], pixel_values=t["pixel_values"],
            noise=noise.to(self.device, self.torch_dtype), attention_mask=t["attention_mask"],
            pixel_attention_mask=t["pixel_attention_mask"], num_steps=self.num_steps,
        )
        out = actions.float().cpu().numpy()[..., : self.action_dim]
        if self.stats:
            n = min(self.action_dim, len(self.stats["actions_mean"]))
            out = out.copy()
            out[..., :n] = out[..., :n] * (self.stats["actions_std"][:n] + 1e-8) + self.stats["actions_mean"][:n]
        return PolicyOutput(actions=out, denoise_t=self.denoise_t())

    def reference_hidden_states(self, inputs: ModelInputs, generators: Sequence[torch.Generator]
                                ) -> dict[str, torch.Tensor]:
        """Each VLM layer's output from transformers' own ``output_hidden_states`` (B, L, seq, hidden).

        ``hidden_states[-1]`` is post-final-norm in transformers 5.x, so the final norm is bypassed for this
        call: then ``hidden_states[i + 1]`` is layer i's output for every layer, the last one included.
        """
        t = inputs.tensors
        vlm = self.model.model.vlm
        lm = vlm.language_model
        with torch.no_grad():
            embeds = self.model.model.embed_prefix(t["input_ids"], t["pixel_values"], t["pixel_attention_mask"])
            norm, lm.norm = lm.norm, torch.nn.Identity()
            try:
                out = vlm(inputs_embeds=embeds, attention_mask=t["attention_mask"],
                          position_ids=t["attention_mask"].cumsum(-1) - 1,
                          token_type_ids=torch.zeros_like(embeds)[:, :, 0], output_hidden_states=True)
            finally:
                lm.norm = norm
        return {"vlm": torch.stack(out.hidden_states[1:], 1)}
