"""pi0.5 on transformers' native ``PI05ForConditionalGeneration``.

The VLM (PaliGemma's Gemma, ``model.vlm.language_model``) runs the prefix ``[image tokens per camera][BOS Task:
..., State: <256-bin state>;\\nAction: ]`` once per policy call; the action expert (``model.dit``) runs the 50
noisy actions once per flow-matching step (t = 1.0, 0.9, ..., 0.1), its norms modulated by the time embedding
(adaptive RMS norms: a scale, a shift and a gate per norm, exposed as streams of their own).  There is no state
token: the state is read as text.  Without a checkpoint a small randomly initialised pi0.5 of the same
architecture is built (smoke tests only).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from toolkit.sdk.adapters import DECODER_STREAMS, Episode, Expert, ModelAdapter, ModelInputs, PolicyOutput, SiteInfo
from toolkit.sdk.adapters import Step
from toolkit.sdk.checkpoint import CheckpointError, load_into, load_state_dict_files, safetensors_shapes, weight_files
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import cast_model, from_cache_or_hub, image_tensor, llama_tokenizer, one_line
from toolkit.sdk.options import AdapterOptions, parse_options
from toolkit_plugins.pi0 import relative
from toolkit_plugins.pi0.adapter import CONVERT_HELP, PALIGEMMA_TOKENIZER, TOKENIZER_FILES, TOKENIZER_HELP
from toolkit_plugins.pi05 import layouts, normalise, prompt
from toolkit_plugins.pi05.modulation import tap

log = logging.getLogger("toolkit.pi05")


class Pi05Options(AdapterOptions):
    """The ``--model-option`` names of pi05."""

    action_dim: int | None = Field(None, ge=1, description="action dimensions kept from the policy's 32 (default: "
                                  "the lerobot checkpoint's action feature size, else 7 as in LIBERO)")
    max_text_tokens: int | None = Field(None, ge=1, description="the prompt's token budget, as the tokenizer's max "
                                        "length upstream (default: the checkpoint's tokenizer_max_length, else 200)")
    cameras: str | list[str] | None = Field(None, description="camera order, comma-separated (default: sorted)")
    num_steps: int | None = Field(None, ge=1, description="flow-matching steps (default: the checkpoint's)")
    tokenizer: str | None = Field(None, description="local PaliGemma tokenizer: a directory or a tokenizer.model")
    stats: str | None = Field(None, description="statistics: a norm_stats.json or a lerobot processor directory")
    normalise: bool = Field(True, description="normalise the state (quantiles by default) before discretising it, "
                            "and unnormalise actions, with the checkpoint's statistics")


# The small random pi0.5: the real architecture at toy sizes (the VLM and the action expert share the number of
# layers, KV heads and head_dim: the action expert reuses the VLM's cache per layer).
TINY_VOCAB = 32000  # the mistral-common Llama-style SentencePiece model; the image token is appended
TINY_TEXT_TOKENS = 64  # the prompt budget of the small model (200 for the real one)
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
    chunk_size=50, max_action_dim=32, num_inference_steps=10,
)
RANDOM_WARNING = ("pi05: no --checkpoint given, using a small randomly initialised pi0.5 (same architecture, "
                  "random weights) - results are for smoke tests only")
DEFAULT_TEXT_TOKENS = 200  # lerobot PI05Config.tokenizer_max_length, openpi's max_token_len for pi0.5


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """transformers zero-initialises the adaptive norms' dense layers (the modulation would be constant 0): the
    small random model gets small random ones, so that scale, shift and gate depend on the time, as trained."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if ".dense." in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05 + (0.5 if name.endswith("bias") else 0.0))


def build_tiny_model(seed: int):
    from transformers import PI05Config, PI05ForConditionalGeneration

    torch.manual_seed(seed)
    model = PI05ForConditionalGeneration(PI05Config(**TINY_CONFIG)).eval()
    _init_weights(model, seed)
    return model


