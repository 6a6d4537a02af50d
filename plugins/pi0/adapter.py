"""pi0 on transformers' native ``PI0ForConditionalGeneration``.

Two experts share one attention cache: the VLM (PaliGemma's Gemma, ``model.vlm.language_model``) runs the
prefix ``[image tokens per camera][BOS instruction \\n, padded to 48]`` once per policy call; the action
expert (``model.dit``) runs the suffix ``[state][50 noisy actions]`` once per flow-matching step
(t = 1.0, 0.9, ..., 0.1).  Without a checkpoint a small randomly initialised pi0 of the same architecture
is built (smoke tests only).
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

from toolkit.sdk.adapters import Episode, Expert, ModelAdapter, ModelInputs, PolicyOutput, SiteInfo, Step
from toolkit.sdk.adapters import DECODER_STREAMS
from toolkit.sdk.checkpoint import (
    CheckpointError,
    load_into,
    load_state_dict_files,
    read_tensors,
    safetensors_shapes,
    weight_files,
)
from toolkit.sdk.options import AdapterOptions, parse_options
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import cast_model, from_cache_or_hub, image_tensor, llama_tokenizer, one_line
from toolkit_plugins.pi0 import layouts, normalise, relative

log = logging.getLogger("toolkit.pi0")

PALIGEMMA_TOKENIZER = "google/paligemma-3b-pt-224"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class Pi0Options(AdapterOptions):
    """The ``--model-option`` names of pi0."""

    action_dim: int | None = Field(None, ge=1, description="action dimensions kept from the policy's 32 (default: "
                                  "the lerobot checkpoint's action feature size, else 7 as in LIBERO)")
    max_text_tokens: int = Field(48, ge=1, description="instruction tokens (BOS + text + newline), padded")
    cameras: str | list[str] | None = Field(None, description="camera order, comma-separated (default: sorted)")
    num_steps: int | None = Field(None, ge=1, description="flow-matching steps (default: the checkpoint's)")
    tokenizer: str | None = Field(None, description="local PaliGemma tokenizer: a directory or a tokenizer.model")
    stats: str | None = Field(None, description="statistics: a norm_stats.json or a lerobot processor directory")
    normalise: bool = Field(True, description="normalise the state and unnormalise actions with the statistics")

TOKENIZER_HELP = ("download the PaliGemma tokenizer (hub repo google/paligemma-3b-pt-224, gated: accept its licence; "
                  "files tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json) into a "
                  "directory and pass --model-option tokenizer=DIR, or put the files into the checkpoint directory")
CONVERT_HELP = ("convert it first with openpi's examples/convert_jax_model_to_pytorch.py --checkpoint_dir CKPT "
                "--config_name <its openpi config, e.g. pi0_libero> --output_path OUT, then pass --checkpoint OUT")

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


SITES = {
    "vlm": SiteInfo("vlm", "vlm", "all", "mean", "VLM expert, every prefix token"),
    "text_only": SiteInfo("text_only", "vlm", "text", "mean", "VLM expert, instruction tokens only"),
    "action": SiteInfo("action", "action", "all", "mean", "action expert, state and action tokens"),
}


def pi0_experts(vlm: tuple[int, int], dit: tuple[int, int], cameras: Sequence[str] | None,
                num_steps: int) -> dict[str, Expert]:
    """The two experts, from the (layers, width) of the VLM and of the action expert (one span per camera once
    the camera order is known)."""
    cams = tuple(f"image.{c}" for c in cameras or ())
    return {
        "vlm": Expert("vlm", "model.vlm.language_model.layers", *vlm, ("image", *cams, "text"),
                      streams=dict(DECODER_STREAMS),
                      description="PaliGemma language model over the prefix (images, instruction)"),
        "action": Expert("action", "model.dit.layers", *dit, ("state", "actions"), denoise_steps=num_steps,
                         streams=dict(DECODER_STREAMS),
                         description="action expert over the suffix (state, noisy actions), once per denoising step"),
    }


def _cameras(opts: dict[str, Any]) -> list[str] | None:
    """The ``cameras`` option as a list (None: the first batch's cameras, sorted)."""
    cams = opts["cameras"]
    return (cams.split(",") if isinstance(cams, str) else list(cams)) if cams else None


class Pi0Adapter(ModelAdapter):
    """pi0 (PaliGemma VLM + flow-matching action expert) on transformers' PI0ForConditionalGeneration."""

    name = "pi0"
    description = "pi0 (PaliGemma VLM + flow-matching action expert), transformers-native"
    Options = Pi0Options

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, **options: Any) -> None:
        super().__init__(checkpoint, device, dtype, seed, trust_remote_code, **options)
        opts = self.opts
        torch_dtype = self.torch_dtype
        self.normalise_enabled = opts["normalise"]
        self.norm: normalise.Normalisation | None = None
        self.relative: relative.RelativeActions | None = None
        self.layout: str | None = None
        meta: dict[str, Any] = {}
        if checkpoint is None:
            warnings.warn(RANDOM_WARNING, stacklevel=2)
            self.model = build_tiny_model(seed)
            self.tokenizer = self._load_tokenizer(None) if opts["tokenizer"] else llama_tokenizer()
        else:
            directory, files = self._resolve(checkpoint)
            self.model, meta, buffers = self._load(checkpoint, files, layouts.read_meta(directory), torch_dtype,
                                                   directory)
            self.tokenizer = self._load_tokenizer(directory)
            found = relative.find(directory, meta)
            if found is not None and not self.normalise_enabled:
                self.warn_once(f"pi0: {checkpoint} predicts relative actions ({found.source}); with --no-normalise "
                               "they are stored as the policy outputs them, normalised and relative to the state")
            if self.normalise_enabled:  # relative actions become absolute in the dataset's units only
                self.relative = found
                self.norm = (normalise.find(directory, meta, opts["stats"])
                             or normalise.buffer_stats(buffers, meta, str(files[0])))
                if self.norm is None:
                    self.warn_once(f"pi0: {checkpoint} has no normalisation statistics (no lerobot processor files, "
                                   "no openpi assets/*/norm_stats.json): the state goes in raw and the actions are "
                                   "stored in the policy's normalised units; give them with --model-option stats=PATH")
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
        self.action_dim = min(int(opts["action_dim"] or layouts.action_size(meta) or 7), self.max_action_dim)
        self.max_text_tokens = int(opts["max_text_tokens"])
        self.cameras: list[str] | None = _cameras(opts)

    # loading ------------------------------------------------------------------------------
    @staticmethod
    def _resolve(checkpoint: str) -> tuple[Path, list[Path]]:
        """(checkpoint directory, safetensors files): a local directory or file, or a hub id (cache first)."""
        local = Path(checkpoint).expanduser()
        if not local.exists():
            if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1:
                raise ToolkitError(f"pi0 checkpoint {checkpoint!r} does not exist: give a checkpoint directory "
                                   "or a Hugging Face hub id (owner/name)")
            from huggingface_hub import snapshot_download

            try:
                local = Path(from_cache_or_hub(snapshot_download, checkpoint))
            except Exception as e:  # noqa: BLE001 - any download failure is reported as one line
                raise ToolkitError(f"cannot load pi0 checkpoint {checkpoint!r} ({one_line(e)}); download it into a "
                                   "directory and pass that directory") from None
        directory = local if local.is_dir() else local.parent
        if (directory / "params").is_dir() or local.name == "params":
            if not list(directory.glob("*.safetensors")):
                raise CheckpointError(f"{checkpoint} is a native openpi JAX checkpoint (orbax params/), which the "
                                      f"toolkit does not read: {CONVERT_HELP}")
        try:
            return directory, weight_files(local)
        except CheckpointError as e:
            raise CheckpointError(f"cannot load pi0 checkpoint {checkpoint!r}: {e}") from None

    def _load(self, checkpoint: str, files: list[Path], meta: dict[str, Any], torch_dtype: torch.dtype,
              directory: Path | None = None):
        """Build the checkpoint's architecture and fill every weight from the file (or fail naming what is missing).

        Returns (model, the checkpoint's config.json, normalisation buffers found among the weights)."""
        from transformers import PI0ForConditionalGeneration
        from transformers.initialization import no_init_weights

        shapes = safetensors_shapes(files)
        layouts.refuse_other_family(checkpoint, list(shapes), meta, directory)
        self.layout = layouts.recognise(list(shapes))
        config = self._config(checkpoint, meta, shapes)
        buffer_keys = [k for k in shapes if layouts.STATS_BUFFERS.match(k)]
        buffers = read_tensors(files, buffer_keys) if buffer_keys else {}
        # random weights (seeded) only where they are wanted; otherwise every value comes from the file
        init = self.random_weights or self.allow_missing
        torch.manual_seed(self.seed)
        with contextlib.nullcontext() if init else no_init_weights():
            model = PI0ForConditionalGeneration._from_config(config, dtype=torch_dtype)
        if self.random_weights:
            return model.eval(), meta, buffers
        names = set(model.state_dict().keys())
        tensors = load_state_dict_files(files)
        weights, _ = layouts.to_model_names(tensors, names)
        derived = [n for n in layouts.UNUSED if n not in weights and n in names]
        for name in derived:  # never read by pi0's forward; zeros rather than uninitialised memory
            model.get_parameter(name).data.zero_()
        # an untied lm_head beside embed_tokens is unused upstream too: recorded as ignored, not warned about
        self.load_report = load_into(model, weights, source=checkpoint, layout=self.layout, derived=derived,
                                     allow_missing=self.allow_missing, strict=self.strict,
                                     ignored=layouts.dropped_lm_head(list(tensors)),
                                     file_names=layouts.file_names(list(tensors), names))
        return model.eval(), meta, buffers

    @staticmethod
    def _config(checkpoint: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]):
        """The checkpoint's ``PI0Config``: its own config.json when transformers wrote it, else sized from the
        weights' shapes (the safetensors header: no weight is read)."""
        from transformers import PI0Config

        try:
            if meta.get("model_type") == "pi0":  # transformers' own config.json
                return PI0Config.from_dict(meta)
            # lerobot "type": "pi0", openpi's converted config.json, or none: the weights give the sizes
            return layouts.config_from_weights(layouts.to_model_names(shapes, set())[0], meta)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{checkpoint}: cannot build the pi0 architecture ({one_line(e)})") from None

    @classmethod
    def architecture(cls, checkpoint: str | None = None,
                     **options: Any) -> tuple[dict[str, Expert], dict[str, SiteInfo]] | None:
        """From the small default's config, or a local checkpoint's config.json and safetensors header (no
        weight is read); None for a hub id, which only loading resolves (it may download).  The small default
        is read from its config dict, without importing transformers (seconds on a busy machine)."""
        opts = parse_options(cls, options, cls.name)
        if checkpoint is None:
            text, dit = TINY_CONFIG["vlm_config"]["text_config"], TINY_CONFIG["dit_config"]
            sizes = [(c["num_hidden_layers"], c["hidden_size"]) for c in (text, dit)]
            steps = TINY_CONFIG["num_inference_steps"]
        elif Path(checkpoint).expanduser().exists():
            directory, files = cls._resolve(checkpoint)
            meta = layouts.read_meta(directory)
            shapes = safetensors_shapes(files)
            layouts.refuse_other_family(checkpoint, list(shapes), meta, directory)
            layouts.recognise(list(shapes))  # not a pi0 layout: the same one line as loading gives
            config = cls._config(checkpoint, meta, shapes)
            sizes = [(c.num_hidden_layers, c.hidden_size) for c in (config.vlm_config.text_config, config.dit_config)]
            steps = config.num_inference_steps
        else:
            return None
        return pi0_experts(*sizes, _cameras(opts), int(opts["num_steps"] or steps)), dict(SITES)

    def _load_tokenizer(self, directory: Path | None):
        """The ``tokenizer`` option, else the checkpoint's own tokenizer files, else PaliGemma's from the HF cache."""
        from transformers import AutoTokenizer

        given = self.opts["tokenizer"]
        if given:
            p = Path(given).expanduser()
            if not p.exists():
                raise ToolkitError(f"pi0 tokenizer={given} does not exist; {TOKENIZER_HELP}")
            try:
                if p.is_file():  # a bare SentencePiece model, as openpi downloads paligemma_tokenizer.model
                    from transformers import GemmaTokenizer

                    with tempfile.TemporaryDirectory() as d:
                        shutil.copy(p, Path(d) / "tokenizer.model")
                        return GemmaTokenizer.from_pretrained(d)
                # never the directory's own code unless --trust-remote-code (and no interactive prompt)
                return AutoTokenizer.from_pretrained(str(p), trust_remote_code=self.trust_remote_code)
            except Exception as e:  # noqa: BLE001
                raise ToolkitError(f"pi0 tokenizer={given} cannot be loaded ({one_line(e)}); "
                                   f"{TOKENIZER_HELP}") from None
        sources = [str(directory)] if directory and any((directory / f).is_file() for f in TOKENIZER_FILES) else []
        sources.append(PALIGEMMA_TOKENIZER)
        for src in sources:
            try:
                return from_cache_or_hub(AutoTokenizer.from_pretrained, src,
                                         trust_remote_code=self.trust_remote_code)
            except Exception as e:  # noqa: BLE001
                log.debug("pi0: tokenizer from %s failed: %s", src, one_line(e))
        raise ToolkitError(f"pi0: no tokenizer in {directory} and {PALIGEMMA_TOKENIZER} is not in the HF cache; "
                           f"{TOKENIZER_HELP}")

    # what the adapter exposes ----------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.model

    @property
    def experts(self) -> dict[str, Expert]:
        cfg = self.model.config
        text = cfg.vlm_config.text_config
        return pi0_experts((text.num_hidden_layers, text.hidden_size),
                           (cfg.dit_config.num_hidden_layers, cfg.dit_config.hidden_size), self.cameras, self.num_steps)

    @property
    def sites(self) -> dict[str, SiteInfo]:
        return dict(SITES)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cameras": self.cameras, "num_steps": self.num_steps,
                "action_dim": self.action_dim, "layout": self.layout, "normalised": self.norm is not None,
                "relative_actions": self.relative.describe(self.action_dim) if self.relative else None,
                "normalisation": self.norm.describe() if self.norm else
                ("disabled (--no-normalise)" if not self.normalise_enabled else None)}

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
        if self.norm and self.norm.state:  # normalised first, then zero-padded, as lerobot and openpi do
            s = self.norm.state.normalise(s)
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
        raw = [None if s.state is None else np.asarray(s.state, dtype=np.float32).reshape(-1) for _, s in batch]
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
            # the raw state, for relative actions (lerobot adds it to the unnormalised chunk)
            "raw_state": None if any(r is None for r in raw) or len({len(r) for r in raw}) != 1 else np.stack(raw),
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
        if self.norm and self.norm.action:
            out = self.norm.action.unnormalise(out)
        if self.relative is not None:  # after unnormalising, as lerobot's AbsoluteActionsProcessorStep
            out = self.relative.to_absolute(out, t.get("raw_state"))
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