SITES = {
    "vlm": SiteInfo("vlm", "vlm", "all", "mean", "VLM expert, every prefix token"),
    "text_only": SiteInfo("text_only", "vlm", "text", "mean", "VLM expert, prompt tokens only (task and state)"),
    "state_only": SiteInfo("state_only", "vlm", "state", "mean", "VLM expert, the discretised state's tokens"),
    "action": SiteInfo("action", "action", "all", "mean", "action expert, the noisy action tokens"),
}
# the adaptive norms' modulation, per layer (and denoising step): what each norm's dense layer makes of the time
MODULATION_STREAMS = {
    f"{where}_{part}": ("output", f"{norm}.{part}")
    for where, norm in (("pre_attn", "input_layernorm"), ("pre_mlp", "post_attention_layernorm"))
    for part in ("scale", "shift", "gate")
}


def pi05_experts(vlm: tuple[int, int], dit: tuple[int, int], cameras: Sequence[str] | None,
                 num_steps: int) -> dict[str, Expert]:
    """The two experts, from the (layers, width) of the VLM and of the action expert."""
    cams = tuple(f"image.{c}" for c in cameras or ())
    return {
        "vlm": Expert("vlm", "model.vlm.language_model.layers", *vlm, ("image", *cams, "text", "task", "state"),
                      streams=dict(DECODER_STREAMS),
                      description="PaliGemma language model over the prefix (images, task, discretised state)"),
        "action": Expert("action", "model.dit.layers", *dit, ("actions",), denoise_steps=num_steps,
                         streams={**DECODER_STREAMS, **MODULATION_STREAMS},
                         description="action expert over the noisy actions, once per denoising step; attn_out "
                                     "and mlp_out are before their gate (resid_mid = resid_pre + pre_attn_gate * "
                                     "attn_out)"),
    }


def _cameras(opts: dict[str, Any]) -> list[str] | None:
    cams = opts["cameras"]
    return (cams.split(",") if isinstance(cams, str) else list(cams)) if cams else None


class _PassNorm(torch.nn.Module):
    """Stands in for the action expert's final (adaptive) norm in ``reference_hidden_states``."""

    def forward(self, hidden_states, timestep_embeds=None):
        return hidden_states, None


class Pi05Adapter(ModelAdapter):
    """pi0.5 (PaliGemma VLM + flow-matching action expert with adaptive norms) on transformers' PI05."""

    name = "pi05"
    description = "pi0.5 (PaliGemma VLM, state as text, adaptive-norm flow-matching action expert), transformers"
    Options = Pi05Options

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, **options: Any) -> None:
        super().__init__(checkpoint, device, dtype, seed, trust_remote_code, **options)
        opts = self.opts
        self.normalise_enabled = opts["normalise"]
        self.norm: normalise.Normalisation | None = None
        self.layout: str | None = None
        self.meta: dict[str, Any] = {}
        self.relative: relative.RelativeActions | None = None
        if checkpoint is None:
            warnings.warn(RANDOM_WARNING, stacklevel=2)
            self.model = build_tiny_model(seed)
            self.tokenizer = self._load_tokenizer(None) if opts["tokenizer"] else llama_tokenizer()
            text_tokens = TINY_TEXT_TOKENS
        else:
            directory, files = self._resolve(checkpoint)
            self.meta = layouts.read_meta(directory)
            self.model = self._load(checkpoint, files, self.meta)
            self.tokenizer = self._load_tokenizer(directory)
            if self.normalise_enabled:
                self.norm = normalise.find(directory, self.meta, opts["stats"])
                if self.norm is None:
                    self.warn_once(f"pi05: {checkpoint} has no normalisation statistics (no lerobot processor files, "
                                   "no openpi assets/*/norm_stats.json): the state is discretised raw and the actions "
                                   "are stored in the policy's normalised units; give them with --model-option "
                                   "stats=PATH")
            found = relative.find(directory, self.meta)
            if found is not None and not self.normalise_enabled:
                self.warn_once(f"pi05: {checkpoint} predicts relative actions ({found.source}); with --no-normalise "
                               "they are stored as the policy outputs them, normalised and relative to the state")
            elif found is not None:  # relative actions become absolute in the dataset's units only
                self.relative = found
            text_tokens = self.meta.get("tokenizer_max_length") or self.meta.get("max_token_len") or DEFAULT_TEXT_TOKENS
        tap(self.model)
        try:
            cast_model(self.model, self.device, self.torch_dtype)
        except (RuntimeError, AssertionError) as e:
            raise ToolkitError(f"cannot put pi05 on device {device!r} as {dtype} ({one_line(e)})") from None

        cfg = self.model.config
        vision = cfg.vlm_config.vision_config
        self.image_size = vision.image_size
        self.tokens_per_image = (vision.image_size // vision.patch_size) ** 2
        self.image_token_id = cfg.vlm_config.image_token_id
        self.chunk_size, self.max_action_dim = cfg.chunk_size, cfg.max_action_dim
        self.num_steps = int(opts["num_steps"] or cfg.num_inference_steps)
        self.action_dim = min(int(opts["action_dim"] or layouts.action_size(self.meta) or 7), self.max_action_dim)
        self.max_text_tokens = int(opts["max_text_tokens"] or text_tokens)
        self.cameras: list[str] | None = _cameras(opts)
        self.state_dim: int | None = None  # fixed by the first batch, like the cameras

    # loading ------------------------------------------------------------------------------
    @staticmethod
    def _resolve(checkpoint: str) -> tuple[Path, list[Path]]:
        """(checkpoint directory, safetensors files): a local directory or file, or a hub id (cache first)."""
        local = Path(checkpoint).expanduser()
        if not local.exists():
            if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1:
                raise ToolkitError(f"pi05 checkpoint {checkpoint!r} does not exist: give a checkpoint directory "
                                   "or a Hugging Face hub id (owner/name)")
            from huggingface_hub import snapshot_download

            try:
                local = Path(from_cache_or_hub(snapshot_download, checkpoint))
            except Exception as e:  # noqa: BLE001 - any download failure is reported as one line
                raise ToolkitError(f"cannot load pi05 checkpoint {checkpoint!r} ({one_line(e)}); download it into a "
                                   "directory and pass that directory") from None
        directory = local if local.is_dir() else local.parent
        if ((directory / "params").is_dir() or local.name == "params") and not list(directory.glob("*.safetensors")):
            raise CheckpointError(f"{checkpoint} is a native openpi JAX checkpoint (orbax params/), which the "
                                  f"toolkit does not read: {CONVERT_HELP.replace('pi0_libero', 'pi05_libero')}")
        try:
            return directory, weight_files(local)
        except CheckpointError as e:
            raise CheckpointError(f"cannot load pi05 checkpoint {checkpoint!r}: {e}") from None

    def _load(self, checkpoint: str, files: list[Path], meta: dict[str, Any]):
        """Build the checkpoint's architecture and fill every weight from the file (or fail naming what is missing)."""
        from transformers import PI05ForConditionalGeneration
        from transformers.initialization import no_init_weights

        shapes = safetensors_shapes(files)
        try:
            self.layout = layouts.recognise(list(shapes), meta)
        except CheckpointError as e:
            raise CheckpointError(f"{checkpoint}: {e}") from None
        config = self._config(checkpoint, meta, shapes)
        init = self.random_weights or self.allow_missing
        torch.manual_seed(self.seed)
        with contextlib.nullcontext() if init else no_init_weights():
            model = PI05ForConditionalGeneration._from_config(config, dtype=self.torch_dtype)
        if self.random_weights:
            return model.eval()
        names = set(model.state_dict().keys())
        weights, dropped, file_names = layouts.to_model_names(load_state_dict_files(files), names)
        self.load_report = load_into(model, weights, source=checkpoint, layout=self.layout, ignored=dropped,
                                     file_names=file_names, allow_missing=self.allow_missing, strict=self.strict)
        return model.eval()

    @staticmethod
    def _config(checkpoint: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]):
        """The checkpoint's ``PI05Config``: its own config.json when transformers wrote it, else sized from the
        weights' shapes (the safetensors header: no weight is read)."""
        from transformers import PI05Config

        try:
            if meta.get("model_type") == "pi05":  # transformers' own config.json
                return PI05Config.from_dict(meta)
            return layouts.config_from_weights(layouts.to_model_names(shapes, set())[0], meta)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{checkpoint}: cannot build the pi0.5 architecture ({one_line(e)})") from None

    @classmethod
    def architecture(cls, checkpoint: str | None = None,
                     **options: Any) -> tuple[dict[str, Expert], dict[str, SiteInfo]] | None:
        """From the small default's config dict, or a local checkpoint's config.json and safetensors header (no
        weight is read); None for a hub id, which only loading resolves."""
        opts = parse_options(cls, options, cls.name)
        if checkpoint is None:
            text, dit = TINY_CONFIG["vlm_config"]["text_config"], TINY_CONFIG["dit_config"]
            sizes = [(c["num_hidden_layers"], c["hidden_size"]) for c in (text, dit)]
            steps = TINY_CONFIG["num_inference_steps"]
        elif Path(checkpoint).expanduser().exists():
            directory, files = cls._resolve(checkpoint)
            meta = layouts.read_meta(directory)
            shapes = safetensors_shapes(files)
            try:
                layouts.recognise(list(shapes), meta)
            except CheckpointError as e:
                raise CheckpointError(f"{checkpoint}: {e}") from None
            config = cls._config(checkpoint, meta, shapes)
            sizes = [(c.num_hidden_layers, c.hidden_size) for c in (config.vlm_config.text_config, config.dit_config)]
            steps = config.num_inference_steps
        else:
            return None
        return pi05_experts(*sizes, _cameras(opts), int(opts["num_steps"] or steps)), dict(SITES)

    def _load_tokenizer(self, directory: Path | None):
        """The ``tokenizer`` option, else the checkpoint's own tokenizer files, else PaliGemma's from the HF cache."""
        from transformers import AutoTokenizer

        given = self.opts["tokenizer"]
        if given:
            p = Path(given).expanduser()
            if not p.exists():
                raise ToolkitError(f"pi05 tokenizer={given} does not exist; {TOKENIZER_HELP}")
            try:
                if p.is_file():  # a bare SentencePiece model, as openpi downloads paligemma_tokenizer.model
                    from transformers import GemmaTokenizer

                    with tempfile.TemporaryDirectory() as d:
                        shutil.copy(p, Path(d) / "tokenizer.model")
                        return GemmaTokenizer.from_pretrained(d)
                return AutoTokenizer.from_pretrained(str(p), trust_remote_code=self.trust_remote_code)
            except Exception as e:  # noqa: BLE001
                raise ToolkitError(f"pi05 tokenizer={given} cannot be loaded ({one_line(e)}); "
                                   f"{TOKENIZER_HELP}") from None
        sources = [str(directory)] if directory and any((directory / f).is_file() for f in TOKENIZER_FILES) else []
        sources.append(PALIGEMMA_TOKENIZER)
        for src in sources:
            try:
                return from_cache_or_hub(AutoTokenizer.from_pretrained, src, trust_remote_code=self.trust_remote_code)
            except Exception as e:  # noqa: BLE001
                log.debug("pi05: tokenizer from %s failed: %s", src, one_line(e))
        raise ToolkitError(f"pi05: no tokenizer in {directory} and {PALIGEMMA_TOKENIZER} is not in the HF cache; "
                           f"{TOKENIZER_HELP}")

    # what the adapter exposes ----------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.model

    @property
    def experts(self) -> dict[str, Expert]:
        cfg = self.model.config
        text = cfg.vlm_config.text_config
        return pi05_experts((text.num_hidden_layers, text.hidden_size),
                            (cfg.dit_config.num_hidden_layers, cfg.dit_config.hidden_size), self.cameras,
                            self.num_steps)

    @property
    def sites(self) -> dict[str, SiteInfo]:
        return dict(SITES)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cameras": self.cameras, "num_steps": self.num_steps,
                "action_dim": self.action_dim, "state_dim": self.state_dim, "max_text_tokens": self.max_text_tokens,
                "layout": self.layout, "normalised": self.norm is not None,
                "relative_actions": self.relative.describe(self.action_dim) if self.relative else None,
                "normalisation": self.norm.describe() if self.norm else
                ("disabled (--no-normalise)" if not self.normalise_enabled else None)}

    # inputs ------------------------------------------------------------------------------------
    def _image(self, img: Any) -> torch.Tensor:
        """(H, W, 3) uint8 (or float in [0, 1]) -> (3, S, S) float32 in [-1, 1]."""
        return (image_tensor(img, (self.image_size, self.image_size), "pi05") - 0.5) / 0.5

    def state_bins(self, state: np.ndarray | None) -> np.ndarray | None:
        """The step's state as upstream writes it into the prompt: normalised (when statistics are known), then
        put into 256 bins; None without a state."""
        if state is None:
            return None
        s = np.asarray(state, dtype=np.float32).reshape(-1)
        if self.norm and self.norm.state:
            s = self.norm.state.normalise(s)
        return prompt.discretise(s)

    def _slots(self, batch: Sequence[tuple[Episode, Step]]) -> prompt.Slots:
        if self.state_dim is None:  # fixed by the first batch, so every batch has the same layout
            first = batch[0][1].state
            self.state_dim = 0 if first is None else int(np.asarray(first).size)
        return prompt.Slots(head=self.max_text_tokens, state=prompt.state_slot(self.state_dim))

    def prepare(self, batch: Sequence[tuple[Episode, Step]]) -> ModelInputs:
        if self.cameras is None:
            self.cameras = sorted(batch[0][1].images)
            if not self.cameras:
                raise ToolkitError("pi05 needs at least one camera image per step; the first step has none")
        slots = self._slots(batch)
        n_cam, per = len(self.cameras), self.tokens_per_image
        n_img = n_cam * per
        head0, state0, tail0 = n_img, n_img + slots.head, n_img + slots.head + slots.state
        seq = n_img + slots.total
        ids = torch.full((len(batch), seq), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        ids[:, :n_img] = self.image_token_id
        mask = torch.zeros(len(batch), seq, dtype=torch.bool)
        pixels = torch.zeros(len(batch), n_cam, 3, self.image_size, self.image_size)
        raw_states = []
        for i, (ep, step) in enumerate(batch):
            for c, cam in enumerate(self.cameras):
                if cam in step.images:
                    pixels[i, c] = self._image(step.images[cam])
                    mask[i, c * per:(c + 1) * per] = True
                else:
                    self.warn_once(f"pi05: a step of {ep.key} has no {cam!r} camera; its tokens are masked")
            extra = set(step.images) - set(self.cameras)
            if extra:
                self.warn_once(f"pi05: cameras {sorted(extra)} are ignored (the model uses {self.cameras})")
            if step.state is None:
                self.warn_once(f"pi05: a step of {ep.key} has no state; its prompt has no 'State:' part")
            bins = self.state_bins(step.state)
            text, start, end = prompt.prompt_text(ep.instruction, bins)
            head, state, tail, cut = prompt.split_tokens(self.tokenizer, text, start, end, self.max_text_tokens)
            if cut:
                self.warn_once(f"pi05: the prompt of {ep.key} is longer than {self.max_text_tokens} tokens and is cut "
                               "there, as upstream's tokenizer does")
            if len(state) > slots.state:
                raise ToolkitError(f"pi05: a step of {ep.key} has a state of {np.asarray(step.state).size} values, "
                                   f"the run's first step {self.state_dim}; every step needs the same state size")
            for start_pos, part in ((head0, head), (state0, state), (tail0, tail)):
                ids[i, start_pos:start_pos + len(part)] = torch.tensor(part, dtype=torch.long)
                mask[i, start_pos:start_pos + len(part)] = True
            raw_states.append(None if step.state is None else np.asarray(step.state, dtype=np.float32).reshape(-1))
        dev, dt = self.device, self.torch_dtype
        tensors = {
            "input_ids": ids.to(dev),
            "attention_mask": mask.long().to(dev),
            "pixel_values": pixels.to(dev, dt),
            "pixel_attention_mask": torch.ones(len(batch), n_cam, dtype=torch.bool, device=dev),
            "raw_states": raw_states,
        }
        spans = {
            "vlm": {"image": list(range(n_img)),
                    **{f"image.{cam}": list(range(c * per, (c + 1) * per)) for c, cam in enumerate(self.cameras)},
                    "text": list(range(n_img, seq)), "task": list(range(head0, state0)),
                    "state": list(range(state0, tail0))},
            "action": {"actions": list(range(self.chunk_size))},
        }
        return ModelInputs(
            tensors=tensors, batch_size=len(batch), spans=spans,
            token_mask={"vlm": mask.to(dev),
                        "action": torch.ones(len(batch), self.chunk_size, dtype=torch.bool, device=dev)},
            seq_len={"vlm": seq, "action": self.chunk_size},
        )

    # running -----------------------------------------------------------------------------------
    def denoise_t(self) -> list[float]:
        return [round(1.0 - k / self.num_steps, 6) for k in range(self.num_steps)]

    def noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Sample i's initial noise, from its own generator."""
        return torch.stack([torch.randn(self.chunk_size, self.max_action_dim, generator=g) for g in generators])

    def run(self, inputs: ModelInputs, generators: Sequence[torch.Generator]) -> PolicyOutput:
        if len(generators) != inputs.batch_size:
            raise ToolkitError(f"pi05.run got {len(generators)} generators for a batch of {inputs.batch_size}")
        t = inputs.tensors
        actions = self.model.sample_actions(
            input_ids=t["input_ids"], pixel_values=t["pixel_values"],
            noise=self.noise(generators).to(self.device, self.torch_dtype), attention_mask=t["attention_mask"],
            pixel_attention_mask=t["pixel_attention_mask"], num_steps=self.num_steps,
        )
        return PolicyOutput(actions=self.postprocess(actions.float().cpu().numpy(), t["raw_states"]),
                            denoise_t=self.denoise_t())

    def postprocess(self, actions: np.ndarray, raw_states: Sequence[np.ndarray | None]) -> np.ndarray:
        """The policy's (B, chunk, 32) output as upstream returns it: cut to the action size, unnormalised, and
        made absolute when the checkpoint predicts relative actions (lerobot's postprocessor order)."""
        out = actions[..., : self.action_dim]
        if self.norm and self.norm.action:
            out = self.norm.action.unnormalise(out)
        if self.relative is not None:  # after unnormalising, as lerobot's AbsoluteActionsProcessorStep
            states = None if any(s is None for s in raw_states) else np.stack(raw_states)
            out = self.relative.to_absolute(out, states)
        return out

    def reference_hidden_states(self, inputs: ModelInputs, generators: Sequence[torch.Generator]
                                ) -> dict[str, torch.Tensor]:
        """Each layer's output from transformers' own ``output_hidden_states``: the VLM's (B, L, seq, hidden) over
        the prefix, and the action expert's (B, L, denoise, chunk, hidden) at every denoising step of the same
        flow (the final norms are bypassed, so ``hidden_states[i + 1]`` is layer i's output, the last included)."""
        t = inputs.tensors
        model = self.model
        vlm, dit = model.model.vlm, model.model.dit
        lm = vlm.language_model
        mask = t["attention_mask"]
        out_vlm, out_dit = [], []
        with torch.no_grad():
            embeds = model.model.embed_prefix(t["input_ids"], t["pixel_values"], t["pixel_attention_mask"])
            norms = lm.norm, dit.norm
            lm.norm, dit.norm = torch.nn.Identity(), _PassNorm()
            try:
                out = vlm(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                          token_type_ids=torch.zeros_like(embeds)[:, :, 0], use_cache=True, output_hidden_states=True)
                out_vlm = torch.stack(out.hidden_states[1:], 1)
                cache, prefix = out.cache, out.cache.get_seq_length()
                x = self.noise(generators).to(self.device, self.torch_dtype)
                dt = -1.0 / self.num_steps
                for step in range(self.num_steps):
                    time = torch.full((x.shape[0],), 1.0 + step * dt, dtype=torch.float32, device=self.device)
                    o = model(noise=x, timestep=time, attention_mask=mask, cache=cache, output_hidden_states=True,
                              pixel_attention_mask=t["pixel_attention_mask"])
                    out_dit.append(torch.stack(o.hidden_states[1:], 1))
                    cache.crop(prefix - cache.get_seq_length())
                    # the velocity through the real final norm (bypassed above only for the hidden states)
                    x = x + dt * self._velocity(o.hidden_states[-1], time, norms[1])
            finally:
                lm.norm, dit.norm = norms
        return {"vlm": out_vlm, "action": torch.stack(out_dit, 2)}

    def _velocity(self, last: torch.Tensor, time: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
        _, timestep_embeds = self.model.embed_action_time(torch.zeros(last.shape[0], self.chunk_size,
                                                                      self.max_action_dim, device=last.device,
                                                                      dtype=last.dtype), time)
        normed, _ = norm(last, timestep_embeds)
        return self.model.action_out_proj(normed[:, -self.chunk_size:])
